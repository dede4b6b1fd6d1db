"""Answering records with the chat core and scoring the answers (evaluate_demo.py, training-time
validation, the scripted demos).

Scoring of one answer against its reference: a reference without boxes is right when the answer
equals it ignoring case and surrounding space; a reference with `[[x0,y0,x1,y1]]` boxes (000-999,
utils/grounding.py parses them) is right when the answer has as many boxes and each, matched in
order, overlaps its reference box with IoU >= 0.5.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from models.errors import ImageError
from models.templates import render

from utils.dataset import CAPTCHA_QUERY, label_of
from utils.generation import generate_batch
from utils.generation_config import GenerationConfig
from utils.grounding import parse_boxes
from utils.vision import load_image

logger = logging.getLogger(__name__)
IOU_THRESHOLD = 0.5
Box = Tuple[int, int, int, int]


def normalise(text: str) -> str:
    """What exact match compares: the text trimmed and lower-cased."""
    return text.strip().lower()


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (x1 >= x0, y1 >= y0)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:  # two degenerate boxes: equal or not
        return float(a == b)
    return inter / union


def score_answer(prediction: str, reference: str) -> Dict:
    """{'grounding': reference has boxes, 'correct': bool, 'ious': [IoU of each reference box]}."""
    reference_boxes = [m.relative for m in parse_boxes(reference)]
    if not reference_boxes:
        return {"grounding": False, "correct": normalise(prediction) == normalise(reference), "ious": []}
    predicted = [m.relative for m in parse_boxes(prediction)]
    ious = [box_iou(p, r) for p, r in zip(predicted, reference_boxes)]
    ious += [0.0] * (len(reference_boxes) - len(ious))
    correct = len(predicted) == len(reference_boxes) and all(iou >= IOU_THRESHOLD for iou in ious)
    return {"grounding": True, "correct": correct, "ious": [round(iou, 4) for iou in ious]}


def _rates(scored: Sequence[Dict]) -> Dict:
    text = [s for s in scored if not s["grounding"]]
    boxes = [s for s in scored if s["grounding"]]
    return {"count": len(scored),
            "acc": sum(s["correct"] for s in text) / len(text) if text else None,
            "grounding_iou50": sum(s["correct"] for s in boxes) / len(boxes) if boxes else None,
            "text_count": len(text), "grounding_count": len(boxes)}


def summarise(predictions: Sequence[Dict]) -> Dict:
    """predictions: dicts with 'prediction', 'reference' and 'type' (may be None). Returns `count`,
    `acc` (exact match over answers without boxes), `grounding_iou50` (over answers with boxes),
    their counts, `by_type` (the same per record type) and the predictions with their scores."""
    scored = [{**p, **score_answer(p["prediction"], p["reference"])} for p in predictions]
    by_type = {}
    for kind in sorted({str(s.get("type")) for s in scored}):
        by_type[kind] = _rates([s for s in scored if str(s.get("type")) == kind])
    return {**_rates(scored), "by_type": by_type, "predictions": scored}


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> Dict[str, float]:
    """Exact-match accuracy, case-sensitive ('acc') and not ('acc_w/o_case'), as upstream reports it."""
    if not labels:
        return {"acc": 0.0, "acc_w/o_case": 0.0}
    pairs = list(zip(predictions, labels))
    return {"acc": sum(p == t for p, t in pairs) / len(pairs),
            "acc_w/o_case": sum(p.lower() == t.lower() for p, t in pairs) / len(pairs)}


@torch.no_grad()
def answer_batch(model, text_processor, images: torch.Tensor, queries: Sequence[str],
                 histories: Optional[Sequence[Sequence[Tuple[str, str]]]] = None, max_new_tokens: int = 32,
                 pad_token_id: Optional[int] = None) -> List[str]:
    """Greedy answers of the chat core: images (N, 3, S, S) already processed, one query and history
    (earlier (query, answer) turns) per image. Equals answering them one by one."""
    histories = histories or [()] * len(queries)
    prompts = [text_processor(render(text_processor.template, q, h, with_image=True))
               for q, h in zip(queries, histories)]
    longest = max(p["input_ids"].shape[1] for p in prompts)
    tokenizer = text_processor.tokenizer
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_length=longest + max_new_tokens, top_k=1, end_token_ids=[eos])
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    outputs = generate_batch(model, prompts, config, [{"image": image[None]} for image in images], pad_token_id=pad)
    return [text_processor.process_response(tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True))
            for ids in outputs]


def read_captcha(model, text_processor, image: torch.Tensor, query: str = CAPTCHA_QUERY,
                 max_new_tokens: int = 16) -> str:
    """Greedy answer of the chat core for one image tensor (3, S, S) (already processed)."""
    return answer_batch(model, text_processor, image[None], [query], max_new_tokens=max_new_tokens)[0]


# Whole evaluations (evaluate_demo.py) -------------------------------------------------------

def evaluate_folder(bundle, files, query: str = CAPTCHA_QUERY, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Read every captcha in `files` (the label is the file name); returns {'count', 'skipped', 'acc',
    'acc_w/o_case', 'predictions'}. bundle: a utils.pipeline.InferencePipeline."""
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
    """Answer the last question of every record (earlier turns as history); `summarise`'s figures plus
    'skipped' (records whose image could not be read)."""
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
