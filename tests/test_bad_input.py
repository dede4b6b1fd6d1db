"""Bad input, the way a hostile or careless user sends it, to the API server, the CLI and the web demo: each
case gets its one-line message (or its 4xx body), its exit code or status, and no traceback; the server goes
on answering normal requests correctly, within bounded time and memory where the case is about them.
Checkpoint writers and finetune resume: tests/test_bad_checkpoints.py."""
import base64
import concurrent.futures
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import cli_demo
import web_demo
from conftest import GOLDEN_DIR, ROOT, free_port, running_server
from utils.engine import engine_for
from utils.engine_args import EngineArgs
from utils import vision
from utils.pipeline import load_pipeline

MODEL = "cogvlm-tiny"
API_KEY = "bad-input-key"
NEW_TOKENS = 16
MAX_LENGTH = 256  # short answers keep the schemathesis run fast
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BOMB_SIDE = 12000  # 144 Mpx: under PIL's own bomb limit, over ours (40 Mpx)


def golden_text_answer(golden, tokenizers):
    ids = golden["text_only.gen_ids"].tolist()
    return tokenizers["chat"].decode(ids, skip_special_tokens=True).replace("</s>", "").strip()


def png_bytes(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@functools.lru_cache()
def bomb_png() -> bytes:
    return png_bytes(Image.new("L", (BOMB_SIDE, BOMB_SIDE)))  # ~180 KB of zlib, 144 Mpx decoded


@functools.lru_cache()
def big_jpeg() -> bytes:
    return png_bytes(Image.new("RGB", (BOMB_SIDE, BOMB_SIDE), (200, 30, 30)), "JPEG")


def gray_pair():
    """The same gray ramp as an 8-bit PNG and as a 16-bit one (values * 257)."""
    ramp = np.tile(np.linspace(0, 255, 56).round().astype(np.uint8), (56, 1))
    return png_bytes(Image.fromarray(ramp, "L")), png_bytes(Image.fromarray(ramp.astype(np.uint16) * 257))


# A local image server: slow, huge, endless, broken answers ---------------------------------------

class ImageHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _head(self, status=200, length=None, kind="image/png"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):
        try:
            if self.path == "/image.png":
                data = open(os.path.join(GOLDEN_DIR, "image.png"), "rb").read()
                self._head(length=len(data))
                self.wfile.write(data)
            elif self.path == "/trickle.png":  # a valid start, then 8 bytes every 0.3 s: never a read timeout
                self._head(length=10_000_000)
                for _ in range(200):
                    self.wfile.write(b"\x89PNG\r\n\x1a\n")
                    self.wfile.flush()
                    time.sleep(0.3)
            elif self.path == "/huge.png":  # says 100 MiB up front
                self._head(length=100 * 2**20)
                self.wfile.write(b"\x89PNG\r\n\x1a\n")
                time.sleep(2)
            elif self.path == "/endless.png":  # no length: bytes until we stop reading
                self._head()
                for _ in range(64):
                    self.wfile.write(b"\0" * 2**20)
            elif self.path == "/page.html":
                self._head(length=15, kind="text/html")
                self.wfile.write(b"<html>hi</html>")
            else:
                self._head(404, length=0)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


class ImageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# The API server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(golden, tmp_path_factory):
    """openai_api.py on the golden checkpoint in a subprocess: (base URL, process, log path)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("bad-input-api") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "openai_demo/openai_api.py", "--from_pretrained", golden.checkpoint,
               "--local_tokenizer", golden.tokenizer_dir, "--version", "chat", "--port", str(port),
               "--model_name", MODEL, "--api-key", API_KEY, "--max_length", str(MAX_LENGTH),
               "--allow-private-media-urls"]  # the image server is on loopback
    url = f"http://127.0.0.1:{port}"
    with running_server(command, url + "/health", log_path, env=env) as proc:
        yield url, proc, log_path
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def http_client():
    with httpx.Client(headers=HEADERS, timeout=120) as client:
        yield client


def chat_body(content="Hello, who are you?", **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def with_image(url, text="What is in the image?", **fields):
    return chat_body([{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}], **fields)


def post(client, base, body, **kwargs):
    content = body if isinstance(body, (bytes, str)) or not isinstance(body, dict) else json.dumps(body)
    return client.post(base + "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json", **kwargs.pop("headers", {})}, **kwargs)


def assert_error(response, status, param=None, code=None, text=None):
    """An OpenAI-style error body with this status: one line, no traceback, naming the parameter."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    message = error["message"]
    assert message and "\n" not in message and "Traceback" not in message, message
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if text is not None:
        assert text in message, message
    return error


def assert_still_serving(client, base, expected):
    """/health answers and a normal greedy request gets the golden answer."""
    assert client.get(base + "/health", timeout=5).status_code == 200
    reply = post(client, base, chat_body(temperature=0, max_tokens=NEW_TOKENS))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected


def memory_mb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split(f"{field}:")[1].split()[0]) // 1024


