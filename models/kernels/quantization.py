"""CPU weight formats for inference: int8 and int4 (`--quant 8 | 4`).

CPU: every linear layer (language model, visual expert, ViT, adapter, LM head) is replaced by one that
keeps its weight in a kernel's own form. Decoding on a CPU is bound by reading weights, so smaller weights,
read by kernels that stream them near the memory bandwidth, are what speed it up.
The kernels are torch's own (bench/linear.py times them against torchao, oneDNN and inductor):
  - fp32 / bf16 without --quant: models.kernels.packed (the float weight in the kernel's layout; the same base
    class, models.kernels.linear.KernelLinear, but not a QuantizedLinear).
  - int8 (`Int8DynamicLinear`, x86 with VNNI): fbgemm's `quantized.linear_dynamic`: int8 weights with one
    scale per output channel; each call quantizes its activations to int8 (per tensor) and runs an int8
    GEMM. Streams its weights near the memory bandwidth for 1-16 rows and is the fastest prefill product.
    Without VNNI fbgemm's int8 sums saturate unless activations lose a bit, which costs too much accuracy
    (`_int8_linear_class`): there, and off x86, `Int8WeightOnlyLinear` keeps activations in float.
  - int4 (`Int4WeightOnlyLinear`): 4-bit weights with a bf16 scale and zero point per group of
    `group_size` inputs, multiplied by `_weight_int4pack_mm_for_cpu` with bf16 activations for up to
    INT4_KERNEL_MAX_ROWS rows; longer inputs (prefill) dequantize the layer for the call and use the
    bf16 GEMM (AMX where the CPU has it; fp32 on CPUs without bf16 instructions), which is faster there
    than the int4 kernel. The dequantization is our C loop (models.kernels.native) into a buffer kept per thread:
    torch's elementwise ops for it took several times the GEMM's own time for a prompt (bench/RESULTS.md).
Every such layer can be built empty and convert the float tensors `load_state_dict` hands it, so loading a
checkpoint with `quantize_model(model, bits, weights_loaded=False)` (or models.kernels.packed) never holds the
float weights of more than the layers being read. These layers are for inference: they have no float
`weight` in their state dict.
GPU: SAT's cpm_kernels quantization, as upstream (`sat.quantization.kernels.quantize`).
"""
import functools
import logging
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.mpu import get_model_parallel_world_size

from models.errors import CogVLMError
from models.kernels import native
from models.kernels.cpu import has_vnni, is_x86, native_bf16
from models.kernels.linear import KernelLinear, replace_linears

logger = logging.getLogger(__name__)


class QuantizedLinear(KernelLinear):
    """A replacement linear layer whose weight has fewer bits than the model's float dtype (int8, int4): what
    `has_low_bit_weights` looks for. Built and loaded as every KernelLinear is."""


