"""Bad input to the checkpoint writers and finetune resume: merge_model.py and scripts/convert_checkpoint.py
answer bad flags, bad configs and bad weights with one `error:` line and write nothing; a killed or
disk-full write leaves nothing that looks like a checkpoint and a rerun works; a finetune run resumes from
its newest complete iteration when `latest` is empty or the newest one is truncated."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import merge_model
from conftest import GOLDEN_DIR, ROOT
from models.checkpoint.sat_format import SAVE_COMPLETE, iteration_problem, resumable_iteration, shard_file_name
from models.errors import CogVLMError
from scripts import convert_checkpoint
from utils import training

SAT = os.path.join(GOLDEN_DIR, "checkpoint")
HF = os.path.join(ROOT, "tests", "golden", "tiny-small-hf")
SHARD = os.path.join("1", shard_file_name(0))


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def nothing_left(parent, name):
    """No `name` in `parent`, and nothing hidden that a rerun would trip over."""
    left = [entry for entry in os.listdir(parent) if entry == name or entry.startswith(f".{name}.partial-")]
    assert not left, left


def copy_with_config(tmp_path, source, change, config_name):
    """A copy of checkpoint `source` whose config file is changed by `change(text) -> text`."""
    target = tmp_path / "changed"
    shutil.copytree(source, target)
    path = target / config_name
    path.write_text(change(path.read_text()))
    return str(target)


def json_change(**fields):
    def change(text):
        return json.dumps({**json.loads(text), **fields})
    return change


# merge_model.py ------------------------------------------------------------------------------

def run_merge(capsys, *argv):
    rc = merge_model.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def sat_variant(tmp_path, name):
    """A broken copy of the golden SAT checkpoint, named by what is wrong with it."""
    if name in CONFIG_VARIANTS:
        return copy_with_config(tmp_path, SAT, CONFIG_VARIANTS[name][0], "model_config.json")
    target = tmp_path / "broken"
    shutil.copytree(SAT, target)
    if name == "truncated_shard":
        data = (target / SHARD).read_bytes()
        (target / SHARD).write_bytes(data[: len(data) // 2])
    elif name == "no_latest":
        (target / "latest").unlink()
    elif name == "empty_latest":
        (target / "latest").write_text("")
    elif name == "latest_names_a_missing_folder":
        (target / "latest").write_text("7")
    return str(target)


CONFIG_VARIANTS = {  # the probe's tracebacks; the message part each error names
    "hidden_size_not_the_weights": (json_change(hidden_size=128), "(1000, 64) but the config asks for (1000, 128)"),
    "config_is_a_list": (lambda text: "[1, 2]", "JSON object"),
    "num_layers_is_text": (json_change(num_layers="two"), "num_layers"),
    "config_not_json": (lambda text: text[:-20], "not valid JSON"),
    "vocab_size_negative": (json_change(vocab_size=-5), "vocab_size"),
}
WEIGHT_VARIANTS = {"truncated_shard": "corrupt or incomplete", "no_latest": "'latest'", "empty_latest": "is empty",
                   "latest_names_a_missing_folder": "missing"}


@pytest.mark.parametrize("name", list(CONFIG_VARIANTS) + list(WEIGHT_VARIANTS))
def test_merge_refuses_a_bad_checkpoint_and_writes_nothing(tmp_path, capsys, name):
    source = sat_variant(tmp_path, name)
    rc, out, err = run_merge(capsys, "--from_pretrained", source, "--save", str(tmp_path / "out"))
    assert rc == 1
    expected = CONFIG_VARIANTS[name][1] if name in CONFIG_VARIANTS else WEIGHT_VARIANTS[name]
    assert expected in one_error_line(err)
    assert "saved" not in out
    nothing_left(tmp_path, "out")


@pytest.mark.parametrize("flags,message", [
    (["--model_parallel_size", "0"], "--model_parallel_size"),
    (["--model_parallel_size", "3"], "divisible"),
    (["--fp16", "--bf16"], "exclusive"),
])
def test_merge_bad_flags(tmp_path, capsys, flags, message):
    rc, _, err = run_merge(capsys, "--from_pretrained", SAT, "--save", str(tmp_path / "out"), *flags)
    assert rc == 1 and message in one_error_line(err)
    nothing_left(tmp_path, "out")


def test_merge_bad_save_places(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    rc, _, err = run_merge(capsys, "--from_pretrained", SAT, "--save", str(tmp_path / "a_file"))
    assert rc == 1 and "exists and is a file" in one_error_line(err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    rc, _, err = run_merge(capsys, "--from_pretrained", SAT, "--save", str(tmp_path / "full"))
    assert rc == 1 and "not empty" in one_error_line(err)
    rc, _, err = run_merge(capsys, "--from_pretrained", SAT, "--save", SAT)
    assert rc == 1 and "--save must differ" in one_error_line(err)
    rc, _, err = run_merge(capsys, "--from_pretrained", str(tmp_path / "nowhere"), "--save", str(tmp_path / "o"))
    assert rc == 1 and "nowhere" in one_error_line(err)
    assert (tmp_path / "a_file").read_text() == "x" and os.listdir(tmp_path / "full") == ["something"]


# scripts/convert_checkpoint.py ---------------------------------------------------------------

def run_convert(capsys, *argv):
    rc = convert_checkpoint.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def hf_variant(tmp_path, name):
    if name == "hidden_size_not_the_weights":
        return copy_with_config(tmp_path, HF, json_change(hidden_size=128), "config.json")
    if name == "config_is_a_list":
        return copy_with_config(tmp_path, HF, lambda text: "[]", "config.json")
    target = tmp_path / "broken-hf"
    shutil.copytree(HF, target)
    weights = target / "model.safetensors"
    if name == "truncated_safetensors":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif name == "no_weights":
        weights.unlink()
    return str(target)


HF_VARIANTS = {"hidden_size_not_the_weights": "128", "config_is_a_list": "JSON object",
               "truncated_safetensors": "model.safetensors", "no_weights": "safetensors"}


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_convert_hf_to_sat_refuses_a_bad_checkpoint(tmp_path, capsys, name):
    rc, _, err = run_convert(capsys, hf_variant(tmp_path, name), str(tmp_path / "out"))
    assert rc == 1 and HF_VARIANTS[name] in one_error_line(err)
    nothing_left(tmp_path, "out")


def test_convert_bad_flags_and_places(tmp_path, capsys):
    rc, _, err = run_convert(capsys, SAT, str(tmp_path / "out"), "--max_shard_size", "lots")
    assert rc == 1 and "lots" in one_error_line(err)
    (tmp_path / "a_file").write_text("x")
    rc, _, err = run_convert(capsys, SAT, str(tmp_path / "a_file"))
    assert rc == 1 and "exists and is a file" in one_error_line(err)
    rc, _, err = run_convert(capsys, sat_variant(tmp_path, "num_layers_is_text"), str(tmp_path / "out"))
    assert rc == 1 and "num_layers" in one_error_line(err)
    nothing_left(tmp_path, "out")


def test_loading_a_mismatched_checkpoint_names_the_tensor(tmp_path, monkeypatch, capsys, golden):
    import io
    import cli_demo

    source = copy_with_config(tmp_path, SAT, json_change(hidden_size=128), "model_config.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nhi\n"))
    rc = cli_demo.main(["--from_pretrained", source, "--local_tokenizer", golden.tokenizer_dir])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "transformer.word_embeddings.weight" in line and "(1000, 64)" in line and "(1000, 128)" in line


# Killed and disk-full writes (subprocesses) ----------------------------------------------------

KILL_MID_WRITE = textwrap.dedent("""
    import io, os, signal, sys
    import torch, safetensors.torch
    import models.checkpoint.hf_format as hf_format

    def half_then_die(to_bytes):
        def patched(obj, path, *args, **kwargs):
            data = to_bytes(obj, *args, **kwargs)
            with open(path, "wb") as f:  # half a file under its real name, then the kill
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return patched

    def torch_bytes(obj, *args, **kwargs):
        buffer = io.BytesIO()
        real_torch_save(obj, buffer, *args, **kwargs)
        return buffer.getvalue()

    real_torch_save = torch.save
    torch.save = half_then_die(torch_bytes)
    hf_format.save_file = half_then_die(safetensors.torch.save)
    what, argv = sys.argv[1], sys.argv[2:]
    if what == "merge":
        import merge_model
        merge_model.main(argv)
    else:
        from scripts import convert_checkpoint
        convert_checkpoint.main(argv)