def reset_peak_memory(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


LONE_SURROGATE = '"\\ud800"'  # JSON text: a valid escape naming no character
BAD_REQUESTS = {
    # text that is not Unicode
    "surrogate_in_content": (f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {LONE_SURROGATE}}}]}}',
                             "messages.0.content", "not valid Unicode"),
    "surrogate_in_text_part": (f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": [{{"type": "text", '
                               f'"text": {LONE_SURROGATE}}}]}}]}}', "messages.0.content", "not valid Unicode"),
    "surrogate_in_model": (f'{{"model": {LONE_SURROGATE}, "messages": [{{"role": "user", "content": "hi"}}]}}',
                           "model", "not valid Unicode"),
    "surrogate_in_role": (f'{{"model": "{MODEL}", "messages": [{{"role": {LONE_SURROGATE}, "content": "hi"}}]}}',
                          "messages.0.role", "not valid Unicode"),
    "surrogate_streamed": (f'{{"model": "{MODEL}", "stream": true, "messages": [{{"role": "user", "content": '
                           f'{LONE_SURROGATE}}}]}}', "messages.0.content", "not valid Unicode"),
    # sampling settings out of range (the probe's 500s and silently accepted values)
    "seed_2_to_64": (chat_body(seed=2**64), "seed", None),
    "seed_negative": (chat_body(seed=-1), "seed", None),
    "seed_fractional": (chat_body(seed=1.5), "seed", None),
    "seed_streamed": (chat_body(seed=2**64, stream=True), "seed", None),
    "repetition_penalty_zero": (chat_body(repetition_penalty=0), "repetition_penalty", None),
    "repetition_penalty_negative": (chat_body(repetition_penalty=-1), "repetition_penalty", None),
    "top_k_over_vocab": (chat_body(top_k=100000, temperature=1), "top_k", "vocabulary"),
    "top_k_over_vocab_streamed": (chat_body(top_k=100000, temperature=1, stream=True), "top_k", "vocabulary"),
    "top_k_negative": (chat_body(top_k=-3), "top_k", None),
    "top_k_string": (chat_body(top_k="5"), "top_k", None),
    "temperature_negative": (chat_body(temperature=-1), "temperature", None),
    "temperature_string": (chat_body(temperature="0.5"), "temperature", None),
    "temperature_nan": (f'{{"model": "{MODEL}", "temperature": NaN, "messages": [{{"role": "user", "content": "x"}}]}}',
                        "temperature", None),
    "temperature_infinity": (f'{{"model": "{MODEL}", "temperature": Infinity, "messages": [{{"role": "user", '
                             '"content": "x"}]}', "temperature", None),
    "top_p_zero": (chat_body(top_p=0), "top_p", None),
    "top_p_two": (chat_body(top_p=2), "top_p", None),
    "top_p_negative": (chat_body(top_p=-1), "top_p", None),
    "stream_is_a_string": (chat_body(stream="yes"), "stream", None),
    "logprobs_true": (chat_body(logprobs=True), "logprobs", None),
    "n_two": (chat_body(n=2), "n", None),
    "max_tokens_zero": (chat_body(max_tokens=0), "max_tokens", None),
    "max_tokens_over_context": (chat_body(max_tokens=10**6), "max_tokens", "context"),
    "max_completion_tokens_over_context": (chat_body(max_completion_tokens=10**6, max_tokens=5),
                                           "max_completion_tokens", "context"),
    # sizes that would cost seconds and gigabytes
    "messages_5000": ({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 5000}, "messages", None),
    "content_parts_5000": (chat_body([{"type": "text", "text": "x"}] * 5000), "messages.0.content", "parts"),
    "text_of_a_million_chars": (chat_body("word " * 200000), "messages", "context"),
    # images that are not
    "data_uri_not_an_image": (with_image(data_uri(b"this is not an image")), "messages", "not a readable image"),
    "data_uri_over_20_mib": (with_image("data:image/png;base64," + "A" * (28 * 2**20)), "messages", "20 MiB"),
    "server_file_path": (with_image(os.path.join(GOLDEN_DIR, "image.png")), "messages", "neither a data: URI"),
    "file_url": (with_image("file:///etc/passwd"), "messages", "neither a data: URI"),
    "url_of_a_closed_port": (with_image(f"http://127.0.0.1:{free_port()}/x.png"), "messages", "cannot fetch"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_parameter(api, http_client, golden, tokenizers, name):
    base, _, _ = api
    body, param, text = BAD_REQUESTS[name]
    assert_error(post(http_client, base, body), 400, param=param, text=text)
    assert_still_serving(http_client, base, golden_text_answer(golden, tokenizers))


URL_CASES = {  # path on the image server -> what the 400 says
    "/missing.png": "HTTP 404",
    "/page.html": "not a readable image",
    "/huge.png": "larger than 20 MiB",
    "/endless.png": "larger than 20 MiB",
}


@pytest.mark.parametrize("path", list(URL_CASES))
def test_bad_image_url_is_a_400(api, http_client, image_server, golden, tokenizers, path):
    base, _, _ = api
    started = time.monotonic()
    assert_error(post(http_client, base, with_image(image_server + path)), 400, param="messages",
                 code="invalid_image", text=URL_CASES[path])
    assert time.monotonic() - started < vision.URL_TIMEOUT_S
    assert_still_serving(http_client, base, golden_text_answer(golden, tokenizers))


def test_settings_that_used_to_give_500_now_answer(api, http_client, golden, tokenizers):
    base, _, _ = api
    for fields in (dict(temperature=1e-40, top_k=5), dict(repetition_penalty=1e-300, temperature=0)):
        reply = post(http_client, base, chat_body(max_tokens=5, **fields))
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
    # temperature 0 is greedy whatever top_k says
    reply = post(http_client, base, chat_body(temperature=0, top_k=5, max_tokens=NEW_TOKENS))
    assert reply.json()["choices"][0]["message"]["content"] == golden_text_answer(golden, tokenizers)


def test_streamed_bad_request_is_a_400_before_any_event(api, http_client):
    base, _, _ = api
    with http_client.stream("POST", base + "/v1/chat/completions", json=chat_body(top_k=100000, stream=True,
                                                                                  temperature=1)) as response:
        body = response.read().decode()
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    assert "data:" not in body and json.loads(body)["error"]["param"] == "top_k"


def test_request_body_over_the_cap_is_a_413_while_it_arrives(api, http_client, golden, tokenizers):
    base, proc, _ = api
    big = json.dumps(chat_body("x" * (40 * 2**20))).encode()
    reset_peak_memory(proc.pid)
    before = memory_mb(proc.pid, "VmRSS")
    started = time.monotonic()
    assert_error(post(http_client, base, big), 413, code="request_too_large", text="32 MiB")

    def chunks():  # no Content-Length: the cap is counted as the bytes arrive
        for _ in range(40):
            yield b"x" * 2**20

    assert_error(post(http_client, base, chunks()), 413, code="request_too_large")
    assert time.monotonic() - started < 10
    assert memory_mb(proc.pid, "VmHWM") - before < 100  # the probe: 61 s and 7.6 GB for a 50 MB body
    assert_still_serving(http_client, base, golden_text_answer(golden, tokenizers))


def test_decompression_bombs_cost_bounded_memory(api, http_client, golden, tokenizers):
    base, proc, _ = api
    reset_peak_memory(proc.pid)
    before = memory_mb(proc.pid, "VmRSS")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(http_client, base, with_image(data_uri(bomb_png()))), range(4)))
    for reply in replies:
        assert_error(reply, 400, param="messages", code="invalid_image", text="144 Mpx")
    # the probe: 1.1 GB per request, 5.2 GB for four, 5.1 GB kept
    assert memory_mb(proc.pid, "VmHWM") - before < 150
    # a 144 Mpx JPEG is decoded at a quarter scale (libjpeg draft mode) and answered; repeated rounds settle
    # (the allocator's arenas fill up over the first rounds, then are reused): three more rounds together add
    # less than one round's decoded pixels (4 x 27 MB), which a leak would add each round
    jpeg = data_uri(big_jpeg(), "image/jpeg")
    after_round = []
    for _ in range(4):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: post(http_client, base, with_image(jpeg, max_tokens=3)), range(4)))
        assert all(reply.status_code == 200 for reply in replies), [r.text for r in replies]
        after_round.append(memory_mb(proc.pid, "VmRSS"))
    peak = memory_mb(proc.pid, "VmHWM") - before
    assert peak < 500, peak  # four full decodes would hold 1.7 GB of pixels
    assert after_round[-1] - after_round[0] < 100, after_round
    assert_still_serving(http_client, base, golden_text_answer(golden, tokenizers))


