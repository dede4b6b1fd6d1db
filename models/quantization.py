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

from models.errors import CogVLMError

logger = logging.getLogger(__name__)

_LINEAR_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class Int8Linear(nn.Module):
    """A linear layer whose weight (out, in) is stored as int8 with one scale per output channel
    (symmetric, absmax/127), plus an optional float bias. (..., in) -> (..., out), in the input's dtype.

    Built either from a loaded float linear (`from_linear`) or empty and filled when the checkpoint
    loads: `load_state_dict` hands it the float `weight` (and `bias`) of the layer it replaces, and
    it keeps only the quantized form. Loading a model quantized this way never holds its float
    weights, only the checkpoint's tensor of the layer being read.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.has_bias, self.dtype = in_features, out_features, has_bias, dtype
        self.loaded = False
        self.register_buffer("bias", None)

    @classmethod
    def like(cls, linear: nn.Module) -> "Int8Linear":
        """An empty int8 layer of `linear`'s shape, bias and dtype (its weights are not read)."""
        out_features, in_features = linear.weight.shape
        return cls(in_features, out_features, getattr(linear, "bias", None) is not None, linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        layer = cls.like(linear)
        layer.quantize_(linear.weight.detach(), getattr(linear, "bias", None))
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, bias: torch.Tensor = None) -> None:
        """Store `weight` (out, in), any float dtype, as int8 + scales, and `bias` (out,) as it is."""
        weight = weight.float()
        # few full-size temporaries: on a CPU they fragment the heap between the int8 layers kept
        scales = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp(min=1e-12) / 127.0
        self._store(weight, scales)
        self.loaded = True
        if bias is not None:
            self.set_bias_(bias)

    @torch.no_grad()
    def set_bias_(self, bias: torch.Tensor) -> None:
        self.register_buffer("bias", bias.detach().to(self.dtype).clone())

    def _store(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        """Keep the int8 form of `weight` (out, in) fp32 with per-row `scales` (out,) fp32."""
        raise NotImplementedError

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features  # one byte per weight (+ out_features scales)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The checkpoint holds the float layer this one replaced: quantize its tensors as they arrive.
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
            raise RuntimeError("int8 layer used before its weights were loaded")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class Int8WeightOnlyLinear(Int8Linear):
    """int8 weights, float activations: torch's `_weight_int8pack_mm` on CPU."""

    def _store(self, weight, scales):
        self.register_buffer("weight_int8", (weight / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:  # no fused kernel here: dequantise on the fly
            out = F.linear(flat, self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return self._add_bias(out).reshape(*x.shape[:-1], self.out_features)


class Int8DynamicLinear(Int8Linear):
    """int8 per-channel weights packed for fbgemm; activations are quantized to int8 per call."""

    def _store(self, weight, scales):
        qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros(len(scales), dtype=torch.long),
                                             axis=0, dtype=torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # the bias is added after, in float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features).float()
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, _REDUCE_RANGE)
        return self._add_bias(out.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)


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


def quantize_int8(model: nn.Module, weights_loaded: bool = True) -> int:
    """Replace every linear layer of `model` in place by an int8 one; returns how many were replaced.

    weights_loaded False: `model` was built but not loaded yet; its linear weights are never read
    and the int8 layers quantize the checkpoint's tensors as `load_state_dict` passes them.
    """
    if get_model_parallel_world_size() > 1:
        raise CogVLMError("--quant on CPU needs model_parallel_size 1; merge the checkpoint first (merge_model.py)")
    int8_linear = _int8_linear_class()
    targets = [(name, module) for name, module in model.named_modules() if type(module) in _LINEAR_TYPES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, int8_linear.from_linear(module) if weights_loaded else int8_linear.like(module))
    return len(targets)


def quantize_model(model: nn.Module, bits: int, weights_loaded: bool = True) -> nn.Module:
    """Quantize for inference: int8 weights on CPU; SAT's 4/8-bit kernels on CUDA.

    weights_loaded False (CPU only): prepare a freshly built model so that loading its checkpoint
    quantizes layer by layer (see `Int8Linear`).
    """
    if bits not in (4, 8):
        raise CogVLMError(f"--quant {bits} is not supported; use --quant 8 or --quant 4")
    device = next(model.parameters()).device
    if device.type == "cuda":
        if not weights_loaded:
            raise ValueError("SAT's CUDA kernels quantize loaded weights: call quantize_model after loading")
        from sat.quantization.kernels import quantize

        return quantize(model, bits)
    if bits == 4:
        raise CogVLMError("--quant 4 needs a CUDA GPU (cpm_kernels); on CPU use --quant 8")
    count = quantize_int8(model, weights_loaded)
    logger.info("%s %d linear layers to int8", "quantized" if weights_loaded else "prepared", count)
    return model
