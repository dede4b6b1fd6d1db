"""Linear layers for decoding: a few rows of activations times a large weight.

Decoding one token per row is bandwidth-bound: every step streams each weight matrix once. On x86
CPUs MKL's fp32 GEMM for `x @ W^T` with 2-16 rows of `x` streams `W` at well under half the
bandwidth it reaches for the same product written as `W @ x^T` (see bench/RESULTS.md: 1024 -> 2816,
8 rows), so batched fp32 decoding gained little over batch 1. `linear` picks the faster form; the
math is the same (only the summation order of the dot products can differ).
"""
import torch
import torch.nn.functional as F

from sat import mpu
from sat.mpu import ColumnParallelLinear, RowParallelLinear

# Up to this many rows the transposed product is faster (measured for 1..32 rows, 1024x2816, fp32).
MAX_TRANSPOSED_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    rows = x.numel() // x.shape[-1]
    if rows > MAX_TRANSPOSED_ROWS or x.device.type != "cpu" or weight.dtype != torch.float32 or x.requires_grad:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def apply_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through `linear` when `layer` is a plain SAT parallel linear on one partition.

    LoRA, quantized and model-parallel layers run their own forward unchanged.
    """
    if type(layer) in (ColumnParallelLinear, RowParallelLinear) and _single_partition():
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def _single_partition() -> bool:
    try:
        return mpu.get_model_parallel_world_size() == 1
    except (AssertionError, AttributeError, RuntimeError):  # model parallelism not initialised: one process
        return True
