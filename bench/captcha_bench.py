"""Benchmark of the tiny CogVLM of scripts/train_tiny_captcha.sh (not a test: it takes minutes).

    python bench/captcha_bench.py                    # accuracies (about 2 min on 2 cores)
    python bench/captcha_bench.py --time_training    # also retrain the tiny model from scratch, timed

Measures, on captchas rendered fresh with seeds the training never used:
  * exact-match accuracy of checkpoints/cogvlm-tiny-captcha on 500 clean captchas (target >= 90%)
  * the LoRA demo: accuracy on 500 "shifted" captchas before LoRA (the clean model) and after
    (checkpoints/cogvlm-tiny-captcha-shifted-lora)
  * with --time_training: wall time of `scripts/train_tiny_captcha.sh pretrain` (data + training),
    target <= 15 min on an idle 2-core machine, and the accuracy of the model it produces
Results are printed and written to bench/captcha_results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from evaluate_demo import evaluate
from scripts.make_captcha_dataset import make_dataset
from utils.cli import add_inference_args
from utils.pipeline import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKPOINTS = os.path.join(ROOT, "checkpoints")
TOKENIZER = os.path.join(CHECKPOINTS, "cogvlm-tiny-captcha", "tokenizer")
HELD_OUT_SEED = 90210  # the training data used seed 0


def accuracy(checkpoint: str, folder: str) -> dict:
    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", checkpoint, "--local_tokenizer", TOKENIZER, "--version", "base", "--max_length", "96",
         "--device", "cpu"])
    bundle = load_pipeline(args)
    start = time.time()
    with torch.no_grad():
        results = evaluate(bundle, sorted(os.path.join(folder, n) for n in os.listdir(folder)), progress=False)
    return {"acc": results["acc"], "acc_w/o_case": results["acc_w/o_case"], "count": results["count"],
            "seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--time_training", action="store_true")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "captcha_results.json"))
    args = parser.parse_args(argv)
    results = {"machine": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start",
               "count": args.count}
    with tempfile.TemporaryDirectory() as work:
        clean, shifted = os.path.join(work, "clean"), os.path.join(work, "shifted")
        make_dataset(clean, args.count, "clean", HELD_OUT_SEED)
        make_dataset(shifted, args.count, "shifted", HELD_OUT_SEED)
        results["clean"] = accuracy(os.path.join(CHECKPOINTS, "cogvlm-tiny-captcha"), clean)
        results["lora_demo"] = {
            "shifted_before_lora": accuracy(os.path.join(CHECKPOINTS, "cogvlm-tiny-captcha"), shifted),
            "shifted_after_lora": accuracy(os.path.join(CHECKPOINTS, "cogvlm-tiny-captcha-shifted-lora"), shifted),
            "clean_after_lora": accuracy(os.path.join(CHECKPOINTS, "cogvlm-tiny-captcha-shifted-lora"), clean),
        }
        if args.time_training:
            out = os.path.join(work, "out")
            start = time.time()
            subprocess.run(["bash", "scripts/train_tiny_captcha.sh", "pretrain"], cwd=ROOT, check=True,
                           env={**os.environ, "WORK": os.path.join(work, "train"), "OUT": out})
            results["training"] = {"seconds": round(time.time() - start, 1),
                                   "retrained_clean": accuracy(os.path.join(out, "cogvlm-tiny-captcha"), clean)}
    print(json.dumps(results, indent=2))
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
