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
import logging
import os
import sys

import torch
from tqdm import tqdm

from models.checkpoint.atomic import write_text
from models.errors import CogVLMError, ImageError
from utils.dataset import CAPTCHA_QUERY, find_images, label_of, read_jsonl
from utils.evaluation import answer_batch, exact_match, read_captcha, summarise
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


def evaluate_records(bundle, records, max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True) -> dict:
    """Answer the last question of every record (earlier turns as history); utils.evaluation.summarise's
    figures plus 'skipped' (records whose image could not be read)."""
    predictions, skipped = [], []
    with tqdm(total=len(records), desc="answering", unit="record", disable=not progress or bundle.rank != 0) as bar:
        for start in range(0, len(records), batch_size):
            chunk, images = [], []
            for record in records[start:start + batch_size]:
                try:
                    images.append(bundle.processor.image.to_tensor(load_image(record.image)))
                    chunk.append(record)
                except ImageError as e:
                    logger.warning("skipping line %d: %s", record.line, e)
                    skipped.append(record.image)
            if chunk:
                answers = answer_batch(bundle.model, bundle.processor.text, torch.stack(images),
                                       [r.turns[-1][0] for r in chunk], [r.turns[:-1] for r in chunk], max_new_tokens)
                predictions += [{"image": r.image, "line": r.line, "type": r.type, "history": [list(t) for t in r.turns[:-1]],
                                 "query": r.turns[-1][0], "reference": r.turns[-1][1], "prediction": answer}
                                for r, answer in zip(chunk, answers)]
            bar.update(len(records[start:start + batch_size]))
    return {**summarise(predictions), "skipped": skipped}


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Exact-match and grounding accuracy of a CogVLM checkpoint")
    add_inference_args(parser)
    parser.add_argument("--data", required=True,
                        help="a JSONL file of conversations, or a folder of images whose file name is the label")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: <checkpoint name>-eval.json in the working directory)")
    parser.add_argument("--query", default=CAPTCHA_QUERY, help="prompt (default: the training prompt CAPTCHA:)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length cap (default: 16 for "
                        "captchas, 96 for JSONL)")
    parser.add_argument("--batch_size", type=int, default=16, help="records answered together (JSONL)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records / images (sorted by name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sat").propagate = False
    jsonl = not os.path.isdir(args.data)
    try:
        items = read_jsonl(args.data)[:args.limit] if jsonl else find_images(args.data)[:args.limit]
        bundle = load_pipeline(args)
        with torch.no_grad():
            if jsonl:
                results = evaluate_records(bundle, items, args.max_new_tokens or 96, args.batch_size)
            else:
                results = evaluate(bundle, items, args.query, args.max_new_tokens or 16)
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if bundle.rank == 0:
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
    sys.exit(main())
