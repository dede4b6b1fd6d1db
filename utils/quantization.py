"""Weight quantization for inference (`--quant 8 | 4`).

CPU: int8 weight-only. Every linear layer keeps its weight as int8 with one fp scale per output
channel (symmetric, absmax/127) and multiplies through torch's own int8-weight kernel
(`torch._weight_int8pack_mm`, the op torchao builds on); activations stay fp32/bf16. Decoding on
a CPU is bound by reading weights, so a 4x smaller weight (vs fp32) is what speeds it up.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:  # no fused kernel here: dequantise on the fly
            out = F.linear(flat, self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8_weight_only(model: nn.Module) -> int:
    """Replace every linear layer of `model` in place; returns how many were replaced."""
    if get_model_parallel_world_size() > 1:
        raise CogVLMError("--quant on CPU needs model_parallel_size 1; merge the checkpoint first (merge_model.py)")
    targets = [(name, module) for name, module in model.named_modules() if type(module) in _LINEAR_TYPES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8WeightOnlyLinear(module))
    return len(targets)


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize for inference: int8 weight-only on CPU; SAT's 4/8-bit kernels on CUDA."""
    if bits not in (4, 8):
        raise CogVLMError(f"--quant {bits} is not supported; use --quant 8 or --quant 4")
    device = next(model.parameters()).device
    if device.type == "cuda":
        from sat.quantization.kernels import quantize

        return quantize(model, bits)
    if bits == 4:
        raise CogVLMError("--quant 4 needs a CUDA GPU (cpm_kernels); on CPU use --quant 8")
    count = quantize_int8_weight_only(model)
    logger.info("quantized %d linear layers to int8 weight-only", count)
    return model
