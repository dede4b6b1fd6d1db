"""utils/engine.py (continuous batching) and models.kv_cache.SlotKVCache on the golden tiny model: answers
under concurrency equal lone runs token for token; seeded sampling is independent of the batch; queue
limits, deadlines, cancellation and row reuse; the API server on the engine (429, queued clients)."""
import argparse
import asyncio
import contextlib
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import assert_close_rel, free_port
from models.kv_cache import SlotKVCache, ensure_kv_cache_mixin
from utils.conversation import Conversation
from utils.engine import Engine, EngineError, QueueFull
from utils.engine_args import EngineArgs
from utils.generation import collate
from utils.generation_config import GenerationConfig
from utils.cli import add_inference_args
from utils.pipeline import load_pipeline
from utils.vision import load_image

GREEDY = GenerationConfig(top_k=1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(golden):
    flags = ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
             "--device", "cpu"]
    return load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))


@pytest.fixture(scope="module")
def image(golden):
    return load_image(golden.image_path)


class HookedModel:
    """The model, with `hook(forward_number)` called in the engine thread before each forward."""

    def __init__(self, model, hook=None, delay_s: float = 0.0):
        self.model, self.hook, self.delay_s, self.forwards = model, hook, delay_s, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kwargs):
        self.forwards += 1
        if self.hook is not None:
            self.hook(self.forwards)
        time.sleep(self.delay_s)
        return self.model(**kwargs)


def turn(pipeline, query, image=None, history=(), template="chat", config=GREEDY, max_new=16, engine=None):
    conversation = Conversation(template, image, [tuple(t) for t in history])
    return pipeline.chat(conversation, query, config.replace(max_new_tokens=max_new), engine)


def lone_run(pipeline, *args, **kwargs):
    """The request run alone, the engine-free way (utils.generation.generate_stream): (tokens, streamed text)."""
    alone = turn(pipeline, *args, **kwargs)
    text = "".join(alone)
    return alone.token_ids, text


def lone_tokens(pipeline, *args, **kwargs):
    return lone_run(pipeline, *args, **kwargs)[0]


def submit(engine, chat_turn, timeout=None):
    return engine.submit(chat_turn.inputs, chat_turn.generation_config, chat_turn.generator, timeout)


def wait_until(condition, timeout=10.0, what=""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# The slot cache -------------------------------------------------------------------------------

def test_slot_cache_rows_of_different_lengths_give_the_lone_logits(golden, pipeline, image):
    """Three prompts (27..76 tokens, with and without the image) prefilled as one group into rows 1..3
    (row 0 holds another sequence), then decoded together: every step's logits equal a full forward of that
    row's sequence alone (the bundle's tolerance), so batch composition cannot flip greedy tokens (the golden
    top-2 margins are >= 0.012)."""
    model = pipeline.model
    ensure_kv_cache_mixin(model)
    prompts = [pipeline.processor(Conversation("chat", image), "What is in the image?"),
               pipeline.processor(Conversation("chat", None), "Hello, who are you?"),
               pipeline.processor(Conversation("chat", image, [("What is in the image?", "A red square.")]),
                                  "What color is the sky?")]
    attention = model.transformer.layers[0].attention
    cache = SlotKVCache(len(model.transformer.layers), 4, attention.num_attention_heads_per_partition, 128,
                        attention.hidden_size_per_attention_head, torch.float32, "cpu")
    cache.buffer.fill_(float("nan"))  # never-written memory must not leak into any row
    cache.lengths[0] = 5  # a fourth, unrelated sequence in row 0 (its keys are those NaNs: never read unmasked)
    cache._finite[0] = 0
    batch = collate(prompts)
    writer = cache.prefill(1, [p["input_ids"].shape[1] for p in prompts], batch["input_ids"].shape[1])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], vision_expert_mask=batch["vision_expert_mask"],
                       image_embed_mask=batch["image_embed_mask"], images=batch["images"], kv_cache=writer,
                       last_logits_only=True)[0][:, -1]
        writer.commit()
        sequences = [dict(p) for p in prompts]
        for step in range(4):
            for row, sequence in enumerate(sequences):
                alone = model(input_ids=sequence["input_ids"], position_ids=sequence["position_ids"],
                              attention_mask=torch.ones(1, 1, *[sequence["input_ids"].shape[1]] * 2).tril(),
                              vision_expert_mask=sequence["vision_expert_mask"],
                              image_embed_mask=sequence["image_embed_mask"], images=sequence.get("images"))[0]
                assert_close_rel(logits[row], alone[0, -1], what=f"row {row} step {step}")
            tokens = logits.argmax(-1)
            for sequence, token in zip(sequences, tokens.tolist()):
                for key, value in (("input_ids", token), ("position_ids", int(sequence["position_ids"][0, -1]) + 1),
                                   ("vision_expert_mask", 0), ("image_embed_mask", 0)):
                    sequence[key] = torch.cat([sequence[key], torch.tensor([[value]])], dim=1)
            step_cache = cache.decode(4)
            positions = torch.tensor([[0]] + [[int(s["position_ids"][0, -1])] for s in sequences])
            logits = model(input_ids=torch.cat([torch.tensor([[3]]), tokens[:, None]]), position_ids=positions,
                           attention_mask=step_cache.mask.float(), kv_cache=step_cache)[0][1:, -1]
            step_cache.commit()
    assert cache.lengths[1:] == [p["input_ids"].shape[1] + 4 for p in prompts]


