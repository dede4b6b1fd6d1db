"""Linear layers for decoding: a few rows of activations times a large weight, for float layers in their
plain form (training, model parallelism, models loaded without `pack`). The front ends load CPU float
weights packed for oneDNN instead (models.kernels.packed), faster than everything here.

Decoding one token per row is bandwidth-bound: every step streams each weight matrix once, so the
product must read its weight near the memory bandwidth. `linear` picks the fastest of torch's CPU kernels
for the row count and dtype, as measured by bench/linear.py (the math is the same; only the summation
order of the dot products can differ):
  - fp32, 4..32 rows: `W @ x^T` instead of `x @ W^T`: MKL's skinny GEMM streams `W` faster that way.
  - bf16, 1..2 rows: torch routes bf16 products to oneDNN, whose few-row kernel streams the weight at
    about a third of the bandwidth; ATen's own bf16 GEMV (fp32 accumulation) streams it near the
    bandwidth. oneDNN is switched off for that call (`onednn_disabled`) to reach it.

`KernelLinear` is the base of the layers that replace a float linear layer for inference, each keeping its
weight in a kernel's own form: the packed float layers (models.kernels.packed) and the int8 / int4 ones
(models.kernels.quantization.QuantizedLinear). `replace_linears` swaps them in.
"""
import torch
import torch.nn as nn
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
        with onednn_disabled():
            return F.linear(x, weight, bias)
    if weight.dtype != torch.float32 or not MIN_TRANSPOSED_ROWS <= rows <= MAX_TRANSPOSED_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class onednn_disabled:
    """`with onednn_disabled():` torch's oneDNN (mkldnn) dispatch off inside the block, as it was again after it
    (errors included).

    The switch is torch's and process-wide (torch has no per-thread one): a bf16 product in another thread
    during the block would take ATen's slower non-oneDNN GEMM, with the same result. torch's public
    `torch.backends.mkldnn.flags` also resets its TF32 setting (and warns), hence the private setter. A class
    rather than a contextlib generator: it runs once per 1-2 row bf16 product, where a microsecond shows.
    """

    def __enter__(self):
        self._enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc_info):
        torch._C._set_mkldnn_enabled(self._enabled)


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


_LINEAR_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class KernelLinear(nn.Module):
    """A linear layer (..., in) -> (..., out) in place of a float one, its weight (out, in) kept in a kernel's
    own form (packed or quantized), plus an optional float bias; outputs are in the input's dtype.

    Built either from a loaded float linear (`from_linear`) or empty (`like`) and filled when the
    checkpoint loads: `load_state_dict` hands it the float `weight` (and `bias`) of the layer it
    replaces, and it keeps only its own form. For inference: there is no float `weight` in its state dict.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.has_bias, self.dtype = in_features, out_features, has_bias, dtype
        self.loaded = False
        self.register_buffer("bias", None)

    @classmethod
    def like(cls, linear: nn.Module) -> "KernelLinear":
        """An empty layer of `linear`'s shape, bias and dtype (its weights are not read)."""
        out_features, in_features = linear.weight.shape
        return cls(in_features, out_features, getattr(linear, "bias", None) is not None, linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "KernelLinear":
        layer = cls.like(linear)
        layer.quantize_(linear.weight.detach(), getattr(linear, "bias", None))
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, bias: torch.Tensor = None) -> None:
        """Store `weight` (out, in), any float dtype, in this layer's form, and `bias` (out,) as it is."""
        self._store(weight)
        self.loaded = True
        if bias is not None:
            self.set_bias_(bias)

    @torch.no_grad()
    def set_bias_(self, bias: torch.Tensor) -> None:
        self.register_buffer("bias", bias.detach().to(self.dtype).clone())

    def _store(self, weight: torch.Tensor) -> None:
        """Keep this layer's form of the float `weight` (out, in)."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the kept weight (what one product reads), scales included."""
        raise NotImplementedError

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(rows, out) product -> the input's dtype and shape, bias added."""
        out = out.to(x.dtype)
        bias = self._buffers["bias"]  # see `forward`s: a buffer through nn.Module's attribute fallback is slow
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The checkpoint holds the float layer this one replaced: convert its tensors as they arrive.
        # Weight and bias may come in different calls (HF checkpoints load in groups of tensors).
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: checkpoint {tuple(weight.shape)}, "
                              f"model {(self.out_features, self.in_features)}")
        else:
            self.quantize_(weight)
        if not self.has_bias:
            if bias is not None:
                unexpected_keys.append(prefix + "bias")
        elif bias is None:
            missing_keys.append(prefix + "bias")
        elif tuple(bias.shape) != (self.out_features,):
            error_msgs.append(f"size mismatch for {prefix}bias: checkpoint {tuple(bias.shape)}, "
                              f"model {(self.out_features,)}")
        else:
            self.set_bias_(bias)

    def _check_loaded(self):
        if not self.loaded:
            raise RuntimeError(f"{type(self).__name__} used before its weights were loaded")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


def replace_linears(model: nn.Module, layer_class, weights_loaded: bool = True) -> int:
    """Replace every plain linear layer of `model` in place by a `layer_class` (a KernelLinear) one; returns
    how many.

    weights_loaded False: `model` was built but not loaded yet; its linear weights are never read
    and the new layers convert the checkpoint's tensors as `load_state_dict` passes them.
    """
    targets = [(name, module) for name, module in model.named_modules() if type(module) in _LINEAR_TYPES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer_class.from_linear(module) if weights_loaded else layer_class.like(module))
    return len(targets)