def test_sixteen_bit_image_is_scaled_not_whitened(api, http_client):
    base, _, _ = api
    eight, sixteen = gray_pair()
    answers = [post(http_client, base, with_image(data_uri(data), temperature=0, max_tokens=8)).json()
               for data in (eight, sixteen)]
    assert answers[0]["choices"][0]["message"]["content"] == answers[1]["choices"][0]["message"]["content"]
    white = png_bytes(Image.new("L", (56, 56), 255))
    whitened = post(http_client, base, with_image(data_uri(white), temperature=0, max_tokens=8)).json()
    assert whitened["choices"][0]["message"]["content"] != answers[0]["choices"][0]["message"]["content"]


def test_trickling_image_urls_fail_in_time_and_starve_nothing(api, http_client, image_server, golden, tokenizers):
    """The probe: one trickling URL never ended, 41 starved normal requests while /health said idle. Now each
    ends within the deadline (400, or 429 when no download place came free in time), and requests without
    a URL image (a data: URI one included) are answered meanwhile."""
    base, _, _ = api
    golden_image = data_uri(open(golden.image_path, "rb").read())
    expected = golden_text_answer(golden, tokenizers)
    with httpx.Client(headers=HEADERS, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        def trickle(_):
            started = time.monotonic()
            return post(client, base, with_image(image_server + "/trickle.png")), time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(41) as pool:
            futures = [pool.submit(trickle, i) for i in range(41)]
            time.sleep(1.0)
            for _ in range(3):  # meanwhile: health and normal requests answer at once, correctly
                started = time.monotonic()
                assert_still_serving(client, base, expected)
                assert time.monotonic() - started < 5
                image = post(client, base, with_image(golden_image, max_tokens=3))
                assert image.status_code == 200, image.text
            results = [future.result() for future in futures]
    for response, elapsed in results:
        assert elapsed < vision.URL_TIMEOUT_S + 3, elapsed
        if response.status_code == 429:  # no download place came free in time
            assert_error(response, 429, code="image_downloads_busy")
        else:
            assert_error(response, 400, param="messages", code="invalid_image", text="timed out")
    assert_still_serving(http_client, base, expected)


def test_routes_methods_and_head(api, http_client):
    base, _, _ = api
    assert http_client.head(base + "/health").status_code == 200
    for method, path, allowed in (("DELETE", "/v1/models", "GET"), ("PUT", "/v1/chat/completions", "POST"),
                                  ("POST", "/health", "GET, HEAD")):
        response = http_client.request(method, base + path)
        assert_error(response, 405)
        assert set(response.headers["allow"].replace(" ", "").split(",")) == set(allowed.replace(" ", "").split(","))
    assert_error(http_client.get(base + "/v1/nothing"), 404)
    assert_error(http_client.get(base + "/v1/models/gpt-4o"), 404, code="model_not_found")
    assert_error(httpx.get(base + "/v1/models"), 401, code="invalid_api_key")


def test_openapi_schema_passes_schemathesis_with_every_check(api, tmp_path):
    """schemathesis (all phases, every check) against the live server, with a fixed seed and example budget.
    tests/schemathesis.toml and tests/schemathesis_hooks.py say where a 400 for schema-valid data is right."""
    base, _, _ = api
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", os.path.join(ROOT, "tests", "schemathesis.toml"),
               "run", base + "/openapi.json", "-H", f"Authorization: Bearer {API_KEY}", "--checks", "all",
               "--max-examples", "25", "--seed", "1", "--generation-database", "none", "--workers", "1",
               "--no-color", "--request-timeout", "30"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout and "Tested: 5" in result.stdout


# The CLI (in-process, on the golden checkpoint) ---------------------------------------------

def run_cli(monkeypatch, capsys, golden, stdin, *flags):
    argv = ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
            *flags]
    monkeypatch.setattr(sys, "stdin", stdin if not isinstance(stdin, str) else io.StringIO(stdin))
    rc = cli_demo.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(text):
    lines = [line for line in text.splitlines() if "error: " in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


class TTYBytes(io.TextIOWrapper):
    """Bytes on stdin as a terminal would give them (isatty: interactive use)."""

    def __init__(self, data: bytes, errors="strict"):
        super().__init__(io.BytesIO(data), encoding="utf-8", errors=errors)

    def isatty(self):
        return True


CLI_FLAG_CASES = {  # the probe's tracebacks and silently accepted values
    "temperature_nan": (["--temperature", "nan"], "temperature"),
    "temperature_negative": (["--temperature", "-1"], "temperature"),
    "repetition_penalty_zero": (["--repetition_penalty", "0"], "repetition_penalty"),
    "top_k_over_vocab": (["--top_k", "100000"], "top_k"),
    "top_k_negative": (["--top_k", "-3"], "top_k"),
    "top_p_two": (["--top_p", "2"], "top_p"),
    "top_p_negative": (["--top_p", "-1"], "top_p"),
    "max_length_over_positions": (["--max_length", "1000000"], "4096 positions"),
    "max_length_zero": (["--max_length", "0"], "max_length"),
}


@pytest.mark.parametrize("name", list(CLI_FLAG_CASES))
def test_cli_bad_flag_is_one_error_line(golden, monkeypatch, capsys, name):
    flags, named = CLI_FLAG_CASES[name]
    rc, out, err = run_cli(monkeypatch, capsys, golden, "\nhi\n", *flags)
    assert rc == 1
    assert named in one_error_line(err)


def test_cli_temperature_zero_with_top_k_is_greedy(golden, tokenizers, monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, golden, "\nHello, who are you?\nstop\n", "--temperature", "0",
                           "--top_k", "5", "--max_length", str(golden.case("text_only")["seq_len"] + NEW_TOKENS))
    assert rc == 0, err
    assert out.split("Model: ", 1)[1].splitlines()[0] == golden_text_answer(golden, tokenizers)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale, and the POSIX locale
def test_cli_invalid_utf8_from_a_script_is_one_error_line(golden, monkeypatch, capsys, errors):
    stdin = io.TextIOWrapper(io.BytesIO(b"\n\xff\xfehello\n"), encoding="utf-8", errors=errors)
    rc, out, err = run_cli(monkeypatch, capsys, golden, stdin)
    assert rc == 1
    assert "not valid UTF-8" in one_error_line(out + err)


def test_cli_invalid_utf8_typed_is_skipped_with_a_message(golden, monkeypatch, capsys):
    stdin = TTYBytes(b"\n\xff\xfe\nHello, who are you?\nstop\n", errors="surrogateescape")
    rc, out, err = run_cli(monkeypatch, capsys, golden, stdin, "--max_length", "60")
    assert rc == 0, err
    assert "not valid UTF-8" in one_error_line(out) and "line skipped" in out
    assert out.count("Model: ") == 1  # the next line was answered


def test_cli_trickling_url_fails_within_the_deadline(golden, monkeypatch, capsys, image_server):
    monkeypatch.setattr(vision.load_image, "__defaults__", (2.0, vision.MAX_IMAGE_BYTES))
    started = time.monotonic()
    rc, out, _ = run_cli(monkeypatch, capsys, golden, f"{image_server}/trickle.png\nhi\n", "--allow-private-media-urls")
    assert rc == 1 and "timed out" in one_error_line(out)
    assert time.monotonic() - started < 2.0 + 3  # the probe: still waiting at 90 s


@pytest.mark.parametrize("path,message", [("/huge.png", "larger than 20 MiB"), ("/endless.png", "larger than 20 MiB"),
                                          ("/missing.png", "HTTP 404"), ("/page.html", "not a readable image")])
def test_cli_bad_image_url(golden, monkeypatch, capsys, image_server, path, message):
    rc, out, _ = run_cli(monkeypatch, capsys, golden, f"{image_server}{path}\nhi\n", "--allow-private-media-urls")
    assert rc == 1 and message in one_error_line(out)


def test_cli_image_bombs_and_16_bit(golden, monkeypatch, capsys, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    rc, out, _ = run_cli(monkeypatch, capsys, golden, f"{bomb}\nhi\n")
    assert rc == 1 and "more than the 40 Mpx" in one_error_line(out)
    eight, sixteen = gray_pair()
    (tmp_path / "gray8.png").write_bytes(eight)
    (tmp_path / "gray16.png").write_bytes(sixteen)
    answers = []
    for name in ("gray8.png", "gray16.png"):
        rc, out, err = run_cli(monkeypatch, capsys, golden, f"{tmp_path / name}\nWhat is it?\nstop\n",
                               "--max_length", "60")
        assert rc == 0, err
        answers.append(out.split("Model: ", 1)[1])
    assert answers[0] == answers[1]


def peak_memory_of_loading(data: bytes, tmp_path) -> int:
    """MB that decoding `data` with utils.vision adds to a fresh process's peak RSS (and its outcome)."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    script = (
        "import sys; from utils import vision\n"
        "def hwm(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024\n"
        "before = hwm()\n"
        "try:\n    image = vision.load_image(sys.argv[1]); print('size', image.size)\n"
        "except vision.ImageError as e:\n    print('error', e)\n"
        "print('grew', hwm() - before)\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split("grew ")[1]), result.stdout


def test_image_decoding_memory_is_bounded(tmp_path):
    grew, out = peak_memory_of_loading(bomb_png(), tmp_path)
    assert "error" in out and "144 Mpx" in out and grew < 50, out  # the probe: the CLI took 1.8 GB
    grew, out = peak_memory_of_loading(big_jpeg(), tmp_path)
    width, height = eval(out.split("size ")[1].splitlines()[0])
    assert width * height <= vision.KEEP_PIXELS and width / height == 1
    assert grew < 250, out  # a full decode alone is 432 MB


def test_sixteen_bit_modes_scale_to_8_bit():
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    for mode_image in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):
        assert mode_image.mode in vision.SIXTEEN_BIT_MODES
        image = vision.image_from_bytes(png_bytes(mode_image, "TIFF" if mode_image.mode == "I" else "PNG"), "x")
        assert np.array_equal(np.asarray(image)[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


# The web demo: the real gradio app in this process, through gradio_client --------------------

@pytest.fixture(scope="module")
def web_app(golden):
    flags = ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
             "--max_length", "120"]
    args = web_demo.build_parser().parse_args(flags)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = load_pipeline(args)
    demo = web_demo.build_demo(web_demo.WebChat(pipeline, args, engine_for(pipeline, EngineArgs.from_cli_args(args))))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                        max_file_size=vision.MAX_IMAGE_BYTES, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    torch.set_num_threads(threads)


def web_files(tmp_path):
    eight, sixteen = gray_pair()
    files = {"notes.png": b"hello, this is text", "empty.png": b"", "page.html": b"<html>hi</html>",
             "truncated.png": eight[: len(eight) // 2], "bomb.png": bomb_png(), "gray8.png": eight,
             "gray16.png": sixteen}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in files}


WEB_UPLOADS = {"notes.png": "not a readable image", "empty.png": "not a readable image",
               "page.html": "not a readable image", "truncated.png": "not a readable image",
               "bomb.png": "more than the 40 Mpx"}
WEB_SETTINGS = {"top_k_none": ((0.8, 0.4, None), "need a value"), "top_k_negative": ((0.8, 0.4, -3), "top_k"),
                "top_p_two": ((0.8, 2.0, 1), "top_p"), "temperature_negative": ((-1.0, 0.4, 1), "temperature"),
                "top_k_over_vocab": ((1.0, 0.4, 100000), "top_k")}


def test_web_bad_uploads_and_settings_get_our_one_line_message(web_app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(web_app, verbose=False)
    files = web_files(tmp_path)
    for name, message in WEB_UPLOADS.items():
        with pytest.raises(AppError) as err:
            client.predict(handle_file(files[name]), "hi", [], 0.8, 0.4, 1, api_name="/chat")
        text = str(err.value)
        assert message in text and "\n" not in text and "preprocess" not in text, (name, text)
    for name, (settings, message) in WEB_SETTINGS.items():
        with pytest.raises(AppError) as err:
            client.predict(None, "hi", [], *settings, api_name="/chat")
        assert message in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    answers = [client.predict(handle_file(files[name]), "What is it?", [], 0.8, 0.4, 1, api_name="/chat")[0]
               for name in ("gray8.png", "gray16.png")]
    assert answers[0] == answers[1] and answers[0]  # still answering; 16-bit scaled like its 8-bit twin


def test_image_upload_reaches_the_handler_undecoded():
    from gradio.data_classes import ImageData

    image = web_demo.image_input()
    assert image.preprocess(None) is None
    assert image.preprocess(ImageData(path="/tmp/not-even-there.png")) == "/tmp/not-even-there.png"
    assert image.preprocess(ImageData(url="data:image/png;base64,AAAA")) == "data:image/png;base64,AAAA"
    assert not os.path.exists(os.path.splitext(web_demo.__file__)[0] + ".pyi")  # no gradio stub written
