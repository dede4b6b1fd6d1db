"""Prefix reuse in the serving engine (utils/prefix_cache.py, utils/engine.py): the radix tree's matching and
eviction, and on the golden tiny model and the shipped tiny checkpoints, greedy answers with the cache equal
those without it token for token (a 3-turn chat, two questions about one image, eviction under a tiny
budget), while the prompts reuse what earlier requests computed and the ViT runs once per image."""
import argparse
import json
import os
import shutil
import time

import pytest
import torch

from conftest import ROOT, assert_close_rel
from models.errors import CogVLMError
from models.kv_cache import SlotKVCache, ensure_kv_cache_mixin
from utils.conversation import Conversation
from utils.engine import Engine, engine_for
from utils.engine_args import EngineArgs
from utils.generation_config import GenerationConfig
from utils.cli import add_inference_args
from utils.pipeline import load_pipeline
from utils.prefix_cache import ImageElement, ImageEmbeddingCache, PrefixCache, PromptKey
from utils.vision import load_image

GREEDY = GenerationConfig(top_k=1)
QUESTIONS = ["What is in the image?", "What colour is it?", "And the background?"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(checkpoint, tokenizer=None, *extra):
    flags = ["--from_pretrained", checkpoint, "--device", "cpu", *extra]
    if tokenizer:
        flags += ["--local_tokenizer", tokenizer]
    return load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))


@pytest.fixture(scope="module")
def pipeline(golden):
    return load(golden.checkpoint, golden.tokenizer_dir, "--version", "chat")


@pytest.fixture(scope="module")
def image(golden):
    return load_image(golden.image_path)


class ViTCalls:
    """Counts the images the model's ViT encodes."""

    def __init__(self, model):
        self.images = 0
        vit = model.get_mixin("eva").vit_model
        self.handle = vit.register_forward_pre_hook(lambda module, args, kwargs: self._count(args, kwargs),
                                                    with_kwargs=True)

    def _count(self, args, kwargs):
        self.images += (args[0] if args else kwargs["images"]).shape[0]

    def close(self):
        self.handle.remove()


def chat(pipeline, engine, image, questions=QUESTIONS, max_new=12):
    """A conversation's turns, on `engine` as the API server submits them (None: without an engine): each
    turn's (token ids, prompt positions its request reused or None, prompt length)."""
    conversation = pipeline.conversation(image)
    turns = []
    for question in questions:
        turn = pipeline.chat(conversation, question, GREEDY.replace(max_new_tokens=max_new), engine)
        "".join(turn)
        reused = None if engine is None else turn.request.cached_positions
        turns.append((turn.token_ids, reused, turn.prompt_length))
    return turns


def image_positions(pipeline):
    return 1 + pipeline.processor.text.image_length + 2  # bos + boi, patches, eoi


# The radix tree -------------------------------------------------------------------------------

def kv(start, end, layers=2, heads=1, dim=2):
    """Fake KV of positions [start, end): each position's values are its index."""
    values = torch.arange(start, end, dtype=torch.float32)[None, None, None, :, None]
    return values.expand(layers, 2, heads, end - start, dim).clone()


def key_of(tokens, image=None, at=1, width=4):
    elements = [(t, i) for i, t in enumerate(tokens)]
    widths = [1] * len(tokens)
    if image is not None:
        elements.insert(at, ImageElement(image, b"layout", width))
        widths.insert(at, width)
    return PromptKey(elements, widths, image)


def test_radix_tree_matches_shared_prefixes_to_the_token_and_never_inside_an_image():
    cache = PrefixCache(capacity_bytes=10**6, position_bytes=kv(0, 1).numel() * 4)
    reads = []

    def reader(start, end):
        reads.append((start, end))
        return kv(start, end)

    first = key_of([1, 5, 6, 7], image=b"cat")  # bos, image (4 positions), 5, 6, 7: 8 positions
    cache.insert(first, reader)
    assert reads == [(0, 8)]
    # another question about the same image: shares bos + image + token 5; only the rest is read
    second = key_of([1, 5, 9, 9, 9], image=b"cat")
    length, chunks = cache.match(second, second.positions - 1)
    assert length == 6 and torch.cat(chunks, dim=3)[0, 0, 0, :, 0].tolist() == list(range(6))
    cache.insert(second, reader)
    assert reads[-1] == (6, 9) and cache.positions() == 8 + 3  # the shared 6 positions are stored once
    # another image: only bos matches; a match never ends inside the image block
    assert cache.match(key_of([1, 5, 6, 7], image=b"dog"), 100)[0] == 1
    assert cache.match(first, 4)[0] == 1  # 4 positions would end inside the image: bos only
    assert cache.match(first, 5)[0] == 5
    assert cache.match(key_of([2, 5]), 100)[0] == 0
    # the same prompt again: all but its last position (max_positions), from the tree's own split nodes
    length, chunks = cache.match(second, second.positions - 1)
    assert length == 8 and torch.cat(chunks, dim=3)[0, 0, 0, :, 0].tolist() == list(range(6)) + [6, 7]


