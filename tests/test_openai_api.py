"""openai_demo/openai_api.py: a real server on 127.0.0.1 (one subprocess for the module, golden tiny
checkpoint), spoken to with the official `openai` client and raw HTTP; answers are compared with the
golden reference and with the chat core run in this process."""
import base64
import concurrent.futures
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import GOLDEN_DIR, ROOT, free_port, running_server

MODEL = "cogvlm-tiny"
API_KEY = "test-key-123"
NEW_TOKENS = 16  # the golden bundle's greedy continuation length


def server_flags(golden):
    return ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat"]


@pytest.fixture(scope="module")
def server(golden, tmp_path_factory):
    """The API server in a subprocess; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("openai-api") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("COGVLM_API_KEY", None)
    command = [sys.executable, "openai_demo/openai_api.py", *server_flags(golden), "--port", str(port),
               "--model_name", MODEL, "--api-key", API_KEY,
               "--allow-private-media-urls"]  # the image URL tests' server is on loopback
    url = f"http://127.0.0.1:{port}"
    with running_server(command, url + "/health", log_path, env=env):
        yield url
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, body, **kwargs):
    """Raw POST /v1/chat/completions (for bodies the official client would not send)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server + "/v1/chat/completions", content=content, headers=headers, timeout=120, **kwargs)


def health(server):
    return httpx.get(server + "/health", timeout=5).json()


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(server)
        if not state["busy"] and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s: {health(server)}")


# Expected answers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def core(golden):
    """The chat core in this process, on the same checkpoint and flags as the server."""
    from openai_demo.openai_api import parse_args
    from utils.pipeline import load_pipeline

    return load_pipeline(parse_args(server_flags(golden)))


def core_turn(core, query, history=(), image_path=None, max_new=NEW_TOKENS, config=None):
    """The chat core's turn (greedy unless `config` says otherwise), capped at max_new tokens like the
    API's max_tokens."""
    from utils.generation_config import GenerationConfig
    from utils.vision import load_image

    config = config or GenerationConfig(top_k=1)
    conversation = core.conversation(load_image(image_path) if image_path else None)
    conversation.history = list(history)
    turn = core.chat(conversation, query, config.replace(max_new_tokens=max_new))
    for _ in turn:
        pass
    return turn


def golden_answer(golden, tokenizers, name):
    ids = golden[f"{name}.gen_ids"].tolist()
    return tokenizers["chat"].decode(ids, skip_special_tokens=True).replace("</s>", "").strip()


@functools.lru_cache()
def data_uri(path, mime="image/png"):
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def user(text, image_url=None):
    parts = [{"type": "text", "text": text}]
    if image_url:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": parts}


# Routes, auth -----------------------------------------------------------------------------

def test_models_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=server + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            other.models.list()
        assert err.value.code == "invalid_api_key"
    no_header = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert no_header.status_code == 401 and "API key" in no_header.json()["error"]["message"]
    assert httpx.get(server + "/health").status_code == 200  # the one route without a key


# Answers ----------------------------------------------------------------------------------

def test_greedy_answer_equals_golden_and_chat_core(golden, tokenizers, core, client):
    case = golden.case("chat")
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS,
                                           messages=[user(case["query"], data_uri(golden.image_path))])
    expected = core_turn(core, case["query"], image_path=golden.image_path)
    assert reply.choices[0].message.content == golden_answer(golden, tokenizers, "chat") == expected.response
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"  # 16 tokens, no end token (the golden run)
    assert reply.model == MODEL and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (case["seq_len"], NEW_TOKENS)
    assert reply.usage.total_tokens == case["seq_len"] + NEW_TOKENS


def test_stream_gives_the_same_answer_in_openai_chunks(golden, core, client):
    case = golden.case("chat")
    messages = [user(case["query"], data_uri(golden.image_path))]
    chunks = list(client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}, messages=messages))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == core_turn(core, case["query"], image_path=golden.image_path).response
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == NEW_TOKENS
    assert chunks[-1].usage.prompt_tokens == case["seq_len"]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_sse_framing(golden, server):
    body = {"model": MODEL, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_multi_turn_history_and_text_only(golden, tokenizers, client):
    hist = golden.case("chat_hist")
    (old_query, old_answer), = hist["history"]
    messages = [user(old_query, data_uri(golden.image_path)), {"role": "assistant", "content": old_answer},
                user(hist["query"])]
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS, messages=messages)
    assert reply.choices[0].message.content == golden_answer(golden, tokenizers, "chat_hist")
    assert reply.usage.prompt_tokens == hist["seq_len"]

    text_only = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS,
                                               messages=[{"role": "user", "content": "Hello, who are you?"}])
    assert text_only.choices[0].message.content == golden_answer(golden, tokenizers, "text_only")
    assert text_only.usage.prompt_tokens == golden.case("text_only")["seq_len"]


