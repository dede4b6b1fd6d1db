"""Accuracy of the reduced-precision paths against fp32 (the numbers recorded next to their speed).

    python bench/accuracy.py                       # every precision, golden bundle + both shipped tiny models
    python bench/accuracy.py --precisions fp32 int4 --count 100

1. Golden bundle (tests/golden/tiny-small, random weights: no redundancy, the hardest case for rounding):
   per precision, the largest logit difference over the bundle's cases relative to the largest reference
   logit, the fraction of prompt positions whose argmax is the reference's, and the greedy tokens kept
   (equal to the reference before the first divergence), summed over the 4 image cases (64 at most).
2. The trained tiny models, through evaluate_demo.py on inputs rendered with seeds their training never
   used: checkpoints/cogvlm-tiny-captcha on --count captchas (seed 777), checkpoints/cogvlm-tiny-scenes on
   --count scenes (seed 31337): exact match, and grounding IoU >= 0.5 for the scenes.
"""
import argparse
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file

import evaluate_demo
from models.checkpoint import load_model
from scripts.make_captcha_dataset import make_dataset
from scripts.make_scene_dataset import make_scene_dataset
from utils.generation import generate_stream
from utils.generation_config import GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny-small")
CHECKPOINTS = os.path.join(ROOT, "checkpoints")
# name: (parameter dtype, --quant, evaluate_demo flags)
PRECISIONS = {
    "fp32": (torch.float32, None, []),
    "bf16": (torch.bfloat16, None, ["--bf16"]),
    "int8": (torch.float32, 8, ["--quant", "8"]),
    "bf16+int8": (torch.bfloat16, 8, ["--bf16", "--quant", "8"]),
    "int4": (torch.float32, 4, ["--quant", "4"]),
}


def golden_inputs(tensors, name, dtype):
    length = tensors[f"{name}.input_ids"].shape[0]
    inputs = dict(input_ids=tensors[f"{name}.input_ids"][None], position_ids=tensors[f"{name}.position_ids"][None],
                  attention_mask=torch.ones(1, 1, length, length).tril())
    if name != "text_only":
        inputs.update(vision_expert_mask=tensors[f"{name}.vision_expert_mask"][None],
                      image_embed_mask=tensors[f"{name}.image_embed_mask"][None], images=tensors["image"].to(dtype))
    return inputs


@torch.no_grad()
def golden_accuracy(precision: str) -> dict:
    dtype, quant, _ = PRECISIONS[precision]
    meta = json.load(open(os.path.join(GOLDEN, "golden.json")))["cases"]
    tensors = load_file(os.path.join(GOLDEN, "golden.safetensors"))
    model, _ = load_model(os.path.join(GOLDEN, "checkpoint"), dtype=dtype, quant=quant, pack=True)  # as the front ends
    model.eval()
    cases = [name for name in meta if f"{name}.logits" in tensors]
    worst, agree, positions, kept, total = 0.0, 0, 0, 0, 0
    for name in cases:
        logits = model(**golden_inputs(tensors, name, dtype))[0][0].float()
        expected = tensors[f"{name}.logits"]
        worst = max(worst, ((logits - expected).abs().max() / expected.abs().max()).item())
        agree += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
        positions += expected.shape[0]
        if name == "text_only":
            continue
        reference = tensors[f"{name}.gen_ids"].tolist()
        inputs = golden_inputs(tensors, name, dtype)
        config = GenerationConfig(max_length=inputs["input_ids"].shape[1] + len(reference), end_token_ids=[])
        tokens = list(generate_stream(model, inputs, config))
        kept += next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        total += len(reference)
    return {"max_rel_logit_diff": round(worst, 4), "argmax_agreement": round(agree / positions, 4),
            "greedy_kept": kept, "greedy_total": total}


def trained_accuracy(precision: str, data: dict, folder: str) -> dict:
    results = {}
    for name, source in data.items():
        output = os.path.join(folder, f"{name}-{precision}.json")
        argv = ["--from_pretrained", os.path.join(CHECKPOINTS, name), "--device", "cpu", "--data", source,
                "--output", output] + PRECISIONS[precision][2]
        if evaluate_demo.main(argv) != 0:
            raise SystemExit(f"error: evaluate_demo.py failed on {name} ({precision})")
        scores = json.load(open(output))
        results[name] = {key: scores.get(key) for key in ("count", "acc", "grounding_iou50")}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--count", type=int, default=300, help="unseen inputs per trained model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        captchas = os.path.join(folder, "captchas")
        make_dataset(captchas, args.count, "clean", seed=777)
        data = {"cogvlm-tiny-captcha": captchas,
                "cogvlm-tiny-scenes": make_scene_dataset(os.path.join(folder, "scenes"), args.count, seed=31337,
                                                         progress=False)}
        for precision in args.precisions:
            results[precision] = {"golden": golden_accuracy(precision), **trained_accuracy(precision, data, folder)}
    print(f"{'precision':10} {'golden logit diff':>17} {'argmax':>7} {'greedy kept':>11} {'captcha acc':>11} "
          f"{'scenes acc':>10} {'scenes IoU50':>12}")
    for precision, r in results.items():
        g = r["golden"]
        print(f"{precision:10} {g['max_rel_logit_diff']:17.4f} {g['argmax_agreement']:7.1%} "
              f"{g['greedy_kept']:>5}/{g['greedy_total']:<5} {r['cogvlm-tiny-captcha']['acc']:11.1%} "
              f"{r['cogvlm-tiny-scenes']['acc']:10.1%} {r['cogvlm-tiny-scenes']['grounding_iou50']:12.1%}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
