"""Accuracy of a (finetuned) CogVLM on a JSONL file of conversations or a folder of captchas.

    python evaluate_demo.py --from_pretrained checkpoints/cogvlm-tiny-scenes --data scenes/data.jsonl \
        --output results/scenes.json
    python evaluate_demo.py --from_pretrained checkpoints/merged_lora_490 --version base --bf16 \
        --data archive_split/test --output results/captcha_test.json
    bash scripts/evaluate_490.sh

JSONL (utils/dataset.py's format): the chat core answers each record's last question greedily, with
the record's earlier turns as history. Answers without boxes count by exact match (case-insensitive,
trimmed): `acc`; answers with `[[x0,y0,x1,y1]]` boxes count when every box, matched in order,
has IoU >= 0.5 with the reference: `grounding_iou50`; both per record `type` too (`by_type`).
A folder: every image is read with the prompt `CAPTCHA:`; exact match, case-sensitive (`acc`) and not.
Results and every prediction go to `--output`. Unreadable images are skipped with a warning. Under
torchrun the model is split across the processes; rank 0 reports.
"""
import argparse
import json
import os

from utils.cli import add_inference_args, run_main, setup_logging


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Exact-match and grounding accuracy of a CogVLM checkpoint")
    add_inference_args(parser)
    parser.add_argument("--data", required=True,
                        help="a JSONL file of conversations, or a folder of images whose file name is the label")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: <checkpoint name>-eval.json in the working directory)")
    parser.add_argument("--query", default=None, help="prompt for a folder (default: the captcha training prompt)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length cap (default: 16 for "
                        "captchas, 96 for JSONL)")
    parser.add_argument("--batch_size", type=int, default=16, help="records answered together (JSONL)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records / images (sorted by name)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_main(lambda: run(args))


def run(args) -> int:
    # the model layers load here, after the flags: SAT takes seconds to import (utils/cli.py)
    import torch

    from models.checkpoint.atomic import write_text
    from utils.dataset import CAPTCHA_QUERY, find_images, read_jsonl
    from utils.evaluation import evaluate_folder, evaluate_records
    from utils.pipeline import load_pipeline

    jsonl = not os.path.isdir(args.data)
    items = read_jsonl(args.data)[:args.limit] if jsonl else find_images(args.data)[:args.limit]
    bundle = load_pipeline(args)
    with torch.no_grad():
        if jsonl:
            results = evaluate_records(bundle, items, args.max_new_tokens or 96, args.batch_size)
        else:
            results = evaluate_folder(bundle, items, args.query or CAPTCHA_QUERY, args.max_new_tokens or 16)
    if bundle.rank != 0:
        return 0
    # never into the checkpoint (a shipped or shared one stays as it was)
    output = args.output or f"{os.path.basename(os.path.normpath(args.from_pretrained))}-eval.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_text(output, json.dumps({"checkpoint": args.from_pretrained, "data": args.data, **results}, indent=2))
    skipped = f", {len(results['skipped'])} skipped" if results["skipped"] else ""
    if jsonl:
        for kind, rates in results["by_type"].items():
            print(f"  {kind:<12} {rates['count']:>5} records  exact match {_percent(rates['acc'])}  "
                  f"grounding IoU>=0.5 {_percent(rates['grounding_iou50'])}")
        print(f"exact match {_percent(results['acc'])} of {results['text_count']} answers without boxes, "
              f"grounding IoU>=0.5 {_percent(results['grounding_iou50'])} of {results['grounding_count']} with "
              f"boxes ({results['count']} records of {args.data}{skipped}); results in {output}")
    else:
        print(f"accuracy {results['acc']:.4f} (ignoring case {results['acc_w/o_case']:.4f}) on "
              f"{results['count']} images of {args.data}{skipped}; results in {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
