"""Weight quantization for inference (`--quant 8 | 4`).

CPU: every linear layer keeps its weight as int8 with one scale per output channel (symmetric,
absmax/127). Decoding on a CPU is bound by reading weights, so a 4x smaller weight (vs fp32) is
what speeds it up. Two of torch's own kernels can multiply by it:
  - x86 (fbgemm): `quantized.linear_dynamic`, which also quantizes each call's activations to int8
    (per tensor, dynamic range) and runs an int8 GEMM. Measured on this 2-core machine, 1 thread, 1024x2816:
    2.7x faster than fp32 at batch 1 and 4.8x at batch 8.
  - elsewhere: `_weight_int8pack_mm` (weight-only; activations stay fp32/bf16). On the x86 machine
    above it was slower than plain fp32 (and ~50x slower for a prefill), hence not the default there.
GPU: SAT's cpm_kernels quantization, as upstream (`sat.quantization.kernels.quantize`).
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.mpu import ColumnParallelLinear, RowParallelLinear, get_model_parallel_world_size

from utils.errors import CogVLMError

logger = logging.getLogger(__name__)

_LINEAR_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer with int8 weights (out, in), per-output-channel scales (out,) and an optional bias.

    (..., in) -> (..., out), in the input's dtype.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def weight_bytes(self) -> int:
        return self.weight_int8.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:  # no fused kernel here: dequantise on the fly
            out = F.linear(flat, self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8DynamicLinear(nn.Module):
    """A linear layer with int8 per-channel weights packed for fbgemm; activations are quantized to
    int8 per call. (..., in) -> (..., out), in the input's dtype."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros(len(scales), dtype=torch.long),
                                             axis=0, dtype=torch.qint8)
        bias = getattr(linear, "bias", None)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features  # one byte per weight (+ out_features scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, _REDUCE_RANGE)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, fbgemm's int8 dot products go through 16-bit sums that saturate on full-range
# activations, so activations get 7 bits there (as torch's fbgemm qconfig does). With VNNI they keep
# 8 bits: on the golden bundle that halves the logit error (0.14 -> 0.07 of max|logit|).
_REDUCE_RANGE = not _cpu_has_vnni()


def _int8_linear_class():
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
        return Int8DynamicLinear
    return Int8WeightOnlyLinear


def quantize_int8(model: nn.Module) -> int:
    """Replace every linear layer of `model` in place by an int8 one; returns how many were replaced."""
    if get_model_parallel_world_size() > 1:
        raise CogVLMError("--quant on CPU needs model_parallel_size 1; merge the checkpoint first (merge_model.py)")
    int8_linear = _int8_linear_class()
    targets = [(name, module) for name, module in model.named_modules() if type(module) in _LINEAR_TYPES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, int8_linear(module))
    return len(targets)


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize for inference: int8 weights on CPU; SAT's 4/8-bit kernels on CUDA."""
    if bits not in (4, 8):
        raise CogVLMError(f"--quant {bits} is not supported; use --quant 8 or --quant 4")
    device = next(model.parameters()).device
    if device.type == "cuda":
        from sat.quantization.kernels import quantize

        return quantize(model, bits)
    if bits == 4:
        raise CogVLMError("--quant 4 needs a CUDA GPU (cpm_kernels); on CPU use --quant 8")
    count = quantize_int8(model)
    logger.info("quantized %d linear layers to int8", count)
    return model
