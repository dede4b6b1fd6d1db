"""int8 and int4 quantization (--quant 8 / --quant 4 on CPU): memory, logit error and greedy agreement on the
bundle, quantizing while loading, and the int4 layer against the weights it dequantizes to."""
import copy
import logging

import pytest
import torch

from conftest import ALL_CASES, IMAGE_CASES, assert_close_rel
from test_golden import case_inputs
from utils.generation import generate_stream
from utils.generation_config import GenerationConfig
from models.errors import CogVLMError
from models.kernels import quantization
from models.kernels.cpu import is_x86
from models.kernels.linear import KernelLinear
from models.kernels.packed import Fp16PackedLinear, PackedLinear, pack_linears, packed_layer_class
from models.kernels.quantization import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear,
                                         QuantizedLinear, quantize_model)

# per LLM layer 5 language + 5 visual-expert linears; lm_head; 4 per ViT layer; 4 in the GLU adapter
GOLDEN_LINEARS = 2 * 10 + 1 + 2 * 4 + 4


@pytest.fixture(scope="module")
def quantized(golden_model):
    model, _ = golden_model
    return quantize_model(copy.deepcopy(model), 8)


@pytest.fixture(scope="module")
def quantized4(golden_model):
    model, _ = golden_model
    return quantize_model(copy.deepcopy(model), 4)


@pytest.fixture(scope="module")
def dequantized4(golden_model, quantized4):
    """The fp32 model whose every linear weight is what its int4 layer multiplies by."""
    model = copy.deepcopy(golden_model[0])
    layers = dict(quantized4.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(layers.get(name), Int4WeightOnlyLinear):
                int4 = layers[name]
                module.weight.copy_(int4.dequantized_t().t()[:int4.out_features, :int4.in_features])
    return model


def linear_bytes(model):
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))


@pytest.mark.parametrize("bits, layer_class, byte_ratio", [(8, (Int8DynamicLinear, Int8WeightOnlyLinear), 0.3),
                                                           (4, Int4WeightOnlyLinear, 0.2)])
def test_every_linear_is_quantized_and_weights_shrink(golden_model, quantized, quantized4, bits, layer_class,
                                                      byte_ratio):
    model, _ = golden_model
    replaced = [m for m in (quantized if bits == 8 else quantized4).modules() if isinstance(m, layer_class)]
    assert len(replaced) == GOLDEN_LINEARS
    float_linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if hasattr(m, "weight")
                             and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() == 2
                             and type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear", "Linear"))
    # int4: half a byte per weight + a bf16 scale and zero per 32 (0.156) and the padding to 64 rows: 0.165
    assert sum(m.weight_bytes() for m in replaced) < byte_ratio * float_linear_bytes