@pytest.fixture(scope="module")
def image_http_server(golden):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=golden.dir)
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_by_http_url(golden, tokenizers, client, image_http_server):
    case = golden.case("vqa")
    messages = [user(case["query"], image_http_server + "/image.png")]
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS, messages=messages)
    # the server runs --version chat; the same image as a data URI gives the same answer
    same = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS,
                                          messages=[user(case["query"], data_uri(golden.image_path))])
    assert reply.choices[0].message.content == same.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[user("hi", image_http_server + "/missing.png")])
    assert err.value.code == "invalid_image" and "404" in err.value.body["message"]


def test_sampling_settings_reach_the_chat_core(golden, core, client):
    """A seeded sampled answer is reproducible and equals the chat core's with the same settings."""
    from openai_demo.messages import sampling_config
    from openai_demo.openai_api import parse_args
    from openai_demo.schemas import ChatCompletionRequest
    from utils.pipeline import generation_config

    settings = dict(temperature=1.5, top_p=0.9, seed=1234, max_tokens=12)
    messages = [{"role": "user", "content": "Tell me a story."}]
    replies = [client.chat.completions.create(model=MODEL, messages=messages, extra_body={"repetition_penalty": 1.2},
                                              **settings).choices[0].message.content for _ in range(2)]
    assert replies[0] == replies[1]
    body = ChatCompletionRequest(model=MODEL, messages=messages, repetition_penalty=1.2, **settings)
    config = sampling_config(body, generation_config(parse_args(server_flags(golden))), core.vocab_size)
    # top_k 0: no top-k cut, the whole vocabulary
    assert (config.top_k, config.top_p, config.temperature, config.repetition_penalty) == (0, 0.9, 1.5, 1.2)
    expected = core_turn(core, "Tell me a story.", max_new=12, config=config)
    assert replies[0] == expected.response
    greedy = core_turn(core, "Tell me a story.", max_new=12).response
    assert replies[0] != greedy  # sampling happened


def test_sampling_config_mapping(golden):
    from openai_demo.messages import sampling_config
    from openai_demo.openai_api import parse_args
    from openai_demo.schemas import ChatCompletionRequest
    from utils.pipeline import generation_config

    defaults = generation_config(parse_args(server_flags(golden) + ["--top_k", "5"]))

    def config(**fields):
        return sampling_config(ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     **fields), defaults, 1000)

    assert dataclasses.astuple(config()) == dataclasses.astuple(defaults)  # nothing set: the server's flags
    assert config(temperature=0).greedy
    assert (config(temperature=0.7).top_k, config(temperature=0.7).top_p) == (0, defaults.top_p)  # no top-k cut
    assert config(top_p=0.5, top_k=3).top_k == 3


# Bad requests -----------------------------------------------------------------------------