# Greedy answers under concurrency --------------------------------------------------------------

def golden_case_turn(pipeline, golden, image, name, engine=None, max_new=16):
    case = golden.case(name)
    if name == "text_only":
        return turn(pipeline, "Hello, who are you?", engine=engine, max_new=max_new)
    return turn(pipeline, case["query"], image, case["history"], case["signal_type"], engine=engine, max_new=max_new)


def test_mixed_concurrent_requests_equal_their_lone_runs(golden, pipeline, image):
    """Ten requests at once: the five golden cases (four templates, with the image, text-only, multi-turn),
    other lengths and max_tokens, four streamed as chat turns from their own threads; one is cancelled
    mid-stream, and one arrives while the others decode (submitted from the engine thread before its 6th
    forward). (Requests waiting for a free row: test_group_prefill_and_rows_reused.)"""
    late_request = {}
    model = HookedModel(pipeline.model, delay_s=0.001)
    engine = Engine(model, pipeline.defaults.max_length, max_batch_size=10, eos_token_id=pipeline.processor.eos_token_id)
    late_turn = turn(pipeline, "A late question?", image, max_new=12)
    model.hook = lambda n: n == 6 and late_request.setdefault("request", submit(engine, late_turn))
    names = ["base", "chat", "chat_hist", "vqa", "text_only"]
    turns = [golden_case_turn(pipeline, golden, image, name) for name in names[:4]]
    turns += [golden_case_turn(pipeline, golden, image, "text_only", engine=engine),
              turn(pipeline, "Tell me a long story.", max_new=40, engine=engine),
              turn(pipeline, "Describe it briefly.", image, max_new=3, engine=engine),
              turn(pipeline, "And then?", None, [("Who?", "Me."), ("Where?", "Here.")], max_new=25, engine=engine)]
    cancelled_turn = turn(pipeline, "Never stop talking.", max_new=1500)
    requests = engine.submit_many([(t.inputs, t.generation_config, t.generator) for t in turns[:4]] +
                                  [(cancelled_turn.inputs, cancelled_turn.generation_config, None)])
    streamed = {}

    def stream(index):  # as the web demo does: a chat turn iterated on the engine
        streamed[index] = "".join(turns[index])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4, len(turns))]
    for thread in threads:
        thread.start()
    cancelled = []
    for token in requests[-1]:
        cancelled.append(token)
        if len(cancelled) == 5:
            requests[-1].cancel()
    answers = [list(r) for r in requests[:4]]
    for thread in threads:
        thread.join(60)
    late = late_request["request"]
    late_tokens = list(late)

    for name, tokens in zip(names, answers + [turns[4].token_ids]):
        assert tokens == golden[f"{name}.gen_ids"].tolist(), name
    for index in range(5, len(turns)):
        spec = turns[index]
        expected, expected_text = lone_run(pipeline, spec.query, spec.conversation.image,
                                           spec.conversation.history[:-1], max_new=spec.config.max_new_tokens)
        assert spec.token_ids == expected and streamed[index] == expected_text, spec.query
    assert requests[-1].finish_reason == "cancelled" and 5 <= len(cancelled) < 1500
    assert cancelled == lone_tokens(pipeline, "Never stop talking.", max_new=len(cancelled))
    assert late_tokens == lone_tokens(pipeline, "A late question?", image, max_new=12)
    # it joined running rows: its first token came before any golden request had finished
    assert late.first_token_time < min(r.finish_time for r in requests[:4])
    assert [r.finish_reason for r in requests[:4]] == ["length"] * 4
    wait_until(lambda: engine.running == 0, what="rows to be freed")
    assert engine.cache.lengths == [0] * 10
    engine.close()