""")


@pytest.mark.parametrize("what,source", [("merge", SAT), ("convert", SAT), ("convert", HF)])
def test_killed_write_leaves_no_checkpoint_and_a_rerun_works(tmp_path, capsys, what, source):
    out = tmp_path / "out"
    argv = ["--from_pretrained", source, "--save", str(out)] if what == "merge" else [source, str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, what, *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()  # the partial write sits in a hidden .out.partial-<pid>, never under the name
    rc, _, err = run_merge(capsys, *argv) if what == "merge" else run_convert(capsys, *argv)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the rerun removed the killed one's partial directory
    assert "model_config.json" in os.listdir(out) or "config.json" in os.listdir(out)


DISK_FULL = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    import merge_model
    from scripts import convert_checkpoint

    sat, hf, root = sys.argv[1:4]
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # no file over 300 kB: a full disk
    results = {}
    for name, main, argv in [("merge", merge_model.main, ["--from_pretrained", sat, "--save", root + "/merged"]),
                             ("sat_to_hf", convert_checkpoint.main, [sat, root + "/hf"]),
                             ("hf_to_sat", convert_checkpoint.main, [hf, root + "/sat"])]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results[name] = [rc, err.getvalue()]
    print(json.dumps(results))
""")


def test_disk_full_is_one_error_line_and_leaves_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-c", DISK_FULL, SAT, HF, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (rc, err) in results.items():
        assert rc == 1, (name, err)
        assert "no space left" in one_error_line(err), name
    assert os.listdir(tmp_path) == []


# Finetune resume -----------------------------------------------------------------------------

