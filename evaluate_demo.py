"""Captcha accuracy of a (finetuned) CogVLM on a folder of images named by their label.

    python evaluate_demo.py --from_pretrained checkpoints/merged_lora_490 --version base --bf16 \
        --data archive_split/test --output results/captcha_test.json
    bash scripts/evaluate_490.sh

Every image is read greedily by the chat core (prompt `CAPTCHA:`); exact-match accuracy, case-sensitive
and not, is printed and written to `--output` with every prediction. Unreadable images are skipped
with a warning. Under torchrun the model is split across the processes; rank 0 reports.
"""
import argparse
import json
import logging
import os
import sys

import torch
from tqdm import tqdm

from utils.dataset import CAPTCHA_QUERY, find_images, label_of
from utils.evaluation import exact_match, read_captcha
from models.errors import CogVLMError, ImageError
from utils.pipeline import add_inference_args, load_pipeline
from utils.vision import load_image

logger = logging.getLogger(__name__)


def evaluate(bundle, files, query: str = CAPTCHA_QUERY, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Read every file in `files`; returns {'count', 'skipped', 'acc', 'acc_w/o_case', 'predictions'}."""
    predictions, skipped = [], []
    for path in tqdm(files, desc="reading captchas", unit="img", disable=not progress or bundle.rank != 0):
        try:
            image = bundle.processor.image.to_tensor(load_image(path))
        except ImageError as e:
            logger.warning("skipping %s: %s", path, e)
            skipped.append(path)
            continue
        text = read_captcha(bundle.model, bundle.processor.text, image, query, max_new_tokens)
        predictions.append({"file": path, "label": label_of(path), "prediction": text})
    scores = exact_match([p["prediction"] for p in predictions], [p["label"] for p in predictions])
    return {"count": len(predictions), "skipped": skipped, **scores, "predictions": predictions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Captcha exact-match accuracy of a CogVLM checkpoint")
    add_inference_args(parser)
    parser.add_argument("--data", required=True, help="folder of images whose file name is the label")
    parser.add_argument("--output", default=None, help="JSON file for the results (default: <checkpoint>/eval.json)")
    parser.add_argument("--query", default=CAPTCHA_QUERY, help="prompt (default: the training prompt CAPTCHA:)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sat").propagate = False
    try:
        files = find_images(args.data)[:args.limit]
        bundle = load_pipeline(args)
        with torch.no_grad():
            results = evaluate(bundle, files, args.query, args.max_new_tokens)
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if bundle.rank == 0:
        output = args.output or os.path.join(args.from_pretrained, "eval.json")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump({"checkpoint": args.from_pretrained, "data": args.data, **results}, f, indent=2)
        print(f"accuracy {results['acc']:.4f} (ignoring case {results['acc_w/o_case']:.4f}) on "
              f"{results['count']} images of {args.data}" + (f", {len(results['skipped'])} skipped" if results["skipped"] else "")
              + f"; results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