class Int8Linear(QuantizedLinear):
    """int8 weights with one scale per output channel (symmetric, absmax/127)."""

    def _store(self, weight):
        weight = weight.float()
        # few full-size temporaries: on a CPU they fragment the heap between the int8 layers kept
        scales = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp(min=1e-12) / 127.0
        self._store_int8(weight, scales)

    def _store_int8(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        """Keep the int8 form of `weight` (out, in) fp32 with per-row `scales` (out,) fp32."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features  # one byte per weight (+ out_features scales)


# Up to this many rows Int8WeightOnlyLinear runs `_weight_int8pack_mm`; longer inputs dequantize its weight,
# a block of INT8_DEQUANTIZE_BLOCK weights at a time (bounded temporaries, the block stays in cache), for
# MKL's fp32 GEMM (the crossover bench/linear.py finds on an AVX2 CPU).
INT8_KERNEL_MAX_ROWS = 64
INT8_DEQUANTIZE_BLOCK = 2**19
_INT8_IN_ALIGN = 32  # `_weight_int8pack_mm` crashed on an AVX2 CPU for inputs of other widths (172) and > 1 row


class Int8WeightOnlyLinear(Int8Linear):
    """int8 weights, float activations: torch's `_weight_int8pack_mm` for up to INT8_KERNEL_MAX_ROWS rows,
    a dequantized fp32 GEMM for more. On x86 (chosen there only without VNNI) the kernel gets its activations
    in bf16: its fp32 form streamed the weight at a fifth of the speed (bench/linear.py). The weight is
    padded with zero inputs to a multiple of 32."""

    def _store_int8(self, weight, scales):
        q = (weight / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.padded_in = -(-self.in_features // _INT8_IN_ALIGN) * _INT8_IN_ALIGN
        self.register_buffer("weight_int8", F.pad(q, (0, self.padded_in - self.in_features)))  # (out, padded_in)
        self.register_buffer("scales", scales.to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            flat = F.pad(flat, (0, self.padded_in - self.in_features))
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            out = F.linear(flat, self.weight_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        elif len(flat) <= INT8_KERNEL_MAX_ROWS:
            kernel_dtype = torch.bfloat16 if is_x86() else x.dtype
            out = torch.ops.aten._weight_int8pack_mm(flat.to(kernel_dtype).contiguous(), self.weight_int8,
                                                     self.scales.to(kernel_dtype))
        else:
            flat = flat.float()
            block = max(1, INT8_DEQUANTIZE_BLOCK // self.padded_in)
            out = torch.cat([torch.mm(flat, self.weight_int8[start:start + block].float().t())
                             for start in range(0, self.out_features, block)], dim=1).mul_(self.scales.float())
        return self._finish(out, x)


_INT8_DYNAMIC_MM = torch.ops.quantized.linear_dynamic.default  # the overload itself: no resolution per call


class Int8DynamicLinear(Int8Linear):
    """int8 per-channel weights packed for fbgemm; activations are quantized to int8 per call."""

    def _store_int8(self, weight, scales):
        qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros(len(scales), dtype=torch.long),
                                             axis=0, dtype=torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # the bias is added after, in float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        flat = x.reshape(-1, self.in_features).float()
        return self._finish(_INT8_DYNAMIC_MM(flat, self._packed, _REDUCE_RANGE), x)


# Up to this many rows `_weight_int4pack_mm_for_cpu` is faster than dequantizing the layer to bf16 and a
# bf16 GEMM: the kernel dequantizes the weight again for every few rows (its time grows with the rows), the
# dequantized GEMM pays the dequantization once (the crossover: bench/RESULTS.md, "int4 against int8 prompts").
INT4_KERNEL_MAX_ROWS = 16
INT4_GROUP_SIZE = 32
_INT4_ROW_BLOCK = 64  # weights are padded to whole blocks of rows of torch's int4 packing
_INT4_PACK_ROWS = 1024  # rows packed at a time (bounds the int32 temporaries of a large layer)


@functools.lru_cache(maxsize=None)
def _int4_block_rows():
    """Rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout on this CPU, or None when it is
    not the one `_unpack_int4_t` reads (then every product uses the int4 kernel).

    The layout depends on the CPU's vector width (ATen packs blocks of 64 rows with AVX-512, 32 with
    AVX2): in a block, the k-th group of bytes holds row j's k-th nibble low and row j + rows/2's high.
    """
    q = torch.randint(0, 16, (2 * _INT4_ROW_BLOCK, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (_INT4_ROW_BLOCK, _INT4_ROW_BLOCK // 2):
        if torch.equal(_unpack_int4_t(packed, block, *q.shape).to(torch.int32), q.t()):
            return block
    return None


def _unpack_int4_t(packed: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    """torch's CPU int4 packing of a (rows, cols) matrix -> its transpose (cols, rows), uint8 values 0..15."""
    grouped = packed.reshape(rows // block, cols, block // 2)
    return torch.cat([grouped & 15, grouped >> 4], dim=-1).transpose(0, 1).reshape(cols, rows)


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overload itself: no resolution per call


class Int4WeightOnlyLinear(QuantizedLinear):
    """4-bit weights, asymmetric with a bf16 scale and zero point per `INT4_GROUP_SIZE` inputs of a row:
    w = (q - 8) * scale + zero, q in 0..15. Activations go to the kernel in bf16.

    The weight is padded with zeros to whole groups of inputs and whole 64-row blocks of outputs (torch's
    kernel needs both; real CogVLM shapes need no padding).
    """

    group_size = INT4_GROUP_SIZE

    def __init__(self, in_features, out_features, has_bias, dtype=torch.float32):
        super().__init__(in_features, out_features, has_bias, dtype)
        self.padded_in = -(-in_features // self.group_size) * self.group_size
        self.padded_out = -(-out_features // _INT4_ROW_BLOCK) * _INT4_ROW_BLOCK

    def _store(self, weight):
        groups = self.padded_in // self.group_size
        packed, scales_and_zeros = [], torch.empty(groups, self.padded_out, 2, dtype=torch.bfloat16)
        for start in range(0, self.padded_out, _INT4_PACK_ROWS):
            stop = min(start + _INT4_PACK_ROWS, self.padded_out)
            chunk = weight[start:min(stop, self.out_features)].float()
            chunk = F.pad(chunk, (0, self.padded_in - self.in_features, 0, stop - start - len(chunk)))
            chunk = chunk.reshape(stop - start, groups, self.group_size)
            low, high = chunk.amin(-1, keepdim=True), chunk.amax(-1, keepdim=True)
            scale = ((high - low) / 15).clamp_(min=1e-12).bfloat16().float()
            zero = (low + 8 * scale).bfloat16().float()
            # rounded against the bf16 scale and zero that the kernel will use
            q = chunk.sub_(zero).div_(scale).add_(8).round_().clamp_(0, 15).to(torch.int32)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(stop - start, -1), 1))
            scales_and_zeros[:, start:stop, 0] = scale.squeeze(-1).t()
            scales_and_zeros[:, start:stop, 1] = zero.squeeze(-1).t()
        self.register_buffer("weight_int4", torch.cat(packed))
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def weight_bytes(self) -> int:
        return self.weight_int4.numel() + self.scales_and_zeros.numel() * 2

    @torch.no_grad()
    def dequantized_t(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The transposed weight (padded in, padded out) this layer multiplies by, in `dtype` (its values are
        those of bf16 arithmetic either way)."""
        block = _int4_block_rows()
        if block is None:
            raise RuntimeError("torch's int4 packing on this CPU has a layout this layer cannot read")
        q = _unpack_int4_t(self.weight_int4, block, self.padded_out, self.padded_in)
        q = q.reshape(-1, self.group_size, self.padded_out).to(torch.bfloat16)  # (groups, group_size, out)
        scale = self.scales_and_zeros[..., 0].contiguous()  # contiguous: a strided operand is far slower
        offset = self.scales_and_zeros[..., 1] - 8 * scale
        weight = q.mul_(scale.unsqueeze(1)).add_(offset.unsqueeze(1)).reshape(self.padded_in, self.padded_out)
        return weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        # The buffers from the module's dict directly: `self.weight_int4` goes through nn.Module.__getattr__,
        # a noticeable share of a one-row call's overhead, and a decode step makes one such call per linear layer.
        buffers = self._buffers
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in != self.in_features:
            flat = F.pad(flat, (0, self.padded_in - self.in_features))
        if flat.shape[0] <= INT4_KERNEL_MAX_ROWS or _int4_block_rows() is None:
            out = _INT4_MM(flat.contiguous(), buffers["weight_int4"], self.group_size, buffers["scales_and_zeros"])
        elif native_bf16() and native.available():
            weight_t = native.int4_dequantize_t(buffers["weight_int4"], buffers["scales_and_zeros"], self.padded_out,
                                                self.padded_in, self.group_size, _int4_block_rows(),
                                                _dequantize_buffer(self.padded_in * self.padded_out))
            out = torch.mm(flat, weight_t)
        elif native_bf16():
            out = torch.mm(flat, self.dequantized_t())
        else:  # torch emulates bf16 GEMMs on this CPU, far slower than even the int4 kernel: fp32
            out = torch.mm(flat.float(), self.dequantized_t(torch.float32))
        if self.padded_out != self.out_features:
            out = out[:, :self.out_features]
        return self._finish(out, x)


_workspace = threading.local()


def _dequantize_buffer(numel: int) -> torch.Tensor:
    """A bf16 buffer of at least `numel` elements for one layer's dequantized weight, reused by every layer
    this thread runs (the largest layer's size: 90 MB for CogVLM-17B's MLP): a fresh prompt-sized tensor per
    call costs page faults on a CPU (bench/RESULTS.md)."""
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspace.buffer = torch.empty(numel, dtype=torch.bfloat16)
    return buffer


# Without VNNI, fbgemm's int8 dot products go through 16-bit sums that saturate on full-range
# activations, so activations get 7 bits there (as torch's fbgemm qconfig does). With VNNI they keep
# 8 bits: on the golden bundle that halves the logit error (0.14 -> 0.07 of max|logit|).
_REDUCE_RANGE = not has_vnni()


def _int8_linear_class():
    """fbgemm's dynamic int8 where the CPU has VNNI. Without it (AVX2-only CPUs) its 7-bit activations cost
    the golden bundle 0.15 of max|logit| and 26 of 64 greedy tokens, 8-bit activations saturate (0.73), and
    7-bit weights with 8-bit activations still lose 16 tokens (bench/RESULTS.md): weights-only int8 there."""
    if is_x86() and has_vnni():
        torch.backends.quantized.engine = "fbgemm"
        return Int8DynamicLinear
    return Int8WeightOnlyLinear


def quantize_linears(model: nn.Module, layer_class, weights_loaded: bool = True) -> int:
    """`replace_linears(model, layer_class, weights_loaded)` for a quantized `layer_class`, on one
    model-parallel partition only."""
    if get_model_parallel_world_size() > 1:
        raise CogVLMError("--quant on CPU needs model_parallel_size 1; merge the checkpoint first (merge_model.py)")
    return replace_linears(model, layer_class, weights_loaded)


def has_low_bit_weights(model: nn.Module) -> bool:
    """Whether `model` runs int8 or int4 CPU layers (`quantize_model`)."""
    return any(isinstance(module, QuantizedLinear) for module in model.modules())


def quantize_int8(model: nn.Module, weights_loaded: bool = True) -> int:
    """`quantize_linears` with this machine's int8 layer."""
    return quantize_linears(model, _int8_linear_class(), weights_loaded)


def quantize_model(model: nn.Module, bits: int, weights_loaded: bool = True) -> nn.Module:
    """Quantize for inference: int8 or int4 weights on CPU; SAT's 4/8-bit kernels on CUDA.

    weights_loaded False (CPU only): prepare a freshly built model so that loading its checkpoint
    quantizes layer by layer (see `KernelLinear`).
    """
    if bits not in (4, 8):
        raise CogVLMError(f"--quant {bits} is not supported; use --quant 8 or --quant 4")
    device = next(model.parameters()).device
    if device.type == "cuda":
        if not weights_loaded:
            raise ValueError("SAT's CUDA kernels quantize loaded weights: call quantize_model after loading")
        from sat.quantization.kernels import quantize

        return quantize(model, bits)
    layer_class = _int8_linear_class() if bits == 8 else Int4WeightOnlyLinear
    count = quantize_linears(model, layer_class, weights_loaded)
    logger.info("%s %d linear layers to int%d", "quantized" if weights_loaded else "prepared", count, bits)
    return model
