"""Finetuning data: label masking, token layout of a training sample, bad images, batching,
the captcha renderer, the deterministic train/valid/test split, and JSONL conversations (both
styles, multi-turn masking, bad records with their line numbers)."""
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from scripts.make_captcha_dataset import CHARSET, make_dataset, render_captcha
from scripts.split_dataset import SplitError, split_dataset
from utils.dataset import (CAPTCHA_QUERY, IGNORE_INDEX, CaptchaDataset, ConversationDataset, DatasetError, Record,
                           TrainingSampleBuilder, collate_samples, llama2_text_processor, read_jsonl)
from utils.evaluation import exact_match
from models.errors import CogVLMError
from models.templates import render
from utils.language import llama2_text_processor_inference
from utils.vision import get_image_processor

IMAGE_LENGTH = 4  # a 28px image with patch 14


@pytest.fixture(scope="module")
def processors(tokenizers):
    tokenizer = tokenizers["base"]
    return (llama2_text_processor(tokenizer, 64, IMAGE_LENGTH),
            llama2_text_processor_inference(tokenizer, 64, IMAGE_LENGTH), get_image_processor(28))


def test_training_sample_masks_prompt_and_image_and_keeps_inference_layout(processors, tokenizers):
    train, inference, _ = processors
    tokenizer = tokenizers["base"]
    sample = train("3bnyf", CAPTCHA_QUERY)
    prompt = inference("<EOI>" + CAPTCHA_QUERY)  # what the chat core feeds at inference time
    n_prompt = prompt["input_ids"].shape[1]
    answer = tokenizer.encode("3bnyf", add_special_tokens=False) + [tokenizer.eos_token_id]

    # the prompt part is exactly the inference layout, masks and positions included
    for key in ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask", "image_rope_mask"):
        assert sample[key][:n_prompt].tolist() == prompt[key][0].tolist(), key
    assert sample["input_ids"][n_prompt:].tolist() == answer
    assert int(sample["prompt_length"]) == n_prompt
    # labels: -100 over bos, the image block and "CAPTCHA:"; the answer and eos are learned
    assert (sample["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert sample["labels"][n_prompt:].tolist() == answer
    assert sample["image_embed_mask"][:n_prompt].sum() == IMAGE_LENGTH + 2
    assert not sample["image_embed_mask"][n_prompt:].any() and not sample["vision_expert_mask"][n_prompt:].any()
    # answer positions continue after the prompt's last position
    last = int(prompt["position_ids"][0, -1])
    assert sample["position_ids"][n_prompt:].tolist() == list(range(last + 1, last + 1 + len(answer)))
    assert train("x" * 200, CAPTCHA_QUERY) is None  # does not fit max_length


def test_collate_pads_with_ignored_labels(processors):
    train, _, image_processor = processors
    from PIL import Image

    samples = []
    for label in ("ab", "abcdef12"):
        sample = train(label, CAPTCHA_QUERY)
        sample["image"] = image_processor.to_tensor(Image.new("RGB", (40, 20), "white"))
        samples.append(sample)
    batch = collate_samples(samples, pad_token_id=0)
    length = batch["input_ids"].shape[1]
    short = samples[0]["input_ids"].shape[0]
    assert length == samples[1]["input_ids"].shape[0] > short
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["input_ids"][0, short:] == 0).all()
    assert batch["attention_mask"].shape == (1, 1, length, length)
    assert batch["images"].shape == (2, 3, 28, 28)
    assert batch["position_ids"][0].diff()[short - 1:].eq(1).all()


def test_dataset_labels_from_file_names_and_skips_corrupt_images(tmp_path, processors, caplog):
    train, _, image_processor = processors
    make_dataset(str(tmp_path), 3, "clean", seed=5)
    (tmp_path / "brokn.png").write_bytes(b"not a png at all")
    dataset = CaptchaDataset(str(tmp_path), image_processor, train)
    assert len(dataset) == 4
    broken = dataset.files.index(str(tmp_path / "brokn.png"))
    with caplog.at_level("WARNING"):
        samples = [dataset[i] for i in range(len(dataset))]  # never raises mid-epoch
    assert "brokn.png" in caplog.text
    stand_in = samples[broken]
    assert stand_in["image"].shape == (3, 28, 28)
    assert stand_in["input_ids"].tolist() == samples[(broken + 1) % 4]["input_ids"].tolist()
    labels = {os.path.splitext(n)[0] for n in os.listdir(tmp_path)} - {"brokn"}
    assert {train.tokenizer.decode(s["labels"][s["labels"] >= 3].tolist()).strip() for s in samples} == labels


def test_cached_dataset_gives_the_same_samples_without_reading_files_again(tmp_path, processors):
    train, _, image_processor = processors
    make_dataset(str(tmp_path), 3, "clean", seed=6)
    (tmp_path / "brokn.png").write_bytes(b"not a png at all")
    plain = CaptchaDataset(str(tmp_path), image_processor, train)
    cached = CaptchaDataset(str(tmp_path), image_processor, train, cache=True)
    expected = [plain[i] for i in range(len(plain))]
    first_epoch = [cached[i] for i in range(len(cached))]
    for name in os.listdir(tmp_path):  # the second epoch must come from memory alone
        os.remove(tmp_path / name)
    second_epoch = [cached[i] for i in range(len(cached))]
    for want, *got in zip(expected, first_epoch, second_epoch):
        for sample in got:
            assert set(sample) == set(want)
            for key in want:
                assert torch.equal(sample[key], want[key]), key


def test_dataset_errors_name_the_folder(tmp_path, processors):
    train, _, image_processor = processors
    with pytest.raises(CogVLMError, match="does not exist"):
        CaptchaDataset(str(tmp_path / "missing"), image_processor, train)
    with pytest.raises(CogVLMError, match="no images"):
        CaptchaDataset(str(tmp_path), image_processor, train)


def test_captcha_labels_round_trip_through_the_shipped_tokenizer(tokenizers):
    tokenizer = tokenizers["base"]
    rng = random.Random(0)
    for _ in range(300):
        label = "".join(rng.choice(CHARSET) for _ in range(rng.randint(4, 6)))
        assert tokenizer.decode(tokenizer.encode(label, add_special_tokens=False)) == label


@pytest.mark.parametrize("style", ["clean", "shifted", "hard"])
def test_renderer_is_seeded_and_names_files_by_label(tmp_path, style):
    first = make_dataset(str(tmp_path / "a"), 4, style, seed=3)
    second = make_dataset(str(tmp_path / "b"), 4, style, seed=3)
    digest = lambda p: hashlib.md5(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
    assert [digest(p) for p in first] == [digest(p) for p in second]
    for path in first:
        label = os.path.splitext(os.path.basename(path))[0]
        assert 4 <= len(label) <= 6 and set(label) <= set(CHARSET)
    other = render_captcha("ab12", style, random.Random(1)).tobytes()
    assert other != render_captcha("ab12", style, random.Random(2)).tobytes()


def test_exact_match_with_and_without_case():
    scores = exact_match(["ab1", "AB2", "x"], ["ab1", "ab2", "y"])
    assert scores == {"acc": 1 / 3, "acc_w/o_case": 2 / 3}


def _split_listing(root):
    return {s: sorted(os.listdir(os.path.join(root, s))) for s in ("train", "valid", "test")}


def test_split_is_deterministic_with_upstream_ratios(tmp_path):
    src = tmp_path / "archive"
    make_dataset(str(src), 40, "clean", seed=0)
    counts = split_dataset(str(src), str(tmp_path / "one"))
    split_dataset(str(src), str(tmp_path / "two"))
    assert counts == {"train": 32, "valid": 2, "test": 6}
    one, two = _split_listing(tmp_path / "one"), _split_listing(tmp_path / "two")
    assert one == two
    assert sorted(sum(one.values(), [])) == sorted(os.listdir(src))  # a partition: nothing lost or repeated
    split_dataset(str(src), str(tmp_path / "three"), seed=7)
    assert _split_listing(tmp_path / "three") != one


def test_split_refuses_non_empty_destination_and_bad_ratios(tmp_path):
    src = tmp_path / "archive"
    make_dataset(str(src), 5, "clean", seed=0)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("earlier work")
    with pytest.raises(SplitError, match="not empty"):
        split_dataset(str(src), str(tmp_path / "dst"))
    with pytest.raises(SplitError, match="sum to 1"):
        split_dataset(str(src), str(tmp_path / "new"), ratios=(0.5, 0.2, 0.2))
    result = subprocess.run([sys.executable, "scripts/split_dataset.py", "--src", str(src), "--dst",
                             str(tmp_path / "dst")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "not empty" in result.stderr
    assert (tmp_path / "dst" / "keep.txt").read_text() == "earlier work"


# JSONL conversations ------------------------------------------------------------------------

def _write_jsonl(folder, lines):
    path = folder / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.fixture()
def scene_folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    return tmp_path


def _turns(*pairs):
    return [message for q, a in pairs for message in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": a})]


def test_jsonl_reads_both_conversation_styles(scene_folder):
    llava = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": " red "},
             {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "[[100,200,300,400]]"}]
    path = _write_jsonl(scene_folder, [
        {"image": "images/a.png", "conversations": _turns(("What colour is it?", "red"),
                                                          ("Where is it?", "[[100,200,300,400]]")), "type": "colour"},
        {"image": "images/a.png", "conversations": llava}])
    ours, theirs = read_jsonl(path)
    assert ours.turns == theirs.turns == (("What colour is it?", "red"), ("Where is it?", "[[100,200,300,400]]"))
    assert ours.image == theirs.image == str(scene_folder / "images" / "a.png")  # relative to the JSONL file
    assert (ours.type, theirs.type, ours.line, theirs.line) == ("colour", None, 1, 2)


def test_multi_turn_sample_trains_every_answer_and_only_answers(tokenizers):
    tokenizer = tokenizers["chat"]
    inference = llama2_text_processor_inference(tokenizer, 200, IMAGE_LENGTH)
    builder = TrainingSampleBuilder(inference)
    turns = [("What colour is the circle?", "red"), ("Where is it?", "[[080,776,285,982]]"), ("How many?", "3")]
    (sample,) = builder.samples(turns)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    eos = tokenizer.eos_token_id

    # the input up to each answer is what the chat core feeds for that turn (earlier turns as history)
    for k in range(len(turns)):
        prompt = inference(render("chat", turns[k][0], turns[:k]))
        n = prompt["input_ids"].shape[1]
        assert ids[:n] == prompt["input_ids"][0].tolist(), k
        for key in ("position_ids", "image_embed_mask", "vision_expert_mask", "image_rope_mask"):
            assert sample[key][:n].tolist() == prompt[key][0].tolist(), (k, key)
        answer = tokenizer.encode(turns[k][1], add_special_tokens=False)
        assert labels[n:n + len(answer)] == ids[n:n + len(answer)]  # the answer is learned ...
        assert labels[n + len(answer)] == eos  # ... and then the end of the turn
        assert all(label == IGNORE_INDEX for label in labels[:n][-3:])  # "Answer:" is not
    # labels exist on the three answers and their ends only: everything a user wrote is masked
    learned = [t for t in labels if t != IGNORE_INDEX]
    expected = []
    for _, answer in turns:
        expected += tokenizer.encode(answer, add_special_tokens=False) + [eos]
    assert learned == expected
    assert int(sample["prompt_length"]) == len(ids) - len(tokenizer.encode("3", add_special_tokens=False)) - 1


def test_template_without_history_makes_one_sample_per_turn(tokenizers):
    builder = llama2_text_processor(tokenizers["base"], 64, IMAGE_LENGTH)
    samples = builder.samples([("Colour?", "red"), ("Shape?", "circle")])
    assert len(samples) == 2
    assert [builder(answer, query)["input_ids"].tolist() for query, answer in (("Colour?", "red"), ("Shape?", "circle"))] \
        == [s["input_ids"].tolist() for s in samples]


def test_bad_records_are_skipped_with_their_line_numbers(scene_folder, caplog):
    good = {"image": "images/a.png", "conversations": _turns(("Q?", "yes"))}
    bad = [{"image": "images/missing.png", "conversations": _turns(("Q?", "yes"))},
           {"image": "images/a.png", "conversations": [{"role": "assistant", "content": "x"}]},
           {"image": "images/a.png", "conversations": _turns(("Q?", "  "))},
           "{not json"]
    path = _write_jsonl(scene_folder, [good] * 3 + [bad[0]] + [good] * 20)
    with caplog.at_level("WARNING"):
        records = read_jsonl(path)
    assert len(records) == 23 and 4 not in [r.line for r in records]
    assert "line 4 skipped: image 'images/missing.png' not found" in caplog.text
    path = _write_jsonl(scene_folder, [good] * 10 + bad)
    with pytest.raises(DatasetError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert "4 of 14 records" in message and "[11, 12, 13, 14]" in message
    for reason in ("1 missing image", "1 wrong roles", "1 empty answer", "1 not valid JSON"):
        assert reason in message, reason


def test_conversation_dataset_skips_records_that_do_not_fit(scene_folder, tokenizers, caplog):
    builder = llama2_text_processor(tokenizers["chat"], 40, IMAGE_LENGTH)
    records = [Record(str(scene_folder / "images" / "a.png"), (("Q?", "yes"),), line=n) for n in range(1, 40)]
    records.append(Record(records[0].image, (("Q?", "a long answer " * 10),), line=40))
    with caplog.at_level("WARNING"):
        dataset = ConversationDataset(records, get_image_processor(28), builder, source="x.jsonl")
    assert len(dataset) == 39 and "x.jsonl line 40 skipped" in caplog.text
    sample = dataset[0]
    assert sample["image"].shape == (3, 28, 28) and int(sample["record_index"]) == 0
