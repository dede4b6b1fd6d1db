"""Linear layers for decoding: a few rows of activations times a large weight, for float layers in their
plain form (training, model parallelism, models loaded without `pack`). The front ends load CPU float
weights packed for oneDNN instead (models.packed), faster than everything here.

Decoding one token per row is bandwidth-bound: every step streams each weight matrix once, so the
product must read its weight near the memory bandwidth. `linear` picks the fastest of torch's CPU kernels
for the row count and dtype, as measured by bench/linear.py (the math is the same; only the summation
order of the dot products can differ):
  - fp32, 4..32 rows: `W @ x^T` instead of `x @ W^T`: MKL's skinny GEMM streams `W` faster that way.
  - bf16, 1..2 rows: torch routes bf16 products to oneDNN, whose few-row kernel streams the weight at
    about a third of the bandwidth; ATen's own bf16 GEMV (fp32 accumulation) streams it near the
    bandwidth. oneDNN is switched off for that call to reach it.
"""
import torch
import torch.nn.functional as F

from sat import mpu
from sat.mpu import ColumnParallelLinear, RowParallelLinear

# Row counts for which the transposed product was faster (bench/linear.py on the project's CPU).
MIN_TRANSPOSED_ROWS, MAX_TRANSPOSED_ROWS = 4, 32
# Up to this many rows ATen's bf16 GEMV beats oneDNN's bf16 GEMM (bench/linear.py).
MAX_BF16_GEMV_ROWS = 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.requires_grad:
        return F.linear(x, weight, bias)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and rows <= MAX_BF16_GEMV_ROWS:
        return _without_onednn(F.linear, x, weight, bias)
    if weight.dtype != torch.float32 or not MIN_TRANSPOSED_ROWS <= rows <= MAX_TRANSPOSED_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _without_onednn(fn, *args):
    """`fn(*args)` with torch's oneDNN (mkldnn) dispatch off.

    The switch is process-wide (torch has no per-thread one): a bf16 product in another thread during
    this call would take ATen's slower non-oneDNN GEMM, with the same result. torch's public
    `torch.backends.mkldnn.flags` also resets its TF32 setting (and warns), hence the private setter.
    """
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return fn(*args)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def apply_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through `linear` when `layer` is a plain SAT parallel linear on one partition.

    LoRA, quantized and model-parallel layers run their own forward unchanged.
    """
    if type(layer) in (ColumnParallelLinear, RowParallelLinear) and single_partition():
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def single_partition() -> bool:
    """Whether the model runs unsplit (one model-parallel partition)."""
    try:
        return mpu.get_model_parallel_world_size() == 1
    except (AssertionError, AttributeError, RuntimeError):  # model parallelism not initialised: one process
        return True