def test_group_prefill_and_rows_reused(golden, pipeline, image):
    """Six requests on two rows: each freed row takes the next waiting request; answers equal lone runs."""
    engine = Engine(pipeline.model, pipeline.defaults.max_length, max_batch_size=2, eos_token_id=pipeline.processor.eos_token_id)
    specs = [("What is in the image?", image, 5), ("Hi", None, 9), ("Tell me", None, 3), ("Why?", image, 7),
             ("Count", None, 4), ("Colours?", image, 6)]
    turns = [turn(pipeline, q, img, max_new=n) for q, img, n in specs]
    requests = engine.submit_many([(t.inputs, t.generation_config, None) for t in turns])
    answers = [list(r) for r in requests]
    for (query, img, n), tokens in zip(specs, answers):
        assert tokens == lone_tokens(pipeline, query, img, max_new=n), query
    assert engine.running == 0 and engine.cache.lengths == [0, 0]
    engine.close()


def test_a_chat_turn_owns_its_engine_request(pipeline, image):
    """The three ways the front ends run a turn on the engine (iterate, `await next_delta`, `wait` + `finish`)
    give the lone answer, text included; a turn is submitted once, and only to an engine; cancel frees its row."""
    engine = Engine(pipeline.model, pipeline.defaults.max_length, max_batch_size=2,
                    eos_token_id=pipeline.processor.eos_token_id)
    question = "What is in the image?"
    expected_tokens, expected_text = lone_run(pipeline, question, image, max_new=10)

    iterated = turn(pipeline, question, image, max_new=10, engine=engine)
    assert "".join(iterated) == expected_text and iterated.token_ids == expected_tokens
    assert iterated.request.finish_reason == iterated.finish_reason and iterated.response == expected_text.strip()

    async def stream(chat_turn):
        deltas = []
        while (delta := await chat_turn.next_delta(timeout=30)) is not None:
            deltas.append(delta)
        chat_turn.finish()
        return "".join(deltas)

    streamed = turn(pipeline, question, image, max_new=10, engine=engine).submit(timeout=60)
    assert asyncio.run(stream(streamed)) == expected_text and streamed.token_ids == expected_tokens
    assert not streamed.timed_out and streamed.conversation.history[-1] == (question, streamed.response)

    waited = turn(pipeline, question, image, max_new=10, engine=engine).submit()
    with pytest.raises(ValueError, match="already submitted"):
        waited.submit()
    waited.wait().finish()
    assert waited.token_ids == expected_tokens and waited.response == expected_text.strip()

    with pytest.raises(ValueError, match="no engine"):
        turn(pipeline, question).submit()

    long_turn = turn(pipeline, "Talk", max_new=1000, engine=engine).submit()
    wait_until(lambda: engine.running == 1, what="a running row")
    long_turn.cancel()
    wait_until(lambda: engine.running == 0, what="the cancelled turn's row freed")
    assert long_turn.request.finish_reason == "cancelled"
    engine.close()