def test_radix_tree_evicts_least_recently_used_leaves_within_its_budget():
    position_bytes = kv(0, 1).numel() * 4
    cache = PrefixCache(capacity_bytes=10 * position_bytes, position_bytes=position_bytes)
    cache.insert(key_of([1, 2, 3, 4]), lambda s, e: kv(s, e))
    cache.insert(key_of([1, 2, 7, 8]), lambda s, e: kv(s, e))  # splits [1 2 | 3 4]: 6 positions
    cache.match(key_of([1, 2, 3, 4]), 3)  # [3 4] used more recently than [7 8]
    cache.insert(key_of([9, 9, 9, 9, 9]), lambda s, e: kv(s, e))  # 11 positions > 10: the oldest leaf goes
    assert cache.nbytes == 9 * position_bytes <= cache.capacity_bytes
    assert cache.match(key_of([1, 2, 7, 8]), 10)[0] == 2
    assert cache.match(key_of([1, 2, 3, 4]), 10)[0] == 4
    # longer than the whole budget: its first 10 positions are kept (the start of a long conversation)
    cache.insert(key_of(list(range(20))), lambda s, e: kv(s, e))
    assert cache.nbytes <= cache.capacity_bytes and cache.match(key_of(list(range(20))), 30)[0] == 10
    off = PrefixCache(0, position_bytes)
    off.insert(key_of([1, 2]), lambda s, e: pytest.fail("a cache of 0 bytes reads nothing"))
    images = ImageEmbeddingCache(capacity_bytes=2 * 4 * 3)
    for name in (b"a", b"b", b"c"):
        images.put(name, torch.zeros(1, 3))
    assert images.get(b"a") is None and images.get(b"c") is not None and len(images) == 2


def test_prompt_key_hashes_the_pixels_and_keeps_the_image_block_whole(pipeline, image):
    inputs = pipeline.processor(Conversation("chat", image), "What is in the image?")
    key = PromptKey.of(inputs)
    assert key.positions == inputs["input_ids"].shape[1]
    assert isinstance(key.elements[1], ImageElement) and key.widths[1] == image_positions(pipeline) - 1
    other = dict(inputs, images=inputs["images"].flip(-1))
    assert PromptKey.of(other).elements[1] != key.elements[1] and PromptKey.of(other).elements[2:] == key.elements[2:]
    assert PromptKey.of(dict(inputs)).elements == key.elements


# The engine, golden tiny model ----------------------------------------------------------------

def test_a_three_turn_chat_reuses_its_history_with_the_same_answers(pipeline, image):
    vit = ViTCalls(pipeline.model)
    try:
        without = chat(pipeline, None, image)
        off = Engine(pipeline.model, 512, prefix_cache_gb=0)
        vit.images = 0
        answers_off = chat(pipeline, off, image)
        assert vit.images == 3 and off.prefix_cache is None  # every turn ran the ViT
        off.close()
        engine = Engine(pipeline.model, 512)
        vit.images = 0
        answers = chat(pipeline, engine, image)
        assert vit.images == 1
    finally:
        vit.close()
    assert [t[0] for t in answers] == [t[0] for t in answers_off] == [t[0] for t in without]
    assert answers[0][1] == 0
    for (_, _, previous_prompt), (_, reused, prompt) in zip(answers, answers[1:]):
        # at least the previous turn's whole prompt (its answer is tokenized anew in the history)
        assert previous_prompt <= reused < prompt
    engine.close()


