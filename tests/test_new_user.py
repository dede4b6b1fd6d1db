"""What a new user did on a fresh clone, each step as they did it: the fixes for the frictions they hit."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

from conftest import ROOT, free_port, running_server

SCENES = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")


def test_example_client_against_the_scenes_model_with_the_readme_flags(tmp_path):
    """`openai_api_request.py --image assets/scene_1.png --stream` on a 512-token model, and the script bare
    (upstream's form): the client leaves max_tokens to the server instead of asking for more than its context
    holds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "openai_demo/openai_api.py", "--from_pretrained", SCENES, "--port", str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("COGVLM_API_KEY", None)
    with running_server(command, url + "/health", tmp_path / "server.log", env=env):
        proc = subprocess.run([sys.executable, "openai_demo/openai_api_request.py", "--base_url", url + "/v1",
                               "--image", "assets/scene_1.png", "--stream"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        # upstream's call form, bare: the address from the openai package's variable, the bundled scene
        bare = subprocess.run([sys.executable, "openai_demo/openai_api_request.py"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300, env={**env, "OPENAI_BASE_URL": url + "/v1"})
    for run in (proc, bare):
        assert run.returncode == 0, run.stderr[-2000:]
        answers = [line.split("Assistant: ", 1)[1] for line in run.stdout.splitlines() if "Assistant: " in line]
        assert len(answers) == 2 and all(answers), run.stdout


def test_evaluate_demo_writes_into_the_working_directory_not_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "cogvlm-tiny-scenes"
    shutil.copytree(SCENES, checkpoint)
    before = sorted(os.listdir(checkpoint))
    data = tmp_path / "scenes.jsonl"
    shutil.copy(os.path.join(ROOT, "assets", "scene_1.png"), tmp_path / "scene_1.png")
    record = {"image": "scene_1.png", "type": "count",
              "conversations": [{"role": "user", "content": "How many shapes are there?"},
                                {"role": "assistant", "content": "2"}]}
    data.write_text(json.dumps(record) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate_demo.py"), "--from_pretrained",
                           str(checkpoint), "--data", str(data)], capture_output=True, text=True, cwd=work,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(checkpoint)) == before
    result = json.loads((work / "cogvlm-tiny-scenes-eval.json").read_text())
    assert result["count"] == 1 and "results in cogvlm-tiny-scenes-eval.json" in proc.stdout


def test_converted_checkpoint_files_have_the_umasks_permissions(golden, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", golden.checkpoint, str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert modes and all(mode == 0o666 & ~umask for mode in modes.values()), modes


NOISE = ("DeepSpeed/CUDA is not installed", "Failed to load bitsandbytes", "LOCAL_WORLD_SIZE", "model-only mode",
         "Setting accelerator", "Traceback")


def test_finetune_help_works_and_start_up_is_quiet():
    """finetune_demo.py --help (SAT's own parser: its '1% of' help crashed argparse) and a CLI session print no
    library start-up lines; --verbose brings SAT's back."""
    proc = subprocess.run([sys.executable, "finetune_demo.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    # our flags and SAT's training flags, each named once
    for flag in ("--use_lora", "--from_scratch", "--final_save", "--cache_images", "--train-iters", "--deepspeed_config"):
        assert len(re.findall(rf"^  {flag}\b", proc.stdout, re.MULTILINE)) == 1, flag
    assert not [n for n in NOISE if n in proc.stdout + proc.stderr]
    session = subprocess.run([sys.executable, "cli_demo.py", "--from_pretrained", SCENES], input="stop\n",
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert session.returncode == 0, session.stderr[-2000:]
    assert not [n for n in NOISE if n in session.stdout + session.stderr], session.stderr[-2000:]
    verbose = subprocess.run([sys.executable, "cli_demo.py", "--from_pretrained", SCENES, "--verbose"],
                             input="stop\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert verbose.returncode == 0 and "model-only mode" in verbose.stdout + verbose.stderr


def test_ctrl_c_mid_answer_stops_the_cli_cleanly(golden):
    """SIGINT while the engine generates: one line, exit 130, no traceback, no abort from a thread."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "cli_demo.py", "--from_pretrained", golden.checkpoint,
                             "--local_tokenizer", golden.tokenizer_dir, "--max_length", "512", "--stream_chat"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdin.write(golden.image_path + "\nWhat is in the image?\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    seen = ""
    while "Model:" not in seen and time.monotonic() < deadline:  # the answer has started streaming
        seen += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "stopped (SIGINT)", err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