PNG_TEXT = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
BAD_REQUESTS = {
    "malformed_json": ('{"model": "cogvlm-tiny", "messages": [', None),
    "not_an_object": ("[1, 2]", None),
    "missing_messages": ({"model": MODEL}, "messages"),
    "empty_messages": ({"model": MODEL, "messages": []}, "messages"),
    "unknown_model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    "system_role": ({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi"}]}, "messages.0.role"),
    "tool_role": ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    "assistant_first": ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"},
                                                      {"role": "user", "content": "hi"}]}, "messages.0.role"),
    "two_users": ({"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                {"role": "user", "content": "b"}]}, "messages.1.role"),
    "ends_with_assistant": ({"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}, "messages"),
    "no_content": ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    "unknown_part_type": ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, None),
    "bad_base64": ({"model": MODEL, "messages": [user("hi", "data:image/png;base64,@@not*base64!!")]}, "messages"),
    "not_an_image": ({"model": MODEL, "messages": [user("hi", PNG_TEXT)]}, "messages"),
    "not_image_mime": ({"model": MODEL, "messages": [user("hi", "data:text/plain;base64,aGVsbG8=")]}, "messages"),
    "server_file_path": ({"model": MODEL, "messages": [user("hi", os.path.join(GOLDEN_DIR, "image.png"))]},
                         "messages"),
    "file_url": ({"model": MODEL, "messages": [user("hi", "file:///etc/passwd")]}, "messages"),
    "two_images": ({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
                   "messages"),
    "prompt_over_context": ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    "max_tokens_over_context": ({"model": MODEL, "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]},
                                "max_tokens"),
    "temperature_out_of_range": ({"model": MODEL, "temperature": 7, "messages": [{"role": "user", "content": "x"}]},
                                 "temperature"),
    "negative_max_tokens": ({"model": MODEL, "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]},
                            "max_tokens"),
    "n_2": ({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "x"}]}, "n"),
    "stop_strings": ({"model": MODEL, "stop": ["\n"], "messages": [{"role": "user", "content": "x"}]}, "stop"),
    "stream_with_bad_image": ({"model": MODEL, "stream": True, "messages": [user("hi", PNG_TEXT)]}, "messages"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error(server, name):
    body, param = BAD_REQUESTS[name]
    response = post(server, body)
    assert response.status_code in (400, 422), (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    if param:
        assert error["param"] == param, error


def test_bad_request_messages_name_the_problem(server, client):
    def message(name):
        return post(server, BAD_REQUESTS[name][0]).json()["error"]["message"]

    assert "JSON" in message("malformed_json")
    assert "system prompt" in message("system_role")
    assert "base64" in message("bad_base64")
    assert "not a readable image" in message("not_an_image")
    assert "2 images" in message("two_images")
    assert "context" in message("prompt_over_context")
    with pytest.raises(openai.BadRequestError) as err:  # as the official client sees it
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and MODEL in err.value.body["message"]
    assert httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}).json()["error"]


# Concurrency ------------------------------------------------------------------------------

def test_twenty_concurrent_requests_all_answered_correctly(golden, core, server, client):
    def request(i):
        query = f"Question number {i}: what do you see?"
        image = golden.image_path if i % 2 else None
        messages = [user(query, data_uri(image) if image else None)]
        settings = dict(model=MODEL, temperature=0, max_tokens=8, messages=messages)
        if i % 3 == 0:
            chunks = client.chat.completions.create(stream=True, **settings)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**settings).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(request, range(20)))
    expected = [core_turn(core, f"Question number {i}: what do you see?", max_new=8,
                          image_path=golden.image_path if i % 2 else None).response for i in range(20)]
    assert answers == expected
    wait_idle(server)


def test_aborted_streams_do_not_wedge_the_server(golden, tokenizers, server, client):
    """A client that leaves mid-stream frees its batch row at once; the others run on. (A client that
    leaves while queued: tests/test_engine.py, on a server with one row.)"""
    long_body = {"model": MODEL, "stream": True, "temperature": 0,  # no max_tokens: ~2000 tokens
                 "messages": [{"role": "user", "content": "Tell me everything."}]}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def read_content(lines, events=3, opening=True):
        if opening:
            assert next(lines).startswith("data: ")  # the role chunk
        seen = 0
        for line in lines:
            seen += '"content"' in line
            if seen >= events:
                return

    def wait_running(count):
        deadline = time.monotonic() + 10
        while health(server)["running"] != count:
            assert time.monotonic() < deadline, health(server)
            time.sleep(0.02)

    with httpx.Client(timeout=60, headers=headers) as first_client, httpx.Client(timeout=60, headers=headers) as second_client:
        with first_client.stream("POST", server + "/v1/chat/completions", json=long_body) as first:
            first_lines = first.iter_lines()  # kept: dropping the iterator closes the connection
            read_content(first_lines)
            with second_client.stream("POST", server + "/v1/chat/completions", json=long_body) as second:
                second_lines = second.iter_lines()
                read_content(second_lines)
                assert health(server)["running"] == 2, health(server)  # both in one batch
            wait_running(1)  # the second client has gone: its row is free, the first runs on
            assert health(server)["busy"]
            read_content(first_lines, events=1, opening=False)  # still streaming
    started = time.monotonic()
    wait_idle(server, timeout=10)
    assert time.monotonic() - started < 10
    case = golden.case("chat")
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=NEW_TOKENS,
                                           messages=[user(case["query"], data_uri(golden.image_path))])
    assert reply.choices[0].message.content == golden_answer(golden, tokenizers, "chat")


# finish_reason "stop" --------------------------------------------------------------------

def test_finish_reason_stop_when_the_model_ends(golden):
    """The golden model never emits </s> within its budget, so this runs the app in-process on a copy
    whose </s> row of lm_head is made to win at the first new token of the golden continuation."""
    from starlette.testclient import TestClient

    from openai_demo.openai_api import parse_args
    from openai_demo.server import create_app
    from utils.pipeline import load_pipeline

    args = parse_args(server_flags(golden))
    bundle = load_pipeline(args)
    eos = bundle.tokenizer.eos_token_id
    gen_ids = golden["chat.gen_ids"].tolist()
    step = next(i for i in range(2, NEW_TOKENS) if gen_ids[i] not in gen_ids[:i])
    # the front ends hold the weights packed for oneDNN (models.kernels.packed.PackedLinear): store an edited copy
    lm_head = torch.load(os.path.join(golden.checkpoint, "1", "mp_rank_00_model_states.pt"),
                         weights_only=True)["module"]["mixins.lm.lm_head.weight"]
    lm_head[eos] = lm_head[gen_ids[step]] * 1.05
    bundle.model.mixins["lm"].lm_head.quantize_(lm_head)
    expected = core_turn(bundle, golden.case("chat")["query"], image_path=golden.image_path, max_new=40)
    assert expected.token_ids == gen_ids[:step] + [eos]  # the set-up works as intended

    app = create_app(bundle, MODEL)
    messages = [user(golden.case("chat")["query"], data_uri(golden.image_path))]
    with TestClient(app) as http:
        reply = http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, "max_tokens": 40,
                                                        "messages": messages}).json()
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == expected.response
        assert reply["usage"]["completion_tokens"] == step + 1  # the end token counts
        with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "temperature": 0, "stream": True,
                                                               "messages": messages}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected.response


