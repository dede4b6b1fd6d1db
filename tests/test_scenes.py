"""The synthetic scenes: the generator is seeded and byte-for-byte deterministic, its records are valid
JSONL conversations with correct answers, and the shipped scene model answers unseen scenes."""
import hashlib
import json
import os
import random
import re
import sys

import torch
from PIL import Image

import evaluate_demo
from conftest import ROOT, free_port, running_server
from scripts import scenes_cli_demo
from scripts.make_scene_dataset import COLOURS, KINDS, SIZE, make_scene_dataset, render_scene
from utils.dataset import read_jsonl
from utils.grounding import parse_boxes

SHIPPED = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")


def _digests(folder):
    return {name: hashlib.md5(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(folder) for name in names}


def test_same_seed_gives_the_same_files_byte_for_byte(tmp_path):
    make_scene_dataset(str(tmp_path / "a"), 12, seed=3, progress=False)
    make_scene_dataset(str(tmp_path / "b"), 12, seed=3, progress=False)
    make_scene_dataset(str(tmp_path / "c"), 12, seed=4, progress=False)
    first, second, other = (_digests(tmp_path / n) for n in "abc")
    assert len(first) == 13 and first == second  # 12 images + data.jsonl
    assert first["data.jsonl"] != other["data.jsonl"]


def test_records_are_valid_conversations_with_true_answers(tmp_path):
    path = make_scene_dataset(str(tmp_path), 60, seed=11, max_turns=3, progress=False)
    records = read_jsonl(path)  # raises on a bad record
    assert len(records) == 60
    types = {r.type for r in records}
    assert types >= {"colour", "shape", "count", "exist", "relation", "grounding", "caption"}
    assert any(len(r.turns) > 1 for r in records) and all(1 <= len(r.turns) <= 3 for r in records)
    colour_names = {name: rgb for name, rgb in COLOURS.items()}
    for record in records:
        image = Image.open(record.image).convert("RGB")
        assert image.size == (SIZE, SIZE)
        for query, answer in record.turns:
            boxes = parse_boxes(answer)
            if query.startswith("Where is the") or query.startswith("Find the"):
                (box,) = boxes
                colour = query.split("the ")[1].split()[0]
                # the box's centre pixel has the shape's colour (within the generator's jitter)
                x0, y0, x1, y1 = box.relative
                centre = image.getpixel(((x0 + x1) * SIZE // 2000, (y0 + y1) * SIZE // 2000))
                if query.split()[-1].rstrip("?.") in ("circle", "square"):  # solid at the centre
                    assert max(abs(a - b) for a, b in zip(centre, colour_names[colour])) <= 20, (query, centre)
            elif query.startswith("What colour"):
                assert answer in COLOURS
            elif query.startswith("What shape") or query.startswith("Which shape"):
                assert answer in KINDS
            elif query.startswith("Is "):
                assert answer in ("yes", "no")
            elif query.startswith("How many"):
                assert 0 <= int(answer) <= 4


def test_max_chars_bounds_the_text_of_a_record(tmp_path):
    path = make_scene_dataset(str(tmp_path), 40, seed=2, max_turns=10, min_turns=10, max_chars=150, progress=False)
    for line in open(path):
        record = json.loads(line)
        text = sum(len(m["content"]) for m in record["conversations"])
        first = sum(len(m["content"]) for m in record["conversations"][:2])
        assert text <= max(150, first)  # a first turn longer than the budget stays alone


def test_shipped_scene_model_answers_unseen_scenes(tmp_path):
    """The shipped model at its measured level on 200 unseen scenes (bench/RESULTS.md, "Tiny scenes model
    on a grid"), less about one standard error of that many answers: far above chance (about 40% without
    boxes, 0 with)."""
    data = make_scene_dataset(str(tmp_path / "unseen"), 200, seed=424242, progress=False)  # training: seed 0
    output = tmp_path / "eval.json"
    # no --local_tokenizer / --version: the checkpoint carries both
    assert evaluate_demo.main(["--from_pretrained", SHIPPED, "--device", "cpu", "--data", data,
                               "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["count"] == 200
    assert results["acc"] >= 0.87, results["by_type"]
    assert results["grounding_iou50"] >= 0.28, results["by_type"]


def test_readme_command_1_answers_unseen_scenes_through_the_cli(tmp_path, capsys):
    assert scenes_cli_demo.main(["--count", "2", "--questions", "3", "--grounding_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    answers = re.findall(r"expected (.+?)\s+answer (.+?)\s+(ok|WRONG)$", printed, re.M)
    assert len(answers) == 6 and all(answer.strip() for _, answer, _ in answers), printed
    summary = re.search(r"exact match (\d+)/(\d+) .* grounding IoU>=0.5 (\d+)/(\d+)", printed)
    assert summary and int(summary[2]) + int(summary[4]) == 6, printed
    assert int(summary[1]) + int(summary[3]) == sum(verdict == "ok" for *_, verdict in answers)
    # every grounding question is asked once per scene: the CLI saved a picture with the drawn box for each
    pictures = re.search(r"grounding pictures \(boxes drawn by the CLI\): (.+)", printed)[1].split(", ")
    assert len(pictures) >= 2 and all(os.path.isfile(p) and p.startswith(str(tmp_path)) for p in pictures)


def test_web_demo_on_the_scene_model_with_no_other_flag_answers(tmp_path):
    from gradio_client import Client, handle_file

    image, shapes = render_scene(random.Random(99))
    image.save(tmp_path / "scene.png")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "web_demo.py", "--from_pretrained", SHIPPED, "--port", str(port)]
    with running_server(command, url, str(tmp_path / "server.log"),
                        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}):
        client = Client(url, verbose=False)
        answer, _ = client.predict(handle_file(str(tmp_path / "scene.png")), "How many shapes are there?", [],
                                   api_name="/chat")
        # the checkpoint's tokenizer and chat template were picked up: a count, not noise
        assert answer.strip() in {"0", "1", "2", "3", "4"}, answer
        answer, _ = client.predict(handle_file(str(tmp_path / "scene.png")), f"Where is the {shapes[0].name}?", [],
                                   api_name="/chat")
        assert len(parse_boxes(answer)) == 1, answer  # grounding mode from the checkpoint: a box


def test_scene_tokenizer_writes_a_coordinate_as_two_digit_and_one_digit_pieces():
    from utils.language import llama2_tokenizer

    tokenizer = llama2_tokenizer(os.path.join(ROOT, "scripts", "tiny_scenes", "tokenizer"), "chat")
    assert tokenizer.tokenize("[[080,776,285,982]]") == ["[[", "08", "0", ",", "77", "6", ",", "28", "5", ",", "98",
                                                         "2", "]]"]
    text = "Is the purple star to the left of the orange triangle?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split()) + 1  # a piece per word, and "?"
    assert tokenizer.decode(ids) == text


def test_sincos_vit_positions_give_every_patch_its_own_unit_code():
    from models.cogvlm_model import CogVLMModel
    from utils.training import VIT_POSITIONS, init_from_scratch_, sincos_positions

    codes = sincos_positions(8, 128)  # (64 patches, 128 channels)
    assert codes.shape == (64, 128) and torch.allclose(codes.pow(2).mean(), torch.tensor(1.0), atol=0.02)
    assert torch.cdist(codes, codes).add(torch.eye(64) * 1e3).min() > 0.5  # no two patches share a code
    # the first half of the channels depends on the row only, the second on the column only
    grid = codes.reshape(8, 8, 128)
    assert torch.equal(grid[:, 0, :64], grid[:, 5, :64]) and torch.equal(grid[0, :, 64:], grid[3, :, 64:])

    config = json.load(open(os.path.join(ROOT, "scripts", "tiny_scenes", "model_config.json")))
    model = CogVLMModel(CogVLMModel.get_args(**config, skip_init=True, mode="finetune", device="cpu", fp16=False,
                                             bf16=False, use_gpu_initialization=False, deepspeed=None))
    init_from_scratch_(model, seed=0, vit_positions="sincos")
    positions = next(p for n, p in model.named_parameters() if n.endswith(VIT_POSITIONS)).detach()
    grid = config["eva_args"]["image_size"][0] // config["eva_args"]["patch_size"]
    assert torch.equal(positions[1:], sincos_positions(grid, 128))
    assert positions[0].std() > 0.5  # the class token's stays random
