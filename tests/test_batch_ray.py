"""scripts/batch_infer.py --ray on a local Ray cluster (2 CPUs, 2 actors with the tiny scenes model): the rows equal
the one-process mode's row for row (greedy) for a folder, webdataset shards and parquet, bad images included; a
worker killed mid-run is retried by Ray and every input still has exactly one row; a driver stopped by SIGINT
exits 130 with one line on how to resume, and the rerun finishes exactly once. One cluster for the module (Ray
takes seconds to start), one Ray run per case."""
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
import ray

from batch_inputs import QUERIES, by_key, command, flags, make_dataset, read_rows
from conftest import ROOT
from scripts.batch_infer import main

RAY = ["--ray", "--workers", "2", "--threads_per_worker", "1"]
WORKER_TITLE = "MapWorker(MapBatches(CaptionWorker))"  # Ray's process title for our actors


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster in this process (the driver); yields its address for other drivers to join."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("batch-ray")), count=32)


def one_process_rows(images, tmp_path, key_name="key", **kwargs):
    output = tmp_path / "one-process.jsonl"
    assert main(flags(images, output, **kwargs)) == 0
    return by_key(read_rows(output), key_name)


def test_ray_rows_equal_the_one_process_rows(cluster, dataset, tmp_path, capsys):
    """A folder, two queries, parquet out: the same rows as one process, broken images as error rows."""
    expected = one_process_rows([dataset.folder], tmp_path, "file")
    output = tmp_path / "ray.parquet"
    assert main(flags([dataset.folder], output, *RAY)) == 0
    rows = by_key(read_rows(output), "file")
    assert rows == expected and len(rows) == len(dataset.images) * len(QUERIES)
    assert sum("error" in row for row in rows.values()) == len(QUERIES) * 4  # the four broken JPEGs
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"32 images, 64 rows (8 errors) written to {output} in ") and "images/s" in summary


def our_workers(started_after: float):
    return [process for process in psutil.process_iter(["cmdline", "create_time"])
            if WORKER_TITLE in " ".join(process.info["cmdline"] or []) and process.info["create_time"] >= started_after]


def test_a_worker_killed_mid_run_is_retried_and_every_input_has_one_row(cluster, dataset, tmp_path, capfd):
    """SIGKILL one of the two actors while it runs a task: Ray restarts it and retries the task; the output
    has exactly the one-process rows, none lost, none twice (webdataset shards in)."""
    expected = one_process_rows(dataset.shards, tmp_path, max_new_tokens=48)
    output, killed = tmp_path / "ray.jsonl", {}
    started = time.time() - 1  # process start times are rounded

    def kill_a_busy_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = [process for process in our_workers(started) if ".submit" in " ".join(process.info["cmdline"])]
            if busy:
                killed.update(rows=len(read_rows(output)) if output.exists() else 0, pid=busy[0].pid)
                os.kill(busy[0].pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    assert main(flags(dataset.shards, output, *RAY, max_new_tokens=48, batch_size=1)) == 0
    killer.join()
    assert killed and killed["rows"] < len(expected), killed  # it died mid-run
    assert not psutil.pid_exists(killed["pid"])
    assert by_key(read_rows(output)) == expected
    assert f"pid={killed['pid']}" in capfd.readouterr().err  # Ray reported the dead worker


def test_an_interrupted_driver_resumes_exactly_once(cluster, dataset, tmp_path):
    """A second driver joins the cluster by address (parquet in), gets SIGINT after its first rows: exit 130,
    one line on how to resume, no traceback; the same command again (here, from this driver) finishes with
    each input's rows exactly once."""
    expected = one_process_rows([dataset.parquet], tmp_path, max_new_tokens=48)
    output = tmp_path / "ray.jsonl"
    run = command([dataset.parquet], output, "--ray", cluster, *RAY[1:], max_new_tokens=48, batch_size=1)
    process = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output.exists() and output.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    written = len(read_rows(output))
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (f"interrupted (SIGINT): {written} rows written to {output} this run; "
                                                "run the same command again to resume")
    assert 1 <= written < len(expected) and "Traceback" not in stderr and "terminate called" not in stderr
    assert main(flags([dataset.parquet], output, *RAY, max_new_tokens=48, batch_size=1)) == 0
    assert by_key(read_rows(output)) == expected


def test_a_missing_checkpoint_and_an_unreadable_shard_are_one_error_line(cluster, dataset, tmp_path, capfd):
    """A checkpoint no actor could load is found missing on the driver; a shard that is not a tar fails in its
    Ray read task, and the driver prints that task's error as one line, as one process does."""
    missing = flags([dataset.folder], tmp_path / "a.jsonl", *RAY) + ["--from_pretrained", str(tmp_path / "nothing"),
                                                                     "--local_files_only"]
    assert main(missing) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"'{tmp_path / 'nothing'}' does not exist" in last, last
    broken = tmp_path / "00009.tar"
    broken.write_bytes(b"not a tar archive, " * 100)
    assert main(flags([str(broken)], tmp_path / "b.jsonl", *RAY)) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {broken} cannot be read past the rows written so far (ReadError"), last