# Example client ---------------------------------------------------------------------------

def test_example_client_two_turn_chat(golden, core, server):
    proc = subprocess.run([sys.executable, "openai_demo/openai_api_request.py", "--base_url", server + "/v1",
                           "--api_key", API_KEY, "--image", golden.image_path, "--max_tokens", "8", "--stream"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from openai_demo.openai_api_request import DEFAULT_QUESTIONS

    first = core_turn(core, DEFAULT_QUESTIONS[0], image_path=golden.image_path, max_new=8)
    second = core_turn(core, DEFAULT_QUESTIONS[1], history=first.conversation.history, image_path=golden.image_path, max_new=8)
    answers = [line.split("Assistant: ", 1)[1] for line in proc.stdout.splitlines() if "Assistant: " in line]
    assert answers == [first.response, second.response]

    bad = subprocess.run([sys.executable, "openai_demo/openai_api_request.py", "--base_url", server + "/v1",
                          "--api_key", "wrong", "--image", golden.image_path],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


# Entry point ------------------------------------------------------------------------------

def test_upstream_environment_variables_and_flags(golden, monkeypatch):
    from openai_demo.openai_api import parse_args

    monkeypatch.setenv("MODEL_PATH", golden.checkpoint)
    monkeypatch.setenv("TOKENIZER_PATH", golden.tokenizer_dir)
    monkeypatch.setenv("COGVLM_API_KEY", "from-env")
    args = parse_args([])
    assert (args.from_pretrained, args.local_tokenizer, args.api_key) == (golden.checkpoint, golden.tokenizer_dir,
                                                                         "from-env")
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = parse_args(["--from_pretrained", "other", "--api-key", "flag", "--host", "0.0.0.0", "--port", "9"])
    assert (args.from_pretrained, args.api_key, args.host, args.port) == ("other", "flag", "0.0.0.0", 9)


def test_bad_checkpoint_is_one_error_line(tmp_path, capsys):
    from openai_demo.openai_api import main

    assert main(["--from_pretrained", str(tmp_path / "missing"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