# Sampling ---------------------------------------------------------------------------------------

def test_seeded_sampled_requests_give_the_same_tokens_alone_and_in_a_batch(golden, pipeline, image):
    engine = Engine(pipeline.model, pipeline.defaults.max_length, eos_token_id=pipeline.processor.eos_token_id)
    sampled = [GenerationConfig(temperature=1.5, top_p=0.9, top_k=0, seed=1234),
               GenerationConfig(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.3, seed=7),
               GenerationConfig(temperature=1.0, top_p=0.5, top_k=0, seed=99)]
    specs = [("Tell me a story.", None, sampled[0]), ("What is in the image?", image, sampled[1]),
             ("Hello there", None, sampled[2]), ("Describe it.", image, GREEDY), ("Go on", None, GREEDY),
             ("Unseeded", None, GenerationConfig(temperature=1.0, top_k=0))]
    turns = [turn(pipeline, q, img, config=c, max_new=14) for q, img, c in specs]
    requests = engine.submit_many([(t.inputs, t.generation_config, t.generator) for t in turns])
    answers = [list(r) for r in requests]
    for (query, img, config), tokens in list(zip(specs, answers))[:5]:
        assert tokens == lone_tokens(pipeline, query, img, config=config, max_new=14), query
    greedy = lone_tokens(pipeline, "Tell me a story.", max_new=14)
    assert answers[0] != greedy  # sampling happened
    assert len(answers[5]) == 14
    engine.close()


# Limits ----------------------------------------------------------------------------------------

def test_queue_full_deadline_cancel_and_reuse(pipeline, image):
    model = HookedModel(pipeline.model, delay_s=0.002)
    engine = Engine(model, pipeline.defaults.max_length, max_batch_size=2, max_waiting=1,
                    eos_token_id=pipeline.processor.eos_token_id)
    long_turns = [turn(pipeline, f"Talk {i}", max_new=1000) for i in range(4)]
    first, second = submit(engine, long_turns[0]), submit(engine, long_turns[1])
    wait_until(lambda: engine.running == 2 and first.token_ids and second.token_ids, what="two running rows")
    queued = submit(engine, long_turns[2])
    assert engine.waiting == 1 and engine.queue_full
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        submit(engine, long_turns[3])
    queued.cancel()  # leaves the queue at the next step, never having run
    wait_until(lambda: queued.done, what="the queued request to leave")
    assert queued.finish_reason == "cancelled" and queued.token_ids == [] and engine.waiting == 0
    first.cancel()
    wait_until(lambda: engine.running == 1, what="a freed row")
    # the freed row is reused; this one's deadline ends it mid-answer
    timed = submit(engine, turn(pipeline, "What is in the image?", image, max_new=1000), timeout=0.2)
    assert list(timed) == lone_tokens(pipeline, "What is in the image?", image, max_new=len(timed.token_ids))
    assert timed.finish_reason == "timeout" and 0 < len(timed.token_ids) < 1000
    expired = submit(engine, long_turns[3], timeout=0)
    assert list(expired) == [] and expired.finish_reason == "timeout"
    second.cancel()
    wait_until(lambda: engine.running == 0, what="idle")
    engine.close()
    with pytest.raises(EngineError, match="stopped"):
        submit(engine, long_turns[3])


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_goes_on(pipeline, image):
    def fail_third_forward(n):
        if n == 3:
            raise RuntimeError("out of memory (simulated)")

    engine = Engine(HookedModel(pipeline.model, fail_third_forward), pipeline.defaults.max_length,
                    eos_token_id=pipeline.processor.eos_token_id)
    chat_turn = turn(pipeline, "What is in the image?", image, max_new=4)
    broken = submit(engine, chat_turn)
    with pytest.raises(EngineError, match="out of memory"):
        list(broken)
    assert broken.finish_reason == "error" and len(broken.token_ids) == 2 and engine.running == 0
    assert list(submit(engine, chat_turn)) == lone_tokens(pipeline, "What is in the image?", image, max_new=4)
    without_image = {k: v for k, v in chat_turn.inputs.items() if k != "images"}
    with pytest.raises(ValueError, match="image block"):
        engine.submit(without_image, chat_turn.generation_config)
    engine.close()


