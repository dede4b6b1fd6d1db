"""scripts/batch_infer.py in one process: a folder, webdataset shards and parquet files give the same answers;
unreadable images are error rows; JSON-lines and parquet outputs resume exactly once after a kill; SIGTERM
stops cleanly with one line on how to resume; bad flags and inputs are one error line each.
(The same on Ray: tests/test_batch_ray.py.)"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import filelock
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_inputs import QUERIES, by_key, command, flags, make_dataset, read_rows
from conftest import ROOT
from scripts.batch_infer import main
from utils.batch.outputs import result_schema
from utils.conversation import Conversation
from utils.generation_config import GenerationConfig
from utils.cli import add_inference_args
from utils.pipeline import load_pipeline
from utils.vision import load_image


@pytest.fixture(scope="module")
def golden_pipeline(golden):
    flags = ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
             "--device", "cpu"]
    return load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("batch")))


# A folder of images, on the golden model ------------------------------------------------------

def image_folder(tmp_path, golden):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(golden.image_path, folder / "a.png")
    shutil.copy(f"{ROOT}/assets/shapes.png", folder / "b.png")
    shutil.copy(f"{ROOT}/assets/house.png", folder / "sub" / "c.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image: skipped")
    return folder


def batch_infer(golden, folder, output, *extra):
    return main(["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
                 "--device", "cpu", "--images", str(folder), "--query", "What is in the image?", "--batch_size", "2",
                 "--max_new_tokens", "6", "--output", str(output), *extra])


def read_lines(output):
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_batch_infer_answers_every_image_and_records_unreadable_ones(golden, golden_pipeline, tmp_path, capsys):
    folder, output = image_folder(tmp_path, golden), tmp_path / "results.jsonl"
    assert batch_infer(golden, folder, output) == 0
    lines = read_lines(output)
    assert [line["file"] for line in lines] == ["a.png", "b.png", "broken.jpg", "sub/c.png"]
    assert "not a readable image" in lines[2]["error"] and "answer" not in lines[2]
    for line in lines[:2] + lines[3:]:
        image = load_image(str(folder / line["file"]))
        alone = golden_pipeline.chat(Conversation("chat", image), "What is in the image?",
                                     GenerationConfig(top_k=1, max_new_tokens=6))
        for _ in alone:
            pass
        assert (line["answer"], line["tokens"], line["finish_reason"]) == (alone.response, 6, "length"), line
    assert lines[0]["answer"] == golden_pipeline.processor.answer(golden["chat.gen_ids"].tolist()[:6])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"4 images, 4 rows (1 errors) written to {output} in ") and "images/s" in summary


def test_batch_infer_resumes_after_a_kill(golden, tmp_path):
    """A rerun skips the files already in the output, drops a half-written last line, appends the rest."""
    folder, output = image_folder(tmp_path, golden), tmp_path / "results.jsonl"
    earlier = {"file": "a.png", "answer": "written by the killed run", "tokens": 3, "finish_reason": "length"}
    output.write_text(json.dumps(earlier) + "\n" + '{"file": "b.png", "answ')
    assert batch_infer(golden, folder, output) == 0
    lines = read_lines(output)
    assert lines[0] == earlier  # not redone
    assert sorted(line["file"] for line in lines) == ["a.png", "b.png", "broken.jpg", "sub/c.png"]
    assert batch_infer(golden, folder, output) == 0  # nothing left to do
    assert read_lines(output) == lines


def test_batch_infer_bad_folder_is_one_error_line(golden, tmp_path, capsys):
    assert batch_infer(golden, tmp_path / "missing", tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --images") and "Traceback" not in err


# Webdataset shards and parquet, on the tiny scenes model --------------------------------------

def test_webdataset_and_parquet_inputs_answer_as_the_folder_does(dataset, tmp_path):
    """Two queries about the same images read five ways: every (key, query) gets one row, the same answer
    whatever the input; a broken JPEG and a webdataset sample without an image file are error rows."""
    listing = tmp_path / "list.txt"  # one line relative to the list's folder, the others absolute
    paths = sorted(os.path.join(dataset.folder, name) for name in os.listdir(dataset.folder))
    listing.write_text("\n".join([os.path.relpath(paths[0], tmp_path)] + paths[1:]) + "\n\n")
    runs = {"folder": ([dataset.folder], "folder.jsonl"), "list": ([str(listing)], "list.jsonl"),
            "webdataset": (dataset.shards, "shards.jsonl"),
            "parquet bytes": ([dataset.parquet, "--image_column", "jpg"], "bytes.parquet"),
            "parquet paths": ([dataset.parquet, "--image_column", "url"], "paths.jsonl")}
    results = {}
    for name, (images, output) in runs.items():
        assert main(flags(images, tmp_path / output)) == 0, name
        key_name = "file" if name in ("folder", "list") else "key"
        results[name] = {(os.path.basename(row.pop(key_name)).removesuffix(".jpg"), row["query"]): row
                         for row in by_key(read_rows(tmp_path / output), key_name).values()}
    expected_keys = {(key, query) for key in dataset.images for query in QUERIES}
    assert all(set(rows) == expected_keys for rows in results.values())
    for (key, query), row in results["folder"].items():
        picture = dataset.images[key]
        for name in ("list", "parquet bytes", "parquet paths", "webdataset"):
            other = results[name][(key, query)]
            if name == "webdataset" and key == "000010002":  # the sample without a jpg file
                assert "has no jpg/jpeg/png/webp file" in other["error"] and "answer" not in other
            elif picture is None:
                assert "is not a readable image" in other["error"], (name, other)
            else:
                assert {k: other[k] for k in ("answer", "tokens", "finish_reason")} == \
                       {k: row[k] for k in ("answer", "tokens", "finish_reason")}, (name, key, query)
        if picture is None:
            assert "is not a readable image" in row["error"] and set(row) == {"query", "error"}
        else:
            assert row["answer"] and 0 < row["tokens"] <= 12 and row["finish_reason"] in ("stop", "length")
    schema = pq.read_schema(next((tmp_path / "bytes.parquet").glob("part-*.parquet")))
    assert [(f.name, str(f.type)) for f in schema] == [("key", "string"), ("query", "string"), ("answer", "string"),
                                                       ("tokens", "int64"), ("finish_reason", "string"),
                                                       ("error", "string")]


def test_parquet_output_resumes_exactly_once(dataset, tmp_path):
    """A part left by an earlier run is kept, a hidden part a kill left half-written is removed, the rest is
    answered once; a second rerun adds nothing."""
    output = tmp_path / "out.parquet"
    output.mkdir()
    earlier = [{"key": key, "query": query, "answer": "EARLIER", "tokens": 1, "finish_reason": "stop", "error": None}
               for key in list(dataset.images)[:3] for query in QUERIES]
    pq.write_table(pa.Table.from_pylist(earlier, schema=result_schema("key", True)), output / "part-00000.parquet")
    (output / ".part-00001.parquet.partial-12345").write_bytes(b"PAR1 cut short")
    assert main(flags([dataset.parquet], output)) == 0
    rows = by_key(read_rows(output))
    assert set(rows) == {(key, query) for key in dataset.images for query in QUERIES}
    kept = [pair for pair, row in rows.items() if row.get("answer") == "EARLIER"]
    assert kept == [(row["key"], row["query"]) for row in earlier]
    assert sorted(os.listdir(output)) == ["part-00000.parquet", "part-00001.parquet"]
    assert main(flags([dataset.parquet], output)) == 0
    assert sorted(os.listdir(output)) == ["part-00000.parquet", "part-00001.parquet"]


def test_sigterm_stops_cleanly_and_a_rerun_finishes_exactly_once(tmp_path):
    """SIGTERM mid-run: exit 143, the rows done are in the output, one line says how to resume, no traceback
    (nor C++'s `terminate called`); the same command again writes each of the other files once."""
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(12):
        shutil.copy(f"{ROOT}/assets/scene_{index % 2 + 1}.png", folder / f"{index:02d}.png")
    output = tmp_path / "out.jsonl"
    run = command([str(folder)], output, queries=["Where is the circle?"], max_new_tokens=48, batch_size=1)
    process = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output.exists() and output.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    written = len(read_rows(output))
    assert last == (f"interrupted (SIGTERM): {written} rows written to {output} this run; run the same command "
                    "again to resume")
    assert 1 <= written < 12 and "Traceback" not in stderr and "terminate called" not in stderr
    assert main(run[2:]) == 0
    assert sorted(row["file"] for row in read_rows(output)) == [f"{index:02d}.png" for index in range(12)]


def test_an_unreadable_shard_is_one_error_line(tmp_path, capsys):
    broken = tmp_path / "00009.tar"
    broken.write_bytes(b"not a tar archive, " * 100)
    assert main(flags([str(broken)], tmp_path / "out.jsonl")) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {broken} cannot be read past the rows written so far")
    assert "Traceback" not in err


# Bad flags and inputs: one error line each, before any model loads ------------------------------

def test_flag_and_input_errors_are_one_line(dataset, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    (tmp_path / "one-query.jsonl").write_text(json.dumps({"file": "a.jpg", "answer": "x"}) + "\n")
    (tmp_path / "notes.jsonl").write_text('{"file": "a.jpg", "answer": "x"}\n["not", "a", "row"]\n{"file": "b.jpg"}\n')
    no_image = tmp_path / "no_image.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["x"]}), no_image)
    cases = [
        (flags([dataset.folder], out, "--workers", "2"), "--workers needs --ray"),
        (flags([dataset.folder], out, "--no_prompt"), "--no_prompt sends the image with an empty query"),
        (flags([dataset.folder], out, queries=["Same?", "Same?"]), "the query 'Same?' is asked twice"),
        (flags([dataset.folder], out, queries=[]), "no question to ask"),
        (flags([dataset.folder, *dataset.shards], out), "--images mixes files and webdataset inputs"),
        (flags([dataset.folder], out, "--key_column", "url"), "--key_column applies to parquet inputs only"),
        (flags([dataset.folder], out, "--image_column", "jpg"), "--image_column applies to webdataset and parquet"),
        (flags([str(no_image)], out), "has none of the columns image, jpg"),
        (flags([dataset.parquet], out, "--key_column", "id"), "has no column 'id' to key its rows by"),
        (flags([dataset.folder, dataset.folder], out), "twice; each input needs its own name"),
        (flags([dataset.folder], tmp_path / "one-query.jsonl"), "was written for one query; this run asks 2"),
        (flags([dataset.folder], tmp_path / "notes.jsonl", queries=["One?"]), "notes.jsonl line 2 is not a JSON"),
        (flags([dataset.folder], out, "--ray", "--workers", "0"), "--workers must be at least 1"),
        (flags([dataset.folder], out, "--ray", "--gpus_per_worker", "1"), "--device cpu with --gpus_per_worker"),
        (flags([dataset.folder], out, "--batch_size", "0"), "--batch_size must be at least 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
    with filelock.FileLock(str(tmp_path / ".out.jsonl.lock")):
        assert main(flags([dataset.folder], out)) == 1
    assert "another run is writing" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_the_batch_bench_runs():
    """bench/batch.py keeps working (numbers not judged): its one-process mode on a few scenes images."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "batch.py"), "--models", "scenes", "--images", "8",
                          "--modes", "one"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("scenes"))
    assert row[:4] == ["scenes", "one", "process", "8"] and float(row[5]) > 0, out.stdout
