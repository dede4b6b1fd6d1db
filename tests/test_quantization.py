"""int8 quantization (--quant 8 on CPU): memory, logit error and greedy agreement on the bundle."""
import copy
import logging

import pytest
import torch

from conftest import ALL_CASES, IMAGE_CASES
from test_golden import case_inputs
from utils.generation import GenerationConfig, generate_stream
from models.errors import CogVLMError
from models.quantization import Int8DynamicLinear, Int8WeightOnlyLinear, quantize_int8, quantize_model


@pytest.fixture(scope="module")
def quantized(golden_model):
    model, _ = golden_model
    return quantize_model(copy.deepcopy(model), 8)


def linear_bytes(model):
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, (Int8DynamicLinear, Int8WeightOnlyLinear)))


def test_every_linear_is_int8_and_weights_shrink(golden_model, quantized):
    model, _ = golden_model
    replaced = [m for m in quantized.modules() if isinstance(m, (Int8DynamicLinear, Int8WeightOnlyLinear))]
    # per LLM layer 5 language + 5 visual-expert linears; lm_head; 4 per ViT layer; 4 in the GLU adapter
    assert len(replaced) == 2 * 10 + 1 + 2 * 4 + 4
    float_linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if hasattr(m, "weight")
                             and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() == 2
                             and type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear", "Linear"))
    assert linear_bytes(quantized) < 0.3 * float_linear_bytes


@pytest.mark.parametrize("name", ALL_CASES)
@torch.no_grad()
def test_logits_close_to_fp32_reference(golden, quantized, name):
    logits = quantized(**case_inputs(golden, name))[0][0]
    expected = golden[f"{name}.logits"]
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert relative < 0.1, relative  # measured (fbgemm, VNNI): 0.071 image cases, 0.029 text-only
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_greedy_tokens_mostly_agree(golden, quantized):
    agree = total = 0
    for name in IMAGE_CASES:
        inputs = {k: v[None] for k, v in ((k, golden[f"{name}.{k}"]) for k in
                  ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask"))}
        length = inputs["input_ids"].shape[1]
        inputs["attention_mask"] = torch.ones(1, 1, length, length).tril()
        inputs["images"] = golden["image"]
        tokens = list(generate_stream(quantized, inputs, GenerationConfig(max_length=length + 16, end_token_ids=[])))
        reference = golden[f"{name}.gen_ids"].tolist()
        # count agreement up to the first divergence (after it the contexts differ)
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        agree, total = agree + prefix, total + len(reference)
    assert agree / total >= 0.75, agree / total  # measured: all 64 tokens agree


def test_4bit_on_cpu_is_a_clear_error(golden_model):
    with pytest.raises(CogVLMError, match="--quant 4 needs a CUDA GPU"):
        quantize_model(copy.deepcopy(golden_model[0]), 4)


@torch.no_grad()
def test_weight_only_kernel_matches_dequantized_weights(golden_model):
    """The fallback for machines without fbgemm: int8 weights, fp activations."""
    linear = golden_model[0].transformer.layers[0].attention.query_key_value
    int8 = Int8WeightOnlyLinear.from_linear(linear)
    x = torch.randn(3, 5, linear.weight.shape[1])
    dequantized = int8.weight_int8.float() * int8.scales[:, None]
    assert torch.allclose(int8(x), x @ dequantized.T, atol=1e-4)
    assert (dequantized - linear.weight).abs().max() <= int8.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("source", ["sat", "hf"])
@torch.no_grad()
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(golden, quantized, source, caplog):
    """`--quant 8` on CPU (load_pipeline) swaps in empty int8 layers before the checkpoint loads,
    so the float weights never all sit in memory; the model must be the same as quantizing after."""
    import argparse

    from test_hf_format import HF_DIR
    from utils.pipeline import add_inference_args, load_pipeline

    checkpoint = golden.checkpoint if source == "sat" else HF_DIR
    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", checkpoint, "--local_tokenizer", golden.tokenizer_dir, "--device", "cpu", "--quant", "8"])
    with caplog.at_level(logging.INFO, logger="models.quantization"):
        model = load_pipeline(args).model
    assert "prepared 33 linear layers to int8" in caplog.text  # before loading, not after
    layers = [m for m in model.modules() if isinstance(m, (Int8DynamicLinear, Int8WeightOnlyLinear))]
    assert len(layers) == 2 * 10 + 1 + 2 * 4 + 4 and all(layer.loaded for layer in layers)
    for name in ALL_CASES:
        inputs = case_inputs(golden, name)
        assert torch.equal(model(**inputs)[0], quantized(**inputs)[0]), name


def test_int8_layer_refuses_a_checkpoint_of_another_shape(golden_model):
    linear = golden_model[0].transformer.layers[0].attention.query_key_value
    layer = Int8WeightOnlyLinear.like(linear)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict({"weight": torch.zeros(3, 5)})
    with pytest.raises(RuntimeError, match="before its weights were loaded"):
        layer(torch.zeros(1, linear.weight.shape[1]))


@pytest.mark.parametrize("int8_class", [Int8DynamicLinear, Int8WeightOnlyLinear])
@torch.no_grad()
def test_weight_and_bias_may_load_in_separate_calls(golden_model, int8_class):
    """HF checkpoints load in groups of tensors: a layer's weight and bias can arrive apart."""
    linear = golden_model[0].get_mixin("eva").vit_model.transformer.layers[0].attention.query_key_value
    assert linear.bias is not None
    layer = int8_class.like(linear)
    assert layer.load_state_dict({"bias": linear.bias}, strict=False).missing_keys == ["weight"]
    assert layer.load_state_dict({"weight": linear.weight}, strict=False).missing_keys == ["bias"]
    x = torch.randn(2, linear.weight.shape[1])
    assert torch.equal(layer(x), int8_class.from_linear(linear)(x))
    assert (layer(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()