def make_run(root, iterations, marker=False, mp_size=1, latest=None):
    """A training-run folder as SAT writes it: model_config.json, latest, <it>/mp_rank_XX_model_states.pt."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    (root / "model_config.json").write_text(json.dumps({"model_parallel_size": mp_size}))
    for iteration in iterations:
        folder = root / str(iteration)
        folder.mkdir()
        for rank in range(mp_size):
            torch.save({"module": {"w": torch.ones(64)}, "iteration": iteration}, folder / shard_file_name(rank))
        if marker:
            (folder / SAVE_COMPLETE).write_text("")
    (root / "latest").write_text(str(iterations[-1]) if latest is None else latest)
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_skips_what_is_incomplete_and_says_why(tmp_path):
    run = make_run(tmp_path / "empty-latest", [2, 4], latest="")
    assert resumable_iteration(str(run)) == ("4", [("latest", "the file is empty")])

    run = make_run(tmp_path / "truncated", [2, 4, 6])
    truncate(run / "6" / shard_file_name(0))
    iteration, skipped = resumable_iteration(str(run))
    assert iteration == "4" and skipped[0][0] == "6" and "truncated" in skipped[0][1]

    run = make_run(tmp_path / "missing-shard", [2, 4], mp_size=2)
    (run / "4" / shard_file_name(1)).unlink()
    assert resumable_iteration(str(run)) == ("2", [("4", f"{shard_file_name(1)} is missing")])

    run = make_run(tmp_path / "unfinished", [2, 4], marker=True)
    (run / "4" / SAVE_COMPLETE).unlink()  # e.g. killed before ZeRO's optimizer files
    iteration, skipped = resumable_iteration(str(run))
    assert iteration == "2" and "did not finish" in skipped[0][1]

    run = make_run(tmp_path / "latest-elsewhere", [2], latest="9")
    iteration, skipped = resumable_iteration(str(run))
    assert iteration == "2" and skipped[0][0] == "latest" and "'9'" in skipped[0][1]

    run = make_run(tmp_path / "nothing", [2])
    truncate(run / "2" / shard_file_name(0))
    assert resumable_iteration(str(run))[0] is None
    assert iteration_problem(str(run / "8")) == "the folder does not exist"


def test_find_resume_dir_takes_the_newest_run_with_a_complete_checkpoint(tmp_path, caplog):
    older = make_run(tmp_path / "exp-01-01-10-00", [2])
    newer = make_run(tmp_path / "exp-01-01-11-00", [2])
    truncate(newer / "2" / shard_file_name(0))
    os.utime(older, (1, 1))
    assert training.find_resume_dir(str(tmp_path), "exp") == str(older)
    newest = make_run(tmp_path / "exp-01-01-12-00", [2, 4], latest="")
    truncate(newest / "4" / shard_file_name(0))
    assert training.find_resume_dir(str(tmp_path), "exp") == str(newest)
    with caplog.at_level("WARNING"):
        assert training.resume_iteration(str(newest)) == "2"
    warnings = [record.getMessage() for record in caplog.records]
    assert any("latest" in w and "empty" in w for w in warnings) and any("skipped 4" in w and "truncated" in w
                                                                        for w in warnings)
    with pytest.raises(CogVLMError, match="no complete checkpoint"):
        training.resume_iteration(str(newer))
    assert training.find_resume_dir(str(tmp_path), "other") is None


def test_finetune_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_checkpoint):
    """A run killed while writing its newest checkpoint, `latest` emptied by the kill: the next start resumes
    from the iteration before, with a warning naming what it skipped and why."""
    from scripts.make_captcha_dataset import make_dataset

    data = tmp_path / "train"
    make_dataset(str(data), 4, "clean", seed=3)
    config = json.load(open(os.path.join(ROOT, "scripts", "ds_config_cpu.json")))
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(config))
    command = [sys.executable, "finetune_demo.py", "--from_pretrained", tiny_checkpoint, "--full_finetune",
               "--local_tokenizer", os.path.join(GOLDEN_DIR, "tokenizer"), "--version", "base", "--max_length", "64",
               "--mode", "pretrain", "--train-iters", "2", "--lr", "1e-3", "--train-data", str(data), "--split", "1.",
               "--deepspeed_config", str(tmp_path / "ds.json"), "--num-workers", "0", "--log-interval", "1",
               "--save", str(tmp_path / "runs"), "--save-interval", "1", "--experiment-name", "resume",
               "--final_save", str(tmp_path / "final"), "--seed", "1", "--summary-dir", str(tmp_path / "summary")]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def finetune(*extra):
        return subprocess.run(command + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    first = finetune("--exit-interval", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "1" / SAVE_COMPLETE).is_file() and (run_dir / "2" / SAVE_COMPLETE).is_file()
    truncate(run_dir / "2" / shard_file_name(0))
    (run_dir / "latest").write_text("")
    second = finetune()
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert f"resumed {run_dir} at iteration 1" in log
    assert "skipped latest: the file is empty" in log and "skipped 2: mp_rank_00_model_states.pt is truncated" in log
    assert (run_dir / "latest").read_text().strip() == "2" and resumable_iteration(str(run_dir)) == ("2", [])
