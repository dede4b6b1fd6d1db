"""Our own CPU kernels (models/kernels/csrc/cpu_kernels.c), for x86 CPUs with AVX-512 or AVX2 + FMA: attention of one
query per row over an fp32 or bf16 KV cache (decoding), and the dequantization of an int4 layer to bf16 (a
prompt's products, models.kernels.quantization.Int4WeightOnlyLinear).

The C file is compiled on first use with the system's C compiler (`cc`, or $CC) for this CPU
(`-march=native`) into ~/.cache/cogvlm/kernels (or $COGVLM_KERNEL_CACHE), keyed by the source, the flags
and the CPU, and loaded with ctypes (a C file without torch headers builds in about a second, where a torch
C++ extension takes half a minute). Without a compiler, on other CPUs, or with COGVLM_NATIVE_KERNELS=0,
`library()` is None and every caller keeps torch's kernels.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

from models.kernels.cpu import cpu_flags, is_x86

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
CACHE_DTYPES = (torch.float32, torch.bfloat16)

_i64, _f32p, _u8p, _i64p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
_SIGNATURES = {
    "cogvlm_native_kernels": ([], ctypes.c_int),
    "cogvlm_max_head_dim": ([], ctypes.c_int),
    "cogvlm_decode_attention": ([_f32p, _i64p, _f32p, _f32p, _i64p, ctypes.c_int, _u8p, _i64, _f32p, _i64, _i64,
                                 _i64, ctypes.c_int, ctypes.c_float, ctypes.c_int], None),
    "cogvlm_int4_dequantize_t": ([_u8p, _u8p, _u8p, _i64, _i64, _i64, _i64, ctypes.c_int], None),
}


def _cache_dir() -> str:
    return os.environ.get("COGVLM_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cogvlm", "kernels")


def _build(compiler: str, arch: str) -> str:
    """Path of the compiled library for this source, compiler, target (`-march=arch`) and CPU (built now if
    missing)."""
    flags = FLAGS + [f"-march={arch}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(flags + [version, cpu_flags()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = os.path.join(folder, f"cpu_kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=folder)
        os.close(handle)
        try:
            subprocess.run([compiler, *flags, SOURCE, "-o", partial], check=True, capture_output=True, text=True)
            os.replace(partial, path)  # whole or absent: another process may be building the same file
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return path


def load(arch: str = "native") -> Optional[ctypes.CDLL]:
    """The kernels built for `-march=arch` (this CPU by default; tests also build "haswell", the AVX2 one), or
    None where they cannot be built or have no kernel for that target (the reason is logged)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not is_x86() or compiler is None:
        logger.info("native CPU kernels off: %s", "not an x86 CPU" if compiler else "no C compiler (cc) found")
        return None
    try:
        lib = ctypes.CDLL(_build(compiler, arch))
    except (OSError, subprocess.CalledProcessError) as error:
        lines = (getattr(error, "stderr", "") or str(error)).strip().splitlines() or [""]
        logger.warning("native CPU kernels off: building %s failed: %s", SOURCE,
                       next((line for line in lines if "error" in line), lines[0]))
        return None
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    if not lib.cogvlm_native_kernels():
        logger.info("native CPU kernels off: this CPU has neither AVX-512 nor AVX2 with FMA")
        return None
    lib.max_head_dim = lib.cogvlm_max_head_dim()
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The kernels for this CPU, loaded once (None: switched off by COGVLM_NATIVE_KERNELS=0, or `load` failed)."""
    if os.environ.get("COGVLM_NATIVE_KERNELS", "1") == "0":
        return None
    return load()


def available() -> bool:
    return library() is not None


def can_decode_attention(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these: one query per row, CPU tensors, an fp32 or bf16 cache, a head
    size it handles."""
    return (query.device.type == "cpu" and query.shape[2] == 1 and query.dtype in CACHE_DTYPES
            and key.dtype in CACHE_DTYPES and key.stride(-1) == 1 and key.shape[-1] % 16 == 0
            and available() and key.shape[-1] <= library().max_head_dim)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for one query per (row, head), in fp32, reading the cache in place.

    query (B, H, 1, D); key/value (B, H, T, D), fp32 or bf16, with the same strides (views of a KV cache);
    mask None (attend to all) or bool (B or 1, 1, 1, T) -> (B, H, 1, D) fp32. Check `can_decode_attention` first.
    """
    batch, heads, length, head_dim = key.shape
    if value.stride() != key.stride() or value.dtype != key.dtype:
        raise ValueError("decode_attention: keys and values need the same dtype and layout")
    query = query.float().contiguous()  # B * H * D numbers; the kernel reads each query as one vector
    out = torch.empty(batch, heads, 1, head_dim, dtype=torch.float32)
    mask_bytes, mask_stride = None, 0
    if mask is not None:
        mask_bytes = mask.reshape(mask.shape[0], length).to(torch.uint8).contiguous()
        mask_stride = length if mask.shape[0] > 1 else 0
    q_strides = (ctypes.c_int64 * 2)(query.stride(0), query.stride(1))
    kv_strides = (ctypes.c_int64 * 3)(key.stride(0), key.stride(1), key.stride(2))
    library().cogvlm_decode_attention(
        query.data_ptr(), q_strides, key.data_ptr(), value.data_ptr(), kv_strides, key.dtype == torch.bfloat16,
        None if mask_bytes is None else mask_bytes.data_ptr(), mask_stride, out.data_ptr(), batch, heads, length,
        head_dim, head_dim ** -0.5, torch.get_num_threads())
    return out


def int4_dequantize_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int,
                      group_size: int, block: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The transposed weight (in_features, out_features) bf16 of torch's CPU int4 packing: `packed` (uint8, blocks
    of `block` rows, torch's `_convert_weight_to_int4pack_for_cpu`), `scales_and_zeros` (in_features / group_size,
    out_features, 2) bf16; w = (q - 8) * scale + zero in fp32, rounded to bf16 once. out: a contiguous bf16
    tensor of at least in_features * out_features elements to write into (its first ones are returned, viewed)."""
    if packed.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16 or not packed.is_contiguous() \
            or not scales_and_zeros.is_contiguous():
        raise ValueError("int4_dequantize_t: packed must be contiguous uint8, scales_and_zeros contiguous bf16")
    if out_features % block or in_features % group_size or packed.numel() * 2 != out_features * in_features:
        raise ValueError(f"int4_dequantize_t: {out_features} x {in_features} does not fit blocks of {block} rows, "
                         f"groups of {group_size} and {packed.numel()} packed bytes")
    size = in_features * out_features
    if out is None:
        out = torch.empty(size, dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < size:
        raise ValueError("int4_dequantize_t: out must be a contiguous bf16 tensor large enough")
    library().cogvlm_int4_dequantize_t(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), out_features,
                                       in_features, group_size, block, torch.get_num_threads())
    return out.view(-1)[:size].view(in_features, out_features)
