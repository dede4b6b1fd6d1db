"""models.kernels.linear: the few-row fp32 and bf16 products used while decoding equal F.linear."""
import pytest
import torch
import torch.nn.functional as F

from models.kernels import linear as linear_module
from models.kernels.linear import (MAX_BF16_GEMV_ROWS, MAX_TRANSPOSED_ROWS, MIN_TRANSPOSED_ROWS, apply_linear, linear,
                                   onednn_disabled)


@pytest.mark.parametrize("shape", [(1, 1, 64), (MIN_TRANSPOSED_ROWS, 1, 64), (MAX_TRANSPOSED_ROWS, 64), (2, 40, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_takes_the_transposed_product_only_for_few_fp32_rows(monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(linear_module.torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    weight = torch.randn(8, 4)
    linear(torch.randn(MIN_TRANSPOSED_ROWS, 4), weight)
    assert calls == [(8, 4)]  # weight @ x^T
    linear(torch.randn(MIN_TRANSPOSED_ROWS - 1, 4), weight)
    linear(torch.randn(MAX_TRANSPOSED_ROWS + 1, 4), weight)
    linear(torch.randn(MIN_TRANSPOSED_ROWS, 4, dtype=torch.bfloat16), weight.bfloat16())
    linear(torch.randn(MIN_TRANSPOSED_ROWS, 4, requires_grad=True), weight)
    assert calls == [(8, 4)]


def test_apply_linear_leaves_other_layers_alone():
    layer = torch.nn.Linear(4, 3)  # not a SAT parallel linear (LoRA, quantized layers are not either)
    x = torch.randn(2, 4)
    torch.testing.assert_close(apply_linear(layer, x), layer(x))


@pytest.mark.parametrize("rows", [1, MAX_BF16_GEMV_ROWS, MAX_BF16_GEMV_ROWS + 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_equals_f_linear(rows, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, 256, generator=generator).bfloat16()
    weight = torch.randn(96, 256, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16() if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (rows, 1, 96) and out.dtype == torch.bfloat16
    # both accumulate in fp32 and round once to bf16: at most a bf16 rounding step apart
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1 / 128, atol=1e-2)


def test_bf16_gemv_runs_with_onednn_off_and_restores_it(monkeypatch):
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(linear_module.F, "linear", lambda *a: seen.append(torch._C._get_mkldnn_enabled())
                        or real_linear(*a))
    weight = torch.randn(8, 4).bfloat16()
    linear(torch.randn(MAX_BF16_GEMV_ROWS, 4).bfloat16(), weight)
    linear(torch.randn(MAX_BF16_GEMV_ROWS + 1, 4).bfloat16(), weight)
    assert seen == [False, True] and torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError):  # shapes that do not multiply: the switch is restored all the same
        linear(torch.randn(1, 5).bfloat16(), weight)
    assert torch._C._get_mkldnn_enabled()


def test_onednn_disabled_restores_the_setting_it_found():
    with onednn_disabled():
        with onednn_disabled():
            assert not torch._C._get_mkldnn_enabled()
        assert not torch._C._get_mkldnn_enabled()  # the inner block found it off
    assert torch._C._get_mkldnn_enabled()