def test_two_questions_about_one_image_share_it_one_after_the_other_and_at_once(pipeline, image):
    engine = Engine(pipeline.model, 512)
    vit = ViTCalls(pipeline.model)
    config = GREEDY.replace(max_new_tokens=10)
    try:
        first = pipeline.chat(pipeline.conversation(image), "What is in the image?", config, engine)
        "".join(first)
        requests = []
        for question in ("How many shapes?", "Is it a photo?"):
            turn = pipeline.chat(pipeline.conversation(image), question, config)
            requests.append((turn, engine.submit(turn.inputs, turn.generation_config)))
        together = [list(request) for _, request in requests]
        assert vit.images == 1  # the later two matched the image block's keys: no ViT at all
        wait_until(lambda: engine.running == 0)  # their rows are kept when they leave
        engine.prefix_cache.clear()  # keys gone, embeddings kept: two new questions in one group
        fresh = [pipeline.chat(pipeline.conversation(image), q, config) for q in ("Shapes?", "Colours?")]
        grouped = engine.submit_many([(t.inputs, t.generation_config, None) for t in fresh])
        grouped_tokens = [list(r) for r in grouped]
        assert vit.images == 1
    finally:
        vit.close()
    for (turn, request), tokens in zip(requests, together):
        assert request.cached_positions >= image_positions(pipeline)
        assert tokens == lone(pipeline, turn.query, image, config)
    assert [r.cached_positions for r in grouped] == [0, 0]
    assert grouped_tokens == [lone(pipeline, t.query, image, config) for t in fresh]
    engine.close()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def lone(pipeline, query, image, config, history=()):
    turn = pipeline.chat(Conversation("chat", image, list(history)), query, config)
    "".join(turn)
    return turn.token_ids


def test_mixed_groups_same_prompt_text_only_and_eviction_under_a_tiny_budget(pipeline, image):
    """A group where some rows continue a kept prefix and others start afresh (with and without the image,
    different lengths); a repeated prompt recomputes only its last token; under a budget of a few positions
    answers stay the same."""
    config = GREEDY.replace(max_new_tokens=8)
    specs = [("What is in the image?", image, ()), ("Hello, who are you?", None, ()),
             ("What colour?", image, [("What is in the image?", "A square.")]), ("Tell me more.", None, ()),
             ("What is in the image?", image, ())]
    expected = [lone(pipeline, q, img, config, h) for q, img, h in specs]
    position_bytes = None
    for budget in (None, "tiny"):
        engine = Engine(pipeline.model, 512, max_batch_size=4)
        if budget == "tiny":
            position_bytes = engine.cache.position_bytes()
            engine.close()
            engine = Engine(pipeline.model, 512, max_batch_size=4, prefix_cache_gb=12 * position_bytes / 1e9)
        warm = [pipeline.chat(Conversation("chat", image), "What is in the image?", config),
                pipeline.chat(Conversation("chat", None), "Hello, who are you?", config)]
        assert [list(engine.submit(t.inputs, t.generation_config)) for t in warm] == expected[:2]
        turns = [pipeline.chat(Conversation("chat", img, list(h)), q, config) for q, img, h in specs]
        requests = engine.submit_many([(t.inputs, t.generation_config, None) for t in turns])
        assert [list(r) for r in requests] == expected, budget
        if budget is None:
            assert requests[0].cached_positions == turns[0].prompt_length - 1  # the same prompt again
            assert requests[1].cached_positions == turns[1].prompt_length - 1
            assert requests[2].cached_positions >= image_positions(pipeline)
        else:
            assert engine.prefix_cache.nbytes <= engine.prefix_cache.capacity_bytes
            assert engine.prefix_cache.positions() <= 12
        engine.close()


