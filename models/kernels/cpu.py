"""What this CPU can run natively, which decides the kernels of models.kernels.quantization and models.kernels.packed.

The project runs on more than one kind of x86 machine: with AVX-512, VNNI and AMX (bf16 and int8 products in
hardware) and AVX2-only (e.g. AMD EPYC before Zen 4), where torch emulates bf16 GEMMs and fbgemm's int8 sums
saturate. bench/RESULTS.md has the kernels' speeds on both.
"""
import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> str:
    """The first CPU's `flags` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI: int8 dot products summed in 32 bits (fbgemm then keeps 8-bit activations)."""
    flags = cpu_flags().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def has_amx_bf16() -> bool:
    """AMX tiles for bf16 products (Intel Sapphire Rapids and later), which torch's CPU attention kernel uses."""
    return "amx_bf16" in cpu_flags().split()


@functools.lru_cache(maxsize=None)
def is_x86() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines  # torch builds fbgemm on x86 only


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions torch's GEMMs use (oneDNN: AVX-512 BW/VL/DQ or AVX-NE-CONVERT);
    without them every bf16 product is emulated."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