@pytest.mark.parametrize("name", ALL_CASES)
@torch.no_grad()
def test_logits_close_to_fp32_reference(golden, quantized, name):
    logits = quantized(**case_inputs(golden, name))[0][0]
    expected = golden[f"{name}.logits"]
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert relative < 0.1, relative
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def greedy_tokens(golden, model, name):
    inputs = {k: v[None] for k, v in ((k, golden[f"{name}.{k}"]) for k in
              ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask"))}
    length = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, length, length).tril()
    inputs["images"] = golden["image"]
    with torch.no_grad():
        return list(generate_stream(model, inputs, GenerationConfig(max_length=length + 16, end_token_ids=[])))


def agreeing_prefix(tokens, reference):
    """Tokens equal up to the first divergence (after it the contexts differ)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def test_greedy_tokens_mostly_agree(golden, quantized):
    agree = total = 0
    for name in IMAGE_CASES:
        reference = golden[f"{name}.gen_ids"].tolist()
        agree, total = agree + agreeing_prefix(greedy_tokens(golden, quantized, name), reference), total + len(reference)
    assert agree / total >= 0.75, agree / total


@pytest.mark.parametrize("name", ALL_CASES)
@torch.no_grad()
def test_int4_logits_near_fp32_and_equal_to_its_dequantized_weights(golden, quantized4, dequantized4, name):
    """The bundle's model has random weights (no redundancy): 4-bit rounding moves its logits far more
    than int8's. Against the fp32 model with the very weights int4 dequantizes to, only the kernel's bf16
    activations differ."""
    logits = quantized4(**case_inputs(golden, name))[0][0]
    expected = golden[f"{name}.logits"]
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert relative < 0.45, relative
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.35
    same_weights = dequantized4(**case_inputs(golden, name))[0][0]
    relative = ((logits - same_weights).abs().max() / same_weights.abs().max()).item()
    assert relative < 0.08, relative


def test_int4_greedy_tokens_are_those_of_its_weights(golden, quantized4, dequantized4):
    """int4 keeps the greedy tokens its 4-bit weights allow: as many golden tokens as the fp32 model with
    the dequantized weights keeps (measured 1, 2, 3, 5 of 16 per image case; that model keeps 0, 2, 3, 5)."""
    kept = kept_by_weights = 0
    for name in IMAGE_CASES:
        reference = golden[f"{name}.gen_ids"].tolist()
        kept += agreeing_prefix(greedy_tokens(golden, quantized4, name), reference)
        kept_by_weights += agreeing_prefix(greedy_tokens(golden, dequantized4, name), reference)
    assert kept >= kept_by_weights - 1 and kept >= 8, (kept, kept_by_weights)


def test_unsupported_bits_are_a_clear_error(golden_model):
    with pytest.raises(CogVLMError, match="--quant 3 is not supported"):
        quantize_model(copy.deepcopy(golden_model[0]), 3)


@pytest.mark.parametrize("rows", [1, 15, 40])  # the int8 kernel (bf16 activations on x86), the dequantized GEMM
@torch.no_grad()
def test_weight_only_int8_multiplies_by_its_int8_weights(golden_model, rows):
    """int8 weights, float activations (CPUs without VNNI, or fbgemm): the product of the int8 weights
    times their scales, the inputs padded to a multiple of 32 (172 -> 192 here)."""
    linear = golden_model[0].transformer.layers[0].mlp.dense_4h_to_h
    int8 = Int8WeightOnlyLinear.from_linear(linear)
    in_features = linear.weight.shape[1]
    assert int8.weight_int8.shape == (linear.weight.shape[0], 192) and not int8.weight_int8[:, in_features:].any()
    dequantized = int8.weight_int8[:, :in_features].float() * int8.scales[:, None]
    assert (dequantized - linear.weight).abs().max() <= int8.scales.max() / 2 + 1e-6
    x = torch.randn(rows, in_features)
    if rows <= quantization.INT8_KERNEL_MAX_ROWS and is_x86():
        assert_close_rel(int8(x), x.bfloat16().float() @ dequantized.T, rel=1e-2, what="kernel, bf16 activations")
    else:
        assert_close_rel(int8(x), x @ dequantized.T, rel=1e-5, what="dequantized GEMM")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("source", ["sat", "hf"])
@torch.no_grad()
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(golden, quantized, quantized4, source, bits,
                                                                     caplog):
    """`--quant 8|4` on CPU (load_pipeline) swaps in empty quantized layers before the checkpoint loads,
    so the float weights never all sit in memory; the model must be the same as quantizing after."""
    import argparse

    from test_hf_format import HF_DIR
    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline

    checkpoint = golden.checkpoint if source == "sat" else HF_DIR
    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--device", "cpu",
         "--quant", str(bits)])
    with caplog.at_level(logging.INFO, logger="models.kernels.quantization"):
        model = load_pipeline(args).model
    assert f"prepared {GOLDEN_LINEARS} linear layers to int{bits}" in caplog.text  # before loading, not after
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == GOLDEN_LINEARS and all(layer.loaded for layer in layers)
    reference = quantized if bits == 8 else quantized4
    for name in ALL_CASES:
        inputs = case_inputs(golden, name)
        assert torch.equal(model(**inputs)[0], reference(**inputs)[0]), name


@pytest.mark.parametrize("layer_class", [Int8WeightOnlyLinear, Int4WeightOnlyLinear, PackedLinear, Fp16PackedLinear])
def test_quantized_layer_refuses_a_checkpoint_of_another_shape(golden_model, layer_class):
    linear = golden_model[0].transformer.layers[0].attention.query_key_value
    layer = layer_class.like(linear)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict({"weight": torch.zeros(3, 5)})
    with pytest.raises(RuntimeError, match="before its weights were loaded"):
        layer(torch.zeros(1, linear.weight.shape[1]))


@pytest.mark.parametrize("layer_class, tolerance", [(Int8DynamicLinear, 0.05), (Int8WeightOnlyLinear, 0.05),
                                                     (Int4WeightOnlyLinear, 0.2), (PackedLinear, 1e-5),
                                                     (Fp16PackedLinear, 1e-2)])
@torch.no_grad()
def test_weight_and_bias_may_load_in_separate_calls(golden_model, layer_class, tolerance):
    """HF checkpoints load in groups of tensors: a layer's weight and bias can arrive apart."""
    linear = golden_model[0].get_mixin("eva").vit_model.transformer.layers[0].attention.query_key_value
    assert linear.bias is not None
    layer = layer_class.like(linear)
    assert layer.load_state_dict({"bias": linear.bias}, strict=False).missing_keys == ["weight"]
    assert layer.load_state_dict({"weight": linear.weight}, strict=False).missing_keys == ["bias"]
    x = torch.randn(2, linear.weight.shape[1])
    assert torch.equal(layer(x), layer_class.from_linear(linear)(x))
    assert (layer(x) - linear(x)).abs().max() < tolerance * linear(x).abs().max()


def test_int4_packing_layout_is_read_back_exactly():
    """The prefill path dequantizes from torch's packed layout, which it must read right on this CPU."""
    assert quantization._int4_block_rows() in (64, 32)  # AVX-512 / AVX2 builds of ATen
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    unpacked = quantization._unpack_int4_t(packed, quantization._int4_block_rows(), *q.shape)
    assert torch.equal(unpacked.to(torch.int32), q.t())


@pytest.mark.parametrize("in_features, out_features", [(64, 192), (172, 100)])  # the second needs padding
@torch.no_grad()
def test_int4_kernel_and_prefill_paths_multiply_by_the_same_weights(in_features, out_features, monkeypatch):
    """Few rows go through torch's int4 kernel, many through the dequantized bf16 weight: the same product
    (up to bf16 rounding), and both that of the group-wise 4-bit weights."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    torch.nn.init.normal_(linear.weight, std=0.02, generator=generator)
    layer = Int4WeightOnlyLinear.from_linear(linear)
    weight = layer.dequantized_t().t()[:out_features, :in_features].float()
    # 4-bit rounding: half a step (a 15th of its group's range) from the float weight at most, on average a
    # quarter step; the bf16 scale, zero point and dequantized product add up to a few % of a step
    groups = torch.nn.functional.pad(linear.weight, (0, layer.padded_in - in_features)).reshape(out_features, -1, 32)
    half_steps = ((groups.amax(-1) - groups.amin(-1)) / 30).repeat_interleave(32, dim=1)[:, :in_features]
    error_in_half_steps = (weight - linear.weight).abs() / half_steps
    assert error_in_half_steps.max() < 1.25 and error_in_half_steps.mean() < 0.55
    monkeypatch.setattr(quantization, "INT4_KERNEL_MAX_ROWS", 4)
    for rows in (1, 4, 5, 40):
        x = torch.randn(2, rows, in_features, generator=generator)
        out = layer(x)
        expected = x.bfloat16().float() @ weight.T + linear.bias
        assert out.shape == (2, rows, out_features) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_packed_float_layers_are_replacements_but_not_low_bit():
    """Every replacement layer is a KernelLinear (loading, packing); only the int8 / int4 ones are QuantizedLinear,
    what `has_low_bit_weights` (and with it the KV cache's dtype) asks for."""
    for layer_class in (PackedLinear, Fp16PackedLinear):
        assert issubclass(layer_class, KernelLinear) and not issubclass(layer_class, QuantizedLinear)
    for layer_class in (Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear):
        assert issubclass(layer_class, QuantizedLinear) and issubclass(layer_class, KernelLinear)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 300])