def fresh_prefill_logits(model, prompt, low_bit):
    """The last logits of `prompt` prefilled alone through the slot cache (the engine's fresh prefill)."""
    attention = model.transformer.layers[0].attention
    cache = SlotKVCache(len(model.transformer.layers), 1, attention.num_attention_heads_per_partition, 256,
                        attention.hidden_size_per_attention_head, torch.float32, "cpu", low_bit_weights=low_bit)
    length = prompt["input_ids"].shape[1]
    return model(input_ids=prompt["input_ids"], position_ids=prompt["position_ids"],
                 attention_mask=torch.ones(1, 1, length, length).tril(), vision_expert_mask=prompt["vision_expert_mask"],
                 image_embed_mask=prompt["image_embed_mask"], images=prompt.get("images"),
                 kv_cache=cache.prefill(0, [length], length))[0][0, -1]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_prefill_that_continues_a_prefix_gives_the_full_forward_logits(golden_model, pipeline, image, precision,
                                                                        monkeypatch):
    """The slot cache's continuing prefill: a row holding 40 positions of a prompt prefills the rest beside a
    fresh row; each row's logits equal a full forward of its whole prompt (the bundle's tolerance). An int4
    model keeps a bf16 cache: its logits equal those of the engine's fresh prefill, which attends over the keys
    rounded as the cache holds them (with every product through the same int4 weights)."""
    import copy

    from models.kernels.quantization import quantize_model

    from models.kernels import quantization

    low_bit = precision == "int4"
    model = quantize_model(copy.deepcopy(golden_model[0]), 4) if low_bit else pipeline.model
    # every int4 product through the dequantized bf16 weights: torch's int4 kernel (few rows) multiplies by the
    # fp32 values of the same codes, a difference of weights (row-count dependent), not of the cache
    monkeypatch.setattr(quantization, "INT4_KERNEL_MAX_ROWS", 0)
    ensure_kv_cache_mixin(model)
    prompts = [pipeline.processor(Conversation("chat", image, [("What is in the image?", "A red square.")]),
                                  "What color is the sky?"),
               pipeline.processor(Conversation("chat", None), "Hello, who are you?")]
    attention = model.transformer.layers[0].attention
    cache = SlotKVCache(len(model.transformer.layers), 2, attention.num_attention_heads_per_partition, 256,
                        attention.hidden_size_per_attention_head, torch.float32, "cpu", low_bit_weights=low_bit)
    cache.buffer.fill_(float("nan"))
    with torch.no_grad():
        if low_bit:
            whole = [fresh_prefill_logits(model, p, low_bit) for p in prompts]
        else:
            whole = [model(input_ids=p["input_ids"], position_ids=p["position_ids"],
                           attention_mask=torch.ones(1, 1, *[p["input_ids"].shape[1]] * 2).tril(),
                           vision_expert_mask=p["vision_expert_mask"], image_embed_mask=p["image_embed_mask"],
                           images=p.get("images"))[0][0, -1] for p in prompts]
        prefix = 40
        assert prefix > image_positions(pipeline)
        writer = cache.prefill(0, [prefix], prefix)
        p = prompts[0]
        model(input_ids=p["input_ids"][:, :prefix], position_ids=p["position_ids"][:, :prefix],
              attention_mask=torch.ones(1, 1, prefix, prefix).tril(), vision_expert_mask=p["vision_expert_mask"][:, :prefix],
              image_embed_mask=p["image_embed_mask"][:, :prefix], images=p["images"], kv_cache=writer)
        writer.commit()
        kept = cache.read(0, 0, prefix)
        cache.release(0)
        cache.buffer.fill_(float("nan"))
        cache._finite = [0, 0]
        assert cache.write(0, [kept[:, :, :, :10], kept[:, :, :, 10:]]) == prefix
        rest = prompts[0]["input_ids"].shape[1] - prefix
        lengths = [rest, prompts[1]["input_ids"].shape[1]]
        padded = max(lengths)

        def column(key, i):
            value = prompts[i][key][:, prefix:] if i == 0 else prompts[i][key]
            return torch.cat([torch.zeros(1, padded - value.shape[1], dtype=value.dtype), value], dim=1)

        batch = {key: torch.cat([column(key, 0), column(key, 1)]) for key in
                 ("input_ids", "position_ids", "vision_expert_mask", "image_embed_mask")}
        writer = cache.prefill(0, lengths, padded, cached=[prefix, 0])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=writer.mask.float(), vision_expert_mask=batch["vision_expert_mask"],
                       image_embed_mask=batch["image_embed_mask"], kv_cache=writer, last_logits_only=True)[0][:, -1]
        writer.commit()
    for row in range(2):
        assert_close_rel(logits[row], whole[row], what=f"row {row}")
    assert cache.lengths == [prompts[0]["input_ids"].shape[1], prompts[1]["input_ids"].shape[1]]


def test_image_embeds_forward_input_equals_the_pixels(pipeline, image):
    model = pipeline.model
    p = pipeline.processor(Conversation("chat", image), "What is in the image?")
    common = dict(input_ids=p["input_ids"], position_ids=p["position_ids"],
                  attention_mask=torch.ones(1, 1, *[p["input_ids"].shape[1]] * 2).tril(),
                  vision_expert_mask=p["vision_expert_mask"], image_embed_mask=p["image_embed_mask"])
    with torch.no_grad():
        embeds = model.get_mixin("eva").encode_image(p["images"])
        assert torch.equal(model(**common, image_embeds=embeds)[0], model(**common, images=p["images"])[0])
        with pytest.raises(CogVLMError, match="both images and image_embeds"):
            model(**common, images=p["images"], image_embeds=embeds)
        with pytest.raises(CogVLMError, match="image_embeds has shape"):
            model(**common, image_embeds=embeds[:, 1:])


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_models_answer_alike_with_and_without_the_cache(golden_model, pipeline, image, bits):
    """int8 / int4 models keep a bf16 cache (models.kv_cache.cache_dtype): a fresh prompt attends over its keys as
    the cache holds them, so a turn whose history is reused computes what it would afresh."""
    import copy

    from models.kernels.quantization import quantize_model

    model = quantize_model(copy.deepcopy(golden_model[0]), bits)
    with_cache, without_cache = Engine(model, 512), Engine(model, 512, prefix_cache_gb=0)
    answers = chat(pipeline, with_cache, image)
    assert [t[0] for t in answers] == [t[0] for t in chat(pipeline, without_cache, image)]
    assert all(reused >= image_positions(pipeline) for _, reused, _ in answers[1:])
    with_cache.close()
    without_cache.close()