# The API server on the engine -------------------------------------------------------------------

@contextlib.contextmanager
def api_server(pipeline, **app_options):
    """The API app in this process (uvicorn in a thread, on the loaded golden pipeline): its base URL."""
    from openai_demo.server import create_app

    app = create_app(pipeline, "tiny", **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the server to start")
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.server.engine.close()


def health(url):
    return httpx.get(url + "/health", timeout=5).json()


LONG = {"model": "tiny", "stream": True, "temperature": 0, "messages": [{"role": "user", "content": "Go on and on."}]}


def test_api_queued_client_leaves_and_full_queue_is_429(golden, pipeline):
    slow = HookedModel(pipeline.model, delay_s=0.005)
    engine = Engine(slow, pipeline.defaults.max_length, max_batch_size=1, max_waiting=1,
                    eos_token_id=pipeline.processor.eos_token_id)
    with api_server(pipeline, engine=engine) as url, httpx.Client(timeout=60) as running, \
            httpx.Client(timeout=60) as queued:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with running.stream("POST", url + "/v1/chat/completions", json=LONG) as first:
            first_lines = first.iter_lines()
            assert next(first_lines).startswith("data: ")
            wait_until(lambda: health(url)["running"] == 1, what="the first request to run")
            with queued.stream("POST", url + "/v1/chat/completions", json=LONG) as second:
                second_lines = second.iter_lines()  # kept: dropping the iterator closes the connection
                assert next(second_lines).startswith("data: ")
                wait_until(lambda: health(url)["waiting"] == 1, what="the second request to wait")
                with pytest.raises(openai.RateLimitError) as err:
                    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
                assert err.value.status_code == 429 and err.value.code == "queue_full"
            wait_until(lambda: health(url)["waiting"] == 0, what="the queued client to leave")
            assert health(url)["running"] == 1
        wait_until(lambda: health(url)["running"] == 0, what="the running client to leave")
        case = golden.case("chat")
        reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": case["query"]}])
        assert reply.usage.completion_tokens == 16


def test_api_request_timeout(pipeline):
    """--request_timeout: a request that waited past it gets a 503; a running answer is cut at it
    (finish_reason "length")."""
    slow = HookedModel(pipeline.model, delay_s=0.005)
    engine = Engine(slow, pipeline.defaults.max_length, max_batch_size=2, max_waiting=4,
                    eos_token_id=pipeline.processor.eos_token_id)
    with api_server(pipeline, engine=engine, engine_args=EngineArgs(request_timeout=1.5)) as url:
        # both rows taken for longer than the timeout, by requests from elsewhere (no deadline)
        others = [submit(engine, turn(pipeline, f"Talk {i}", max_new=1500)) for i in range(2)]
        wait_until(lambda: engine.running == 2, what="both rows to run")
        waited = httpx.post(url + "/v1/chat/completions", timeout=60, json=dict(LONG, stream=False))
        assert waited.status_code == 503 and waited.json()["error"]["code"] == "timeout"
        assert "--request_timeout of 1.5 s" in waited.json()["error"]["message"]
        others[0].cancel()
        with httpx.stream("POST", url + "/v1/chat/completions", json=LONG, timeout=60) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        assert 10 < len(events) < 1000
        assert not others[1].done
        others[1].cancel()
