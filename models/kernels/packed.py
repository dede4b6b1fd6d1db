"""fp32 and bf16 weights packed once for the CPU's fastest float kernel (the front ends' float layers).

`pack_linears` (called by `models.checkpoint.load_model(..., pack=True)`, i.e. every front end on CPU) swaps
each linear layer of an inference model for a `packed_layer_class(dtype)` one before the checkpoint loads;
each packs its weight as `load_state_dict` hands it over (models.kernels.linear.KernelLinear):
  - `PackedLinear`: the weight reordered into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`)
    and multiplied by oneDNN's `_linear_pointwise`, the pair torch's inductor uses for CPU linears. Faster at
    every row count than plain `F.linear` (MKL for fp32, oneDNN without prepacking for bf16), which reorders
    per call.
  - `Fp16PackedLinear`: bf16 weights on a CPU without bf16 instructions, where oneDNN cannot pack bf16.
Packed layers have no float `weight` in their state dict: training, merging, conversion and model
parallelism keep plain layers.
"""
import logging

import torch
import torch.nn as nn

from sat.mpu import get_model_parallel_world_size

from models.errors import CogVLMError
from models.kernels.cpu import is_x86, native_bf16
from models.kernels.linear import KernelLinear, replace_linears

logger = logging.getLogger(__name__)


# The row count oneDNN's packing is told to expect: a packing for one row was as fast as the best one for
# every row count from 1 to 283 (bench/linear.py), so one packing serves decoding and prompts alike.
PACK_ROWS_HINT = 1


class PackedLinear(KernelLinear):
    """An fp32 or bf16 weight (not quantized) in oneDNN's blocked layout; products in the weight's dtype."""

    def _store(self, weight):
        weight = weight.detach().to(self.dtype).contiguous()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * self.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        # bias in self.dtype; read from the buffer dict (nn.Module's attribute fallback is slow on this hot path)
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self._buffers["bias"], "none", [], "")
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Fp16PackedLinear(KernelLinear):
    """A bf16 weight held as fp16 in fbgemm's packed layout, products in fp32, outputs in the input's dtype.

    For CPUs without bf16 instructions, where torch emulates bf16 GEMMs (a 283-row product took 9x fp32's
    time in bench/linear.py on an AVX2 EPYC) and oneDNN cannot pack bf16: fbgemm's fp16 kernel reads the same
    2 bytes per weight and converts them in registers (F16C). bf16 values convert to fp16 exactly from
    2^-17 to 65504; smaller ones round to fp16's subnormals (an error below 2^-25 per weight); larger ones
    do not fit and are refused.
    """

    def _store(self, weight):
        weight = weight.detach().to(self.dtype).float()
        largest = float(weight.abs().max()) if weight.numel() else 0.0
        if not largest <= torch.finfo(torch.float16).max:
            raise CogVLMError(f"a weight of magnitude {largest:g} does not fit fp16, which bf16 weights are packed "
                             "in on this CPU (no bf16 instructions): load the model in fp32 instead of --bf16")
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight, None)

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features).float()
        return self._finish(torch.ops.quantized.linear_dynamic_fp16(flat, self._packed), x)


def packed_layer_class(dtype: torch.dtype):
    """The layer `pack_linears` puts in place of a `dtype` linear on this CPU, or None (it stays plain)."""
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return PackedLinear
    if dtype == torch.bfloat16:
        if native_bf16():
            return PackedLinear
        if is_x86():  # fbgemm's fp16 kernel
            return Fp16PackedLinear
    return None


def pack_linears(model: nn.Module, weights_loaded: bool = True) -> int:
    """Replace the fp32/bf16 linear layers of a CPU inference model by `packed_layer_class` ones (see
    `replace_linears` for weights_loaded); returns how many, 0 where there is none for its dtype or the model
    is split (model parallelism)."""
    dtype = next(model.parameters()).dtype
    layer_class = packed_layer_class(dtype)
    if layer_class is None or get_model_parallel_world_size() > 1:
        return 0
    count = replace_linears(model, layer_class, weights_loaded)
    logger.info("%s %d linear layers as %s (%s)", "packed" if weights_loaded else "prepared", count,
                layer_class.__name__, str(dtype).replace("torch.", ""))
    return count
