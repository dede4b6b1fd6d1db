"""Linear layers for decoding: a few rows of activations times a large weight.

Decoding one token per row is bandwidth-bound: every step streams each weight matrix once. On the
x86 CPU we measured (bench/linear.py, 2 threads, 1024 -> 2816), MKL's fp32 GEMM for `x @ W^T` streams
`W` at ~25 GB/s for 1 row but only 7.6-12 GB/s for 4-32 rows, where the same product written as
`W @ x^T` runs 1.1-1.4x faster; for 1-3 rows MKL's own path is as fast or faster. `linear` picks the
faster form; the math is the same (only the summation order of the dot products can differ).
"""
import torch
import torch.nn.functional as F

from sat import mpu
from sat.mpu import ColumnParallelLinear, RowParallelLinear

# Row counts for which the transposed product was faster (bench/linear.py on the project's CPU).
MIN_TRANSPOSED_ROWS, MAX_TRANSPOSED_ROWS = 4, 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    rows = x.numel() // x.shape[-1]
    if (not MIN_TRANSPOSED_ROWS <= rows <= MAX_TRANSPOSED_ROWS or x.device.type != "cpu"
            or weight.dtype != torch.float32 or x.requires_grad):
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
