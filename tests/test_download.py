"""Weights by name: released SAT zips and HF-format hub repos downloaded through huggingface_hub, from a
stand-in hub on 127.0.0.1 (tests/hub_stub.py).

The CLI runs as a subprocess, because huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it
is imported; each gets its own SAT_HOME and HF_HOME. The archive's padding makes it larger than the
library's 10 MiB write chunk, so that a download killed half-way has written a partial file.
"""
import glob
import hashlib
import io
import os
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT
from hub_stub import HubStub
from models.checkpoint.download import check_free_space, is_hub_repo_id, unpack_checkpoint_zip
from models.errors import CheckpointError
from models.releases import DEFAULT_CHECKPOINT, RELEASED_CHECKPOINTS, SAT_HUB_REPO

NAME = DEFAULT_CHECKPOINT
ZIP = RELEASED_CHECKPOINTS[NAME].zip_file
SAT_REPO = SAT_HUB_REPO
HF_REPO = "tiny/cogvlm-tiny-hf"
HF_GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny-small-hf")
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what a killed transfer has written
NEW_TOKENS = 16


def checkpoint_zip(checkpoint_dir: str, top: str = "", padding: int = 0, compression=zipfile.ZIP_STORED) -> bytes:
    """A zip of a SAT checkpoint directory, its members under `top` ('' = at the top), plus `padding` bytes of
    incompressible data in an extra member."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for folder, _, files in os.walk(checkpoint_dir):
            for file in sorted(files):
                path = os.path.join(folder, file)
                archive.write(path, top + os.path.relpath(path, checkpoint_dir))
        if padding:
            archive.writestr(top + "padding.bin", os.urandom(padding))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released_zip(golden):
    return checkpoint_zip(golden.checkpoint, top=f"{NAME}/", padding=CHUNK + (2 << 20))


@pytest.fixture
def hub(released_zip):
    stub = HubStub().start()
    stub.add_file(SAT_REPO, ZIP, released_zip)
    stub.add_file(SAT_REPO, "README.md", b"SAT checkpoints of CogVLM\n")
    for file in ("config.json", "model.safetensors", "README.md"):
        stub.add_file(HF_REPO, file, open(os.path.join(HF_GOLDEN, file), "rb").read())
    yield stub
    stub.stop()


def hub_env(tmp_path, endpoint: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "SAT_HOME")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), SAT_HOME=str(tmp_path / "sat"),
               OMP_NUM_THREADS="1", **extra)
    return env


def cli_command(golden, checkpoint: str, *flags: str) -> list:
    case = golden.case("chat")
    return [sys.executable, "cli_demo.py", "--from_pretrained", checkpoint, "--local_tokenizer", golden.tokenizer_dir,
            "--version", "chat", "--english", "--top_k", "1", "--max_length", str(case["seq_len"] + NEW_TOKENS), *flags]


def cli_stdin(golden) -> str:
    return f"{golden.image_path}\n{golden.case('chat')['query']}\nstop\n"


def start_cli(golden, env, checkpoint=NAME, *flags, log=None):
    return subprocess.Popen(cli_command(golden, checkpoint, *flags), cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log or subprocess.PIPE, text=True)


def run_cli(golden, env, checkpoint=NAME, *flags):
    return subprocess.run(cli_command(golden, checkpoint, *flags), cwd=ROOT, env=env, input=cli_stdin(golden),
                          capture_output=True, text=True, timeout=300)


def golden_answer(golden, tokenizers) -> str:
    ids = golden["chat.gen_ids"].tolist()
    return tokenizers["chat"].decode(ids, skip_special_tokens=True).replace("</s>", "").strip()


def answer_of(stdout: str) -> str:
    answers = [line.split("Model: ", 1)[1] for line in stdout.splitlines() if "Model: " in line]
    assert len(answers) == 1, stdout
    return answers[0]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def partial_blobs(tmp_path) -> list:
    return glob.glob(str(tmp_path / "hf" / "hub" / "models--*" / "blobs" / "*.incomplete"))


def no_half_checkpoint(tmp_path) -> bool:
    sat = tmp_path / "sat"
    return not glob.glob(str(sat / ".*.partial-*"))


def wait_for(condition, proc, timeout_s=120.0, what=""):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the CLI exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


# End to end through the CLI -----------------------------------------------------------------------

def test_killed_download_resumes_with_a_range_request(golden, tokenizers, hub, tmp_path):
    env = hub_env(tmp_path, hub.url)
    hub.stall_after[ZIP] = CHUNK + (1 << 20)
    proc = start_cli(golden, env)
    wait_for(lambda: any(os.path.getsize(p) >= CHUNK for p in partial_blobs(tmp_path)), proc,
             what="a partial download of 10 MiB")
    proc.kill()
    proc.communicate()
    hub.release()
    assert len(partial_blobs(tmp_path)) == 1 and not (tmp_path / "sat" / NAME).exists()
    del hub.stall_after[ZIP]

    done = run_cli(golden, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert answer_of(done.stdout) == golden_answer(golden, tokenizers)
    assert hub.range_requests(ZIP) == [f"bytes={CHUNK}-"]  # resumed where the killed process stopped
    assert hub.full_transfers(ZIP) == 1
    assert partial_blobs(tmp_path) == [] and no_half_checkpoint(tmp_path)
    assert open(tmp_path / "sat" / NAME / "latest").read().strip() == "1"


def test_two_processes_download_once(golden, tokenizers, hub, tmp_path):
    env = hub_env(tmp_path, hub.url)
    hub.hold()  # the first download waits until the other process is seen waiting for the lock
    logs = [open(tmp_path / f"cli{i}.log", "w+") for i in range(2)]
    procs = [start_cli(golden, env, log=log) for log in logs]
    for proc in procs:
        proc.stdin.write(cli_stdin(golden))
        proc.stdin.close()

    def one_waits():
        return any("waiting for another process downloading" in open(log.name).read() for log in logs)

    wait_for(lambda: hub.file_gets(ZIP) and one_waits(), None, what="one download and one process waiting")
    hub.let_go()
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=300) == 0, open(log.name).read()[-3000:]
        assert answer_of(proc.stdout.read()) == golden_answer(golden, tokenizers)
    assert len(hub.file_gets(ZIP)) == 1  # one transfer, no Range request
    assert no_half_checkpoint(tmp_path)


def test_hub_repo_id_downloads_hf_format_and_resumes_a_partial(golden, tokenizers, hub, tmp_path):
    weights = open(os.path.join(HF_GOLDEN, "model.safetensors"), "rb").read()
    blobs = tmp_path / "hf" / "hub" / "models--tiny--cogvlm-tiny-hf" / "blobs"
    blobs.mkdir(parents=True)
    sha = hashlib.sha256(weights).hexdigest()
    (blobs / f"{sha}.0badf00d.incomplete").write_bytes(weights[:1_000_000])  # left by a killed download
    (blobs / f"{sha}.5ca1ab1e.incomplete").write_bytes(weights[:1000])

    done = run_cli(golden, hub_env(tmp_path, hub.url), HF_REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert answer_of(done.stdout) == golden_answer(golden, tokenizers)
    assert hub.range_requests("model.safetensors") == ["bytes=1000000-"]
    assert hub.full_transfers("model.safetensors") == 0 and hub.file_gets("README.md") == []
    assert partial_blobs(tmp_path) == []
    snapshot = glob.glob(str(tmp_path / "hf" / "hub" / "models--tiny--cogvlm-tiny-hf" / "snapshots" / "*"))
    assert len(snapshot) == 1 and sorted(os.listdir(snapshot[0])) == ["config.json", "model.safetensors"]


# the clock starts once the model code is imported (cli_demo imports it inside main): what is timed is the
# network and the checkpoint, not four processes importing SAT at once
ERROR_SCRIPT = """
import sys, time
import cli_demo, utils.engine, utils.pipeline
start = time.monotonic()
rc = cli_demo.main(sys.argv[1:])
print(f"seconds={time.monotonic() - start:.2f} rc={rc}")
"""


def test_offline_unreachable_and_corrupt_are_one_fast_error_line(golden, hub, tmp_path, released_zip):
    corrupt = bytearray(released_zip)
    corrupt[corrupt.find(b"mp_rank_00_model_states.pt") + 200_000] ^= 0xFF  # inside the member's data
    bad_hub = HubStub().start()
    bad_hub.add_file(SAT_REPO, ZIP, bytes(corrupt))
    hanging = HubStub().start()
    hanging.hang = True
    cases = {  # name: (endpoint, extra env, --from_pretrained, flags, what the line says)
        "offline": (hub.url, {"HF_HUB_OFFLINE": "1"}, HF_REPO, [], "offline (HF_HUB_OFFLINE=1)"),
        "local_files_only": (hub.url, {}, NAME, ["--local_files_only"], "offline (--local_files_only)"),
        "unreachable": (hanging.url, {}, NAME, [], "could not be reached"),
        "corrupt": (bad_hub.url, {}, NAME, [], "is corrupt"),
    }
    procs = {}
    for case, (endpoint, extra, checkpoint, flags, _) in cases.items():
        (tmp_path / case).mkdir()
        command = [sys.executable, "-c", ERROR_SCRIPT, *cli_command(golden, checkpoint, *flags)[2:]]
        procs[case] = subprocess.Popen(command, cwd=ROOT, env=hub_env(tmp_path / case, endpoint, **extra),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    try:
        outputs = {case: proc.communicate(timeout=300) for case, proc in procs.items()}
    finally:
        hanging.stop()
        bad_hub.stop()
    lines = {}
    for case, (stdout, stderr) in outputs.items():
        lines[case] = line = one_error_line(stderr)
        assert cases[case][4] in line and "rc=1" in stdout, (case, line, stdout)
        assert float(stdout.split("seconds=")[1].split()[0]) < 15, (case, stdout)
        assert not (tmp_path / case / "sat" / NAME).exists() and no_half_checkpoint(tmp_path / case), case
    assert hub.requests == []  # HF_HUB_OFFLINE=1 and --local_files_only never touch the network
    assert f"hf download {HF_REPO}" in lines["offline"]  # how to download by hand
    for case in ("local_files_only", "unreachable"):  # where it looked, and what to fetch by hand
        assert str(tmp_path / case / "sat" / NAME) in lines[case] and f"get {ZIP} from" in lines[case]
    assert bad_hub.full_transfers(ZIP) == 1 and "removed from the HF cache" in lines["corrupt"]
    assert glob.glob(str(tmp_path / "corrupt" / "hf" / "hub" / ("models--" + SAT_REPO.replace("/", "--")) / "blobs" / "*")) == []


# The pieces, in process (no network) -----------------------------------------------------------

def test_unpack_takes_both_layouts(golden, tmp_path):
    for top in ("", f"{NAME}/"):
        archive = tmp_path / f"layout{len(top)}.zip"
        archive.write_bytes(checkpoint_zip(golden.checkpoint, top=top, compression=zipfile.ZIP_DEFLATED))
        target = tmp_path / f"sat{len(top)}" / NAME
        target.parent.mkdir()
        unpack_checkpoint_zip(str(archive), str(target))
        assert sorted(os.listdir(target)) == sorted(os.listdir(golden.checkpoint))
        for name in ("model_config.json", "latest", os.path.join("1", "mp_rank_00_model_states.pt")):
            assert open(target / name, "rb").read() == open(os.path.join(golden.checkpoint, name), "rb").read()


@pytest.mark.parametrize("damage,message", [("truncated", "is corrupt"), ("crc", "is corrupt"),
                                            ("no_config", "unexpected archive"), ("escape", "outside the checkpoint"),
                                            ("two_tops", "unexpected archive")])
def test_bad_archives_are_one_error_and_leave_nothing(golden, tmp_path, damage, message):
    data = bytearray(checkpoint_zip(golden.checkpoint, top=f"{NAME}/"))
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "crc":
        data[data.find(b"mp_rank_00_model_states.pt") + 100_000] ^= 0x01
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(f"{NAME}/latest", "1")
            if damage == "escape":
                archive.writestr(f"{NAME}/model_config.json", "{}")
                archive.writestr(f"{NAME}/../../evil.txt", "x")
            if damage == "two_tops":
                archive.writestr("other/model_config.json", "{}")
        data = buffer.getvalue()
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    target = tmp_path / "sat" / NAME
    target.parent.mkdir()
    with pytest.raises(CheckpointError, match=message) as error:
        unpack_checkpoint_zip(str(archive), str(target))
    assert "\n" not in str(error.value) and "nothing was unpacked" in str(error.value)
    assert os.listdir(target.parent) == [] and not (tmp_path / "evil.txt").exists()


def test_free_space_is_checked_before_writing(tmp_path):
    check_free_space({str(tmp_path): 1, str(tmp_path / "not" / "yet"): 1}, "x")
    usage = os.statvfs(tmp_path)
    free = usage.f_bavail * usage.f_frsize
    # each fits alone; on one filesystem they add up
    with pytest.raises(CheckpointError, match="not enough disk space for a zip: .* needed in .* free"):
        check_free_space({str(tmp_path / "cache"): free * 3 // 4, str(tmp_path / "sat"): free * 3 // 4}, "a zip")


def test_repo_ids_and_paths():
    assert is_hub_repo_id(RELEASED_CHECKPOINTS[NAME].hf_repo) and is_hub_repo_id("tiny/cogvlm-tiny-hf")
    for text in (NAME, "/abs/dir", "./rel", "a/b/c", "a--b/c", "x/..", "~/models", "a/b."):
        assert not is_hub_repo_id(text), text
