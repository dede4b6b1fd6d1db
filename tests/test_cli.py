"""cli_demo.py: greedy answers on the golden checkpoint, scripted use, and bad input."""
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import cli_demo
from conftest import ROOT
from models.releases import DEFAULT_CHECKPOINT, RELEASED_TOKENIZER

NEW_TOKENS = 16


def run_cli(monkeypatch, capsys, stdin_text, *flags, checkpoint=None, tokenizer=None, golden=None):
    argv = ["--from_pretrained", checkpoint or golden.checkpoint, "--local_tokenizer", tokenizer or golden.tokenizer_dir,
            *flags]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    rc = cli_demo.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected_answer(golden, tokenizers, name):
    ids = golden[f"{name}.gen_ids"].tolist()
    return tokenizers["chat"].decode(ids, skip_special_tokens=True).replace("</s>", "").strip()


@pytest.mark.parametrize("name,version,image", [("base", "base", True), ("chat", "chat", True),
                                                ("vqa", "vqa", True), ("text_only", "chat", False)])
def test_cli_greedy_answer_matches_golden(golden, tokenizers, monkeypatch, capsys, name, version, image):
    case = golden.case(name)
    query = case.get("query", "Hello, who are you?")
    stdin = f"{golden.image_path if image else ''}\n{query}\nstop\n"
    rc, out, err = run_cli(monkeypatch, capsys, stdin, "--version", version, "--english", "--top_k", "1",
                           "--max_length", str(case["seq_len"] + NEW_TOKENS), golden=golden)
    assert rc == 0, err
    answers = [line for line in out.splitlines() if "Model: " in line]
    assert len(answers) == 1
    assert answers[0].split("Model: ", 1)[1] == expected_answer(golden, tokenizers, name)


def test_cli_clear_then_text_only_then_eof(golden, monkeypatch, capsys):
    stdin = f"{golden.image_path}\nWhat is in the image?\nclear\n\nHello\n"  # ends without `stop`
    rc, out, err = run_cli(monkeypatch, capsys, stdin, "--version", "chat", "--max_length", "60", golden=golden)
    assert rc == 0, err
    assert out.count("Model: ") == 2  # an image turn, then a text-only turn after `clear`
    assert "Welcome to CogVLM-CLI" in out


def test_cli_streaming_prints_the_same_answer(golden, tokenizers, monkeypatch, capsys):
    case = golden.case("chat")
    stdin = f"{golden.image_path}\n{case['query']}\nstop\n"
    rc, out, _ = run_cli(monkeypatch, capsys, stdin, "--version", "chat", "--stream_chat",
                         "--max_length", str(case["seq_len"] + NEW_TOKENS), golden=golden)
    assert rc == 0
    streamed = [line for line in out.splitlines() if "Model: " in line][0].split("Model: ", 1)[1]
    assert streamed.strip() == expected_answer(golden, tokenizers, "chat")


def test_cli_chinese_prompts(golden, monkeypatch, capsys):
    rc, out, _ = run_cli(monkeypatch, capsys, "\n你好\nstop\n", "--chinese", "--max_length", "40", golden=golden)
    assert rc == 0 and "模型：" in out and "欢迎使用" in out