def test_the_cli_reuses_its_conversation(monkeypatch, capsys, caplog, tmp_path):
    """cli_demo.py runs its turns on one engine: turns 2 and 3 reuse the earlier turns' positions, and the
    answers are those of --prefix_cache_gb 0 (the shipped scenes model, whose answers end by themselves)."""
    import io
    import logging
    import sys

    import cli_demo

    checkpoint = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")
    image_positions = 1 + json.load(open(os.path.join(checkpoint, "model_config.json")))["image_length"] + 2
    boxes = tmp_path / "boxes"  # the pictures of the model's grounded answers

    def run(*flags):
        stdin = "\n".join([os.path.join(ROOT, "assets", "scene_1.png"), *QUESTIONS, "stop"]) + "\n"
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="utils.engine"):
            assert cli_demo.main(["--from_pretrained", checkpoint, "--top_k", "1", "--grounding_dir", str(boxes),
                                  *flags]) == 0
        shutil.rmtree(boxes, ignore_errors=True)  # the next run numbers its pictures from 1 again
        reused = [int(r.getMessage().split(": ")[1].split()[0]) for r in caplog.records
                  if r.getMessage().startswith("prefill of")]
        return capsys.readouterr().out, reused

    out, reused = run()
    assert len(reused) == 3 and reused[0] == 0 and all(r > image_positions for r in reused[1:]), reused
    out_off, reused_off = run("--prefix_cache_gb", "0")
    assert out == out_off and reused_off == []  # no prefix cache: the plain prefill, nothing logged


# Flags -----------------------------------------------------------------------------------------

def test_prefix_cache_flag(pipeline):
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())

    def engine_with(*flags):
        return engine_for(pipeline, EngineArgs.from_cli_args(parser.parse_args(list(flags))))

    for bad in ("-1", "nan", "inf"):
        with pytest.raises(CogVLMError, match="--prefix_cache_gb must be 0"):
            EngineArgs.from_cli_args(parser.parse_args(["--prefix_cache_gb", bad]))
    engine = engine_with("--prefix_cache_gb", "0.001")
    assert engine.prefix_cache.capacity_bytes + engine.image_cache.capacity_bytes == pytest.approx(1e6)
    engine.close()
    engine = engine_with("--prefix_cache_gb", "0")
    assert engine.prefix_cache is None and engine.image_cache is None
    engine.close()
    engine = engine_with()
    assert engine.prefix_cache.capacity_bytes + engine.image_cache.capacity_bytes == pytest.approx(
        engine.cache.nbytes() / 4)  # a quarter of the KV memory of 8 rows
    engine.close()
    one_row = EngineArgs.add_cli_args(argparse.ArgumentParser(), batching=False).parse_args([])
    cli = engine_for(pipeline, EngineArgs.from_cli_args(one_row))
    assert cli.max_batch_size == 1 and cli.prefix_cache.capacity_bytes + cli.image_cache.capacity_bytes == \
        pytest.approx(cli.cache.nbytes())  # one row: a whole conversation
    cli.close()


# The shipped tiny checkpoints (trained models) --------------------------------------------------

@pytest.mark.parametrize("name", ["cogvlm-tiny-captcha", "cogvlm-tiny-scenes"])
def test_shipped_checkpoints_answer_alike_with_and_without_the_cache(name):
    shipped = load(os.path.join(ROOT, "checkpoints", name))
    picture = load_image(os.path.join(ROOT, "assets", "scene_1.png"))
    questions = ["What is in the image?", "Where is it?", "What colour is it?"]
    with_cache = Engine(shipped.model, 256)
    without_cache = Engine(shipped.model, 256, prefix_cache_gb=0)
    answers = chat(shipped, with_cache, picture, questions, max_new=10)
    assert [t[0] for t in answers] == [t[0] for t in chat(shipped, without_cache, picture, questions, max_new=10)]
    assert all(reused >= image_positions(shipped) for _, reused, _ in answers[1:])
    with_cache.close()
    without_cache.close()