@torch.no_grad()
def test_packed_layer_is_the_float_product(dtype, rows):
    """The packed layer keeps the float weight (oneDNN's layout; for bf16 without bf16 instructions, fbgemm's
    fp16 one, where bf16 values are exact): products equal F.linear's up to summation order."""
    layer_class = packed_layer_class(dtype)
    assert layer_class in (PackedLinear, Fp16PackedLinear)  # oneDNN, and fbgemm on x86: every CPU we run on
    linear = torch.nn.Linear(96, 160).to(dtype)
    layer = layer_class.from_linear(linear)
    x = torch.randn(rows, 3, 96, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 3, 160)
    assert_close_rel(out, linear(x), rel=1e-5 if dtype == torch.float32 else 1e-2, what=f"{dtype} x {rows} rows")
    assert layer.weight_bytes() == 96 * 160 * dtype.itemsize
    assert "weight" not in layer.state_dict()  # an inference layer: its weight lives in the kernel's layout only


def test_fp16_packing_refuses_bf16_weights_beyond_fp16s_range():
    layer = Fp16PackedLinear(4, 2, False, torch.bfloat16)
    with pytest.raises(CogVLMError, match="does not fit fp16.*fp32 instead of --bf16"):
        layer.quantize_(torch.tensor([[1.0, 7e4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    layer.quantize_(torch.tensor([[1.0, 6e4, 2.0 ** -20, 0.0], [0.0, 0.0, 0.0, -3.0]]))
    out = layer(torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16))
    big = torch.tensor(6e4).bfloat16().item()  # the bf16 weight (59904), exact in fp16; 2^-20 is a subnormal there
    assert torch.equal(out, torch.tensor([[1.0 + big + 2.0 ** -20, -3.0]]).bfloat16())


@pytest.mark.parametrize("flags, dtype", [([], torch.float32), (["--bf16"], torch.bfloat16)])
@torch.no_grad()
def test_front_ends_load_float_weights_packed(golden, golden_model, flags, dtype, caplog):
    """load_pipeline (every front end) packs the float linears as the checkpoint loads; the logits are the
    unpacked model's: the golden ones in fp32, bf16's own in bf16."""
    import argparse

    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline

    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--device", "cpu"] + flags)
    with caplog.at_level(logging.INFO, logger="models.kernels.packed"):
        model = load_pipeline(args).model
    layer_class = packed_layer_class(dtype)
    assert f"prepared {GOLDEN_LINEARS} linear layers as {layer_class.__name__}" in caplog.text  # before loading
    layers = [m for m in model.modules() if isinstance(m, layer_class)]
    assert len(layers) == GOLDEN_LINEARS and all(layer.loaded and layer.dtype == dtype for layer in layers)
    plain = copy.deepcopy(golden_model[0]).to(dtype)
    for name in ALL_CASES:
        inputs = case_inputs(golden, name)
        if "images" in inputs:
            inputs["images"] = inputs["images"].to(dtype)
        logits = model(**inputs)[0][0]
        if dtype == torch.float32:
            assert_close_rel(logits, golden[f"{name}.logits"], what=f"{name}.logits")
        else:  # bf16 rounds differently packed and plain: each as far from fp32 as bf16 allows
            expected = golden[f"{name}.logits"]
            packed_error = (logits.float() - expected).abs().max() / expected.abs().max()
            plain_error = (plain(**inputs)[0][0].float() - expected).abs().max() / expected.abs().max()
            assert packed_error < 0.04 and plain_error < 0.04, (name, packed_error, plain_error)


def test_packing_a_loaded_model_keeps_its_products(golden, golden_model):
    model = copy.deepcopy(golden_model[0])
    assert pack_linears(model) == GOLDEN_LINEARS
    inputs = case_inputs(golden, "chat")
    with torch.no_grad():
        assert_close_rel(model(**inputs)[0][0], golden["chat.logits"], what="chat.logits")


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_model_decodes_over_a_bf16_cache(golden, golden_model, quantized, quantized4, bits, monkeypatch):
    """Where our decode attention runs, an int8 / int4 model's KV cache holds bf16 (half the bytes a decode
    step reads; models.kv_cache.cache_dtype). int8 decodes the greedy tokens it decodes over an fp32 cache;
    int4, whose random-weight tokens leave the golden ones after a few steps either way, keeps as many golden
    tokens (measured: 11 of 64 over both caches, the first difference between the two at token 10)."""
    from models import kv_cache
    from models.kernels import native
    from utils import generation

    model = quantized if bits == 8 else quantized4
    assert quantization.has_low_bit_weights(model)
    packed = copy.deepcopy(golden_model[0])
    assert pack_linears(packed) > 0 and not quantization.has_low_bit_weights(packed)
    built = []

    class RecordedKVCache(kv_cache.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.buffer.dtype)

    monkeypatch.setattr(generation, "KVCache", RecordedKVCache)
    over_bf16 = [greedy_tokens(golden, model, name) for name in IMAGE_CASES]
    assert built == [torch.bfloat16 if native.available() else torch.float32] * len(IMAGE_CASES)
    monkeypatch.setattr(kv_cache, "cache_dtype", lambda dtype, device, low_bit_weights=False: torch.float32)
    over_fp32 = [greedy_tokens(golden, model, name) for name in IMAGE_CASES]
    assert built[len(IMAGE_CASES):] == [torch.float32] * len(IMAGE_CASES)
    if bits == 8:
        assert over_bf16 == over_fp32
    references = [golden[f"{name}.gen_ids"].tolist() for name in IMAGE_CASES]
    kept_bf16 = sum(agreeing_prefix(tokens, reference) for tokens, reference in zip(over_bf16, references))
    kept_fp32 = sum(agreeing_prefix(tokens, reference) for tokens, reference in zip(over_fp32, references))
    assert kept_bf16 >= kept_fp32 - 1, (kept_bf16, kept_fp32)