def test_cli_subprocess_scripted_session(golden):
    """The real entry point, piped: answers, exits 0 at EOF."""
    stdin = f"{golden.image_path}\nWhat is in the image?\n"
    proc = subprocess.run([sys.executable, "cli_demo.py", "--from_pretrained", golden.checkpoint, "--local_tokenizer",
                           golden.tokenizer_dir, "--version", "chat", "--english", "--max_length", "50"],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Model: " in proc.stdout


# Bad input -----------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        try:
            self.wfile.write(b"<html>not an image</html>")
        except BrokenPipeError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_image_file(golden, monkeypatch, capsys):
    rc, out, _ = run_cli(monkeypatch, capsys, "/no/such/image.png\nhi\n", golden=golden)
    assert rc == 1 and "does not exist" in out


def test_corrupt_image_file(golden, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rc, out, _ = run_cli(monkeypatch, capsys, f"{bad}\nhi\n", golden=golden)
    assert rc == 1 and "not a readable image" in out


def test_url_that_times_out(golden, monkeypatch, capsys, http_server):
    import utils.vision
    monkeypatch.setattr(utils.vision, "URL_TIMEOUT_S", 0.5)
    monkeypatch.setattr(utils.vision.load_image, "__defaults__", (0.5, utils.vision.MAX_IMAGE_BYTES))
    rc, out, _ = run_cli(monkeypatch, capsys, f"{http_server}/slow.png\nhi\n", "--allow-private-media-urls",
                         golden=golden)
    assert rc == 1 and "timed out" in out


def test_url_that_is_not_an_image(golden, monkeypatch, capsys, http_server):
    rc, out, _ = run_cli(monkeypatch, capsys, f"{http_server}/page.html\nhi\n", "--allow-private-media-urls",
                         golden=golden)
    assert rc == 1 and "not a readable image" in out


def test_prompt_longer_than_max_length(golden, monkeypatch, capsys):
    rc, out, _ = run_cli(monkeypatch, capsys, f"{golden.image_path}\nWhat is in the image?\n", "--max_length", "30",
                         golden=golden)
    assert rc == 1 and "--max_length is 30" in out


def test_unknown_version(golden, monkeypatch, capsys):
    rc, _, err = run_cli(monkeypatch, capsys, "", "--version", "poetry", golden=golden)
    assert rc == 1 and "unknown --version 'poetry'" in one_error_line(err)


def test_unknown_checkpoint_name(golden, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SAT_HOME", str(tmp_path))
    rc, _, err = run_cli(monkeypatch, capsys, "", checkpoint="cogvlm-nonexistent", golden=golden)
    assert rc == 1 and "unknown checkpoint 'cogvlm-nonexistent'" in one_error_line(err)


def test_released_name_not_downloaded_says_where_it_looked(golden, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SAT_HOME", str(tmp_path))  # offline: downloading is tests/test_download.py's
    rc, _, err = run_cli(monkeypatch, capsys, "", "--local_files_only", checkpoint=DEFAULT_CHECKPOINT, golden=golden)
    line = one_error_line(err)
    assert rc == 1 and str(tmp_path / DEFAULT_CHECKPOINT) in line and "download" in line


def test_checkpoint_name_resolves_under_sat_home(golden, monkeypatch, capsys, tmp_path):
    shutil.copytree(golden.checkpoint, tmp_path / "my-cogvlm")
    monkeypatch.setenv("SAT_HOME", str(tmp_path))
    rc, out, err = run_cli(monkeypatch, capsys, "\nhi\nstop\n", "--max_length", "40", checkpoint="my-cogvlm",
                           golden=golden)
    assert rc == 0 and "Model: " in out, err


def test_checkpoint_without_latest(golden, monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden.checkpoint, ckpt)
    os.remove(ckpt / "latest")
    rc, _, err = run_cli(monkeypatch, capsys, "", checkpoint=str(ckpt), golden=golden)
    assert rc == 1 and "no 'latest' file" in one_error_line(err)


def test_checkpoint_with_wrong_keys_names_them(golden, monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden.checkpoint, ckpt)
    path = ckpt / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=True)
    state["module"]["mixins.eva.boi_renamed"] = state["module"].pop("mixins.eva.boi")
    torch.save(state, path)
    rc, _, err = run_cli(monkeypatch, capsys, "", checkpoint=str(ckpt), golden=golden)
    line = one_error_line(err)
    assert rc == 1 and "missing tensors: mixins.eva.boi" in line and "unknown tensors: mixins.eva.boi_renamed" in line


def test_truncated_checkpoint_file(golden, monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden.checkpoint, ckpt)
    path = ckpt / "1" / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:5000])
    rc, _, err = run_cli(monkeypatch, capsys, "", checkpoint=str(ckpt), golden=golden)
    assert rc == 1 and "corrupt or incomplete" in one_error_line(err)


def test_tokenizer_offline_asks_for_local_tokenizer(golden, monkeypatch, capsys):
    import utils.language
    monkeypatch.setattr(utils.language, "_hub_reachable", lambda *a, **k: False)
    rc, _, err = run_cli(monkeypatch, capsys, "", tokenizer="someone/not-cached-tokenizer", golden=golden)
    assert rc == 1 and "--local_tokenizer" in one_error_line(err)


def test_tokenizer_directory_without_vocabulary(golden, monkeypatch, capsys, tmp_path):
    rc, _, err = run_cli(monkeypatch, capsys, "", tokenizer=str(tmp_path), golden=golden)
    assert rc == 1 and "no tokenizer vocabulary" in one_error_line(err)


def test_offline_tokenizer_by_hub_name_is_one_error_line(golden, monkeypatch, capsys, tmp_path):
    """--local_files_only covers a tokenizer given by hub name too: no connection is tried."""
    import socket

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    rc, _, err = run_cli(monkeypatch, capsys, "", "--local_files_only", tokenizer=RELEASED_TOKENIZER, golden=golden)
    assert rc == 1 and "not to be asked (offline)" in one_error_line(err)
