"""The written-out decode step (`CogVLMModel.decode_step`) against SAT's forward: the same logits bit for bit,
for every weight format the front ends load, both KV caches, padded and unpadded rows; and it runs only
for the models it knows."""
import copy

import pytest
import torch
from sat.model.official.llama_model import LLaMAModel

from conftest import randomize_, tiny_args
from models import CogVLMModel, FineTuneTestCogVLMModel
from models.kv_cache import KVCache, SlotKVCache, ensure_kv_cache_mixin
from models.kernels.packed import pack_linears
from models.kernels.quantization import quantize_model
from utils.generation import generate_batch
from utils.generation_config import GenerationConfig

CACHED = 7  # positions already in the cache


@pytest.fixture(scope="module")
def tiny_model():
    model = randomize_(CogVLMModel(tiny_args()), seed=3).eval()
    ensure_kv_cache_mixin(model)
    return model


def variant(model, kind):
    model = copy.deepcopy(model)
    if kind.startswith("bf16"):
        model = model.to(torch.bfloat16)
    if kind.endswith("packed"):
        pack_linears(model)
    elif kind.endswith(("int8", "int4")):
        quantize_model(model, int(kind[-1]))
    return model


def filled_cache(model, cache_kind, batch_size):
    first = model.transformer.layers[0].attention
    shape = (len(model.transformer.layers), batch_size, first.num_attention_heads_per_partition, CACHED + 4,
             first.hidden_size_per_attention_head)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    if cache_kind == "lockstep":
        cache = KVCache(*shape, dtype, "cpu")
        cache.buffer.copy_(torch.randn(cache.buffer.shape, generator=generator))
        cache.length = CACHED
        return cache, lambda: setattr(cache, "length", CACHED)
    slots = SlotKVCache(*shape, dtype, "cpu")
    slots.buffer.copy_(torch.randn(slots.buffer.shape, generator=generator))
    lengths = [CACHED, CACHED - 3, CACHED - 5][:batch_size]

    def reset():
        slots.lengths[:batch_size] = lengths
        slots._finite[:batch_size] = lengths
    reset()
    return slots, reset


def step_inputs(model, cache, batch_size, padded):
    input_ids = torch.randint(3, 1000, (batch_size, 1), generator=torch.Generator().manual_seed(2))
    dtype = next(model.parameters()).dtype
    if isinstance(cache, SlotKVCache):
        step = cache.decode(batch_size)
        return input_ids, torch.tensor(cache.lengths[:batch_size])[:, None], step.mask.to(dtype), step
    positions = torch.full((batch_size, 1), CACHED)
    mask = torch.ones(batch_size if padded else 1, 1, 1, CACHED + 1, dtype=dtype)
    if padded:
        mask[1, ..., :3] = 0  # row 1 was left-padded by 3
    return input_ids, positions, mask, cache


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp32-packed", "bf16-packed", "fp32-int8", "fp32-int4", "bf16-int4"])
@pytest.mark.parametrize("cache_kind, padded", [("lockstep", False), ("lockstep", True), ("slots", True)])
def test_decode_step_equals_sats_forward(tiny_model, kind, cache_kind, padded):
    model = variant(tiny_model, kind)
    batch_size = 3
    cache, reset = filled_cache(model, cache_kind, batch_size)
    with torch.no_grad():
        input_ids, positions, mask, step_cache = step_inputs(model, cache, batch_size, padded)
        kwargs = dict(input_ids=input_ids, position_ids=positions, attention_mask=mask, kv_cache=step_cache)
        assert model._decodes_directly(input_ids, {k: v for k, v in kwargs.items() if k != "input_ids"})
        direct = model(**kwargs)[0]
        direct_cache = cache.buffer.clone()
        reset()
        through_sat = LLaMAModel.forward(model, **kwargs)[0]
    assert direct.shape == (batch_size, 1, 1000)
    assert torch.equal(direct, through_sat)
    assert torch.equal(direct_cache, cache.buffer)  # the step wrote the same keys and values


def test_generation_decodes_directly_with_the_same_tokens(tiny_model, monkeypatch):
    prompts = [{"input_ids": torch.randint(3, 1000, (1, n)), "position_ids": torch.arange(n)[None],
                "image_embed_mask": torch.zeros(1, n, dtype=torch.long),
                "vision_expert_mask": torch.zeros(1, n, dtype=torch.long)} for n in (5, 9)]
    config = GenerationConfig(max_length=20, top_k=1, end_token_ids=[])
    steps = []
    decode_step = CogVLMModel.decode_step
    monkeypatch.setattr(CogVLMModel, "decode_step", lambda self, *a: steps.append(1) or decode_step(self, *a))
    direct = generate_batch(tiny_model, prompts, config)
    assert len(steps) == max(len(tokens) for tokens in direct) - 1 == 14  # every step after the prefill
    monkeypatch.setattr(CogVLMModel, "_decodes_directly", lambda self, input_ids, kwargs: False)
    assert generate_batch(tiny_model, prompts, config) == direct


def test_models_with_other_mixins_or_autograd_decode_through_sat(tiny_model):
    cache = KVCache(3, 1, 6, 8, 8, torch.float32, "cpu")
    kwargs = dict(position_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1, 1, 1),
                  kv_cache=cache)
    input_ids = torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        assert tiny_model._decodes_directly(input_ids, kwargs)
        assert not tiny_model._decodes_directly(input_ids, dict(kwargs, kv_cache=None))
        assert not tiny_model._decodes_directly(torch.ones(1, 2, dtype=torch.long), kwargs)
        assert not tiny_model._decodes_directly(input_ids, dict(kwargs, output_hidden_states=True))
    assert not tiny_model._decodes_directly(input_ids, kwargs)  # autograd on
    without_cache_mixin = CogVLMModel(tiny_args()).eval()  # SAT would ignore kv_cache: not a decode step
    with torch.no_grad():
        assert not without_cache_mixin._decodes_directly(input_ids, kwargs)
    for flags in (dict(use_lora=True), dict(use_ptuning=True)):
        lora = FineTuneTestCogVLMModel(tiny_args(lora_rank=2, pre_seq_len=2, layer_range=None, **flags)).eval()
        ensure_kv_cache_mixin(lora)
        with torch.no_grad():
            assert not lora._decodes_directly(input_ids, kwargs), flags
