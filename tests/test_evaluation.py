"""Scoring of answers (exact match, IoU matching of boxes in order) on hand-made predictions, and
evaluate_demo.py on a JSONL file."""
import json

import pytest

from utils.evaluation import box_iou, score_answer, summarise


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (2, 2, 8, 8)) == pytest.approx(36 / 100)
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0 and box_iou((5, 5, 5, 5), (6, 6, 6, 6)) == 0.0


def test_exact_match_ignores_case_and_surrounding_space_only():
    assert score_answer("  Red ", "red")["correct"]
    assert not score_answer("dark red", "red")["correct"]
    assert not score_answer("", "red")["correct"]
    assert score_answer("yes", "yes") == {"grounding": False, "correct": True, "ious": []}


def test_boxes_match_in_order_with_iou_at_least_one_half():
    reference = "a red circle [[100,100,300,300]] and a blue star [[500,500,700,700]]"
    # the text around the boxes does not count, only the boxes, in order
    close = score_answer("a red square [[110,100,310,300]] and a star [[500,520,700,720]]", reference)
    assert close["grounding"] and close["correct"] and close["ious"] == [pytest.approx(190 / 210, abs=1e-4),
                                                                         pytest.approx(180 / 220, abs=1e-4)]
    swapped = score_answer("[[500,500,700,700]] [[100,100,300,300]]", reference)
    assert not swapped["correct"] and swapped["ious"] == [0.0, 0.0]
    missing = score_answer("a red circle [[100,100,300,300]]", reference)
    assert not missing["correct"] and missing["ious"] == [1.0, 0.0]
    extra = score_answer("[[100,100,300,300]] [[500,500,700,700]] [[0,0,10,10]]", reference)
    assert not extra["correct"]  # as many boxes as the reference
    half = score_answer("[[100,100,300,300]]", "[[100,100,300,500]]")  # IoU exactly 0.5 counts
    assert half["correct"] and half["ious"] == [0.5]
    assert not score_answer("[[100,100,300,299]]", "[[100,100,300,500]]")["correct"]
    assert not score_answer("somewhere on the left", "[[100,100,300,500]]")["correct"]


def test_summary_splits_text_and_box_answers_and_counts_by_type():
    predictions = [
        {"type": "colour", "reference": "red", "prediction": "red"},
        {"type": "colour", "reference": "blue", "prediction": "green"},
        {"type": "count", "reference": "3", "prediction": "3"},
        {"type": "grounding", "reference": "[[0,0,100,100]]", "prediction": "[[0,0,100,90]]"},
        {"type": "grounding", "reference": "[[0,0,100,100]]", "prediction": "[[200,200,300,300]]"},
        {"type": None, "reference": "[[0,0,100,100]]", "prediction": "[[0,0,100,100]]"},
    ]
    summary = summarise(predictions)
    assert summary["count"] == 6 and summary["text_count"] == 3 and summary["grounding_count"] == 3
    assert summary["acc"] == pytest.approx(2 / 3) and summary["grounding_iou50"] == pytest.approx(2 / 3)
    assert summary["by_type"]["colour"]["acc"] == 0.5 and summary["by_type"]["colour"]["grounding_iou50"] is None
    assert summary["by_type"]["grounding"]["grounding_iou50"] == 0.5 and summary["by_type"]["None"]["count"] == 1
    assert [p["correct"] for p in summary["predictions"]] == [True, False, True, True, False, True]
    assert summary["predictions"][3]["ious"] == [0.9]


def test_evaluate_demo_on_jsonl_reports_every_prediction(tmp_path, tiny_checkpoint, golden):
    import evaluate_demo
    from scripts.make_scene_dataset import make_scene_dataset

    data = make_scene_dataset(str(tmp_path / "scenes"), 6, seed=5, progress=False)
    output = tmp_path / "out.json"
    code = evaluate_demo.main(["--from_pretrained", tiny_checkpoint, "--local_tokenizer", golden.tokenizer_dir,
                               "--version", "chat", "--device", "cpu", "--max_length", "200", "--max_new_tokens", "6",
                               "--batch_size", "4", "--data", data, "--output", str(output)])
    assert code == 0
    results = json.loads(output.read_text())
    records = [json.loads(line) for line in open(data)]
    assert results["count"] == 6 and len(results["predictions"]) == 6
    assert [p["reference"] for p in results["predictions"]] == [r["conversations"][-1]["content"] for r in records]
    assert [p["type"] for p in results["predictions"]] == [r["type"] for r in records]
    assert [len(p["history"]) for p in results["predictions"]] == [len(r["conversations"]) // 2 - 1 for r in records]
    assert set(results) >= {"count", "acc", "grounding_iou50", "by_type", "predictions"}
    assert results["text_count"] + results["grounding_count"] == 6
