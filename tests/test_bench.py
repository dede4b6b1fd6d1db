"""The benchmarks keep working (numbers not judged): bench/generate.py on every path, int8 and int4 included,
bench/big_model.py, bench/linear.py, bench/attention.py and bench/accuracy.py on tiny shapes."""
import json
import os
import subprocess
import sys

from conftest import ROOT

from models.kernels import native
from models.kernels.cpu import native_bf16


def run_bench(*flags, rounds=1):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "generate.py"), "--config", "tiny",
                          "--repeats", "1", "--rounds", str(rounds), "--new_tokens", "4", "--threads", "1", *flags],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed" not in out.stdout, out.stdout
    return out.stdout


def rows_of(stdout):
    return [line.split() for line in stdout.splitlines() if line.startswith(("ours", "upstream"))]


def test_bench_prints_a_row_per_path_dtype_and_batch():
    stdout = run_bench("--dtype", "fp32", "--quant", "0", "--path", "ours", "upstream", "--batch", "1", "2", rounds=2)
    assert "round 2 of 2 done" in stdout  # every row ran once per round
    rows = rows_of(stdout)
    assert [(r[0], r[3]) for r in rows] == [("ours", "1"), ("ours", "2"), ("upstream", "1")]
    for row in rows:
        prefill_s, tokens_per_s = float(row[4]), float(row[5])
        assert prefill_s >= 0 and tokens_per_s > 0  # the tiny prefill may print as 0.00 s
        low, high = (float(t) for t in row[6].strip("()").split("-"))
        assert low <= tokens_per_s <= high  # the median of the rounds' runs, within their range


def test_bench_quantized_rows_and_ratios():
    stdout = run_bench("--dtype", "fp32", "--path", "ours", "--batch", "1", "--quant", "0", "8", "4")
    rows = rows_of(stdout)
    assert [row[2] for row in rows] == ["-", "8", "4"] and all(float(row[5]) > 0 for row in rows)
    ratios = [line.split() for line in stdout.splitlines()[-3:]]
    assert [r[:2] for r in ratios] == [["fp32", "-"], ["fp32", "8"], ["fp32", "4"]]
    assert ratios[0][3] == "1.00x"  # fp32 against itself


def test_big_model_bench_writes_loads_and_deletes_its_checkpoint(tmp_path):
    """bench/big_model.py's steps on the tiny shape: write shard by shard, load with --quant 8 and 4, delete."""
    directory = tmp_path / "checkpoint"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "big_model.py"), "--dir", str(directory),
                          "--shape", "tiny", "--threads", "1", "--new_tokens", "2", "--repeats", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "failed" not in out.stdout, out.stderr[-2000:] + out.stdout
    assert out.stdout.count("prefill") == 2 and "--quant 8: base" in out.stdout and "--quant 4: base" in out.stdout
    assert not directory.exists()


def test_linear_bench_times_every_kernel():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "linear.py"), "--threads", "1", "--rows", "1",
                          "200", "--in_features", "128", "--out_features", "192", "--weights_mb", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("fp32", "bf16", "int8", "int4"))]
    # oneDNN packs bf16 only on CPUs with bf16 instructions; every other kernel runs on every x86 CPU
    lacking = set() if native_bf16() else {"bf16 oneDNN prepacked"}
    assert len(rows) == 13 and all(("n/a" in row) == row.startswith(tuple(lacking)) for row in rows), \
        out.stdout + out.stderr[-2000:]
    assert sum(row.count("*") for row in rows) == 2 * 4  # one kernel used per dtype and row count


def test_attention_bench_times_torchs_kernels_and_ours_where_built():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "attention.py"), "--threads", "1", "--heads", "2",
                          "--head_dim", "16", "--length", "20", "--layers", "2", "--repeats", "1", "--batch", "1", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("SDPA", "ours"))]
    assert len(rows) == (4 if native.available() else 2), out.stdout
    assert all(len(row.split("(")) == 3 for row in rows), out.stdout  # a time and a bandwidth per batch size


def test_accuracy_bench_scores_every_model_at_a_precision(tmp_path):
    output = tmp_path / "accuracy.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), "--precisions", "int8",
                          "--count", "4", "--threads", "1", "--output", str(output)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = json.loads(output.read_text()).values()
    assert result["golden"]["greedy_total"] == 64 and 0 <= result["golden"]["greedy_kept"] <= 64
    assert result["cogvlm-tiny-captcha"]["count"] == 4 and result["cogvlm-tiny-scenes"]["count"] == 4
    assert out.stdout.splitlines()[-1].startswith("int8")


def test_chat_turns_bench_on_the_tiny_shape():
    """bench/chat_turns.py: per turn a TTFT with and without the prefix cache, answers alike, the ratio line."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "chat_turns.py"), "--config", "tiny", "--repeats",
                          "1", "--max_new_tokens", "4", "--threads", "1", "--quant", "0", "4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith(("fp32 turn", "int4 turn")) for line in lines) == 6
    assert "fp32: greedy answers with and without the cache equal" in out.stdout
    assert "int4: greedy answers with and without the cache equal" in out.stdout
    assert lines[-1].startswith("turn-2 TTFT / turn-1 TTFT: ") and lines[-1].endswith("(int4)")
