"""Our decode attention kernel (models.kernels.native): built where it can run, the attention SDPA computes for every
cache layout and mask a decode step hands it, bf16 caches read as their fp32 values, and torch's attention
wherever the kernel cannot be built."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from models.kernels import native
from models.kv_cache import KVCache, SlotKVCache, cache_dtype, cached_attention


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        return f.read()


def cpu_has_vectors() -> bool:
    """AVX-512, or AVX2 with FMA: what the kernel is written for."""
    flags = cpu_flags().split()
    return "avx512f" in flags or ("avx2" in flags and "fma" in flags)


HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None


def test_kernel_is_built_where_it_can_run():
    """With a C compiler on an AVX-512 or AVX2 CPU the kernel must load (else every decode step silently takes
    torch's slower attention), with the widest vectors the CPU has."""
    if HAS_COMPILER and cpu_has_vectors() and os.environ.get("COGVLM_NATIVE_KERNELS") != "0":
        assert native.available()
        assert native.library().cogvlm_native_kernels() == (16 if "avx512f" in cpu_flags().split() else 8)
    else:
        assert not native.available()


@pytest.fixture(params=["this-cpu", "avx2"])
def kernel_build(request, monkeypatch):
    """The kernel built for this CPU, and its AVX2 build (`-march=haswell`, which every AVX2 CPU runs): both are
    checked wherever this CPU can run them."""
    if request.param == "avx2" and HAS_COMPILER and "avx2" in cpu_flags().split():
        build = native.load("haswell")
        assert build is not None and build.cogvlm_native_kernels() == 8
        monkeypatch.setattr(native, "library", lambda: build)
    return request.param


def cache_views(batch, heads, length, head_dim, dtype, capacity_extra=5, seed=0):
    """Keys and values as a KVCache holds them: views [0, length) of a larger buffer, random contents."""
    cache = KVCache(1, batch, heads, length + capacity_extra, head_dim, dtype, "cpu")
    cache.buffer.copy_(torch.randn(cache.buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return cache.keys[0][:, :, :length], cache.values[0][:, :, :length]


def reference(query, key, value, mask):
    """SDPA in float64 (1 = attend)."""
    return F.scaled_dot_product_attention(query.double(), key.double(), value.double(),
                                          attn_mask=None if mask is None else mask.bool())


@pytest.mark.parametrize("batch, heads, length, head_dim", [(1, 16, 310, 64), (3, 4, 37, 16), (2, 2, 17, 128)])
@pytest.mark.parametrize("mask_kind", ["none", "ones", "per-row", "shared"])
@torch.no_grad()
def test_one_query_attention_is_sdpas(batch, heads, length, head_dim, mask_kind, kernel_build):
    key, value = cache_views(batch, heads, length, head_dim, torch.float32)
    # strided, as the rotated query is (heads and head_dim interleaved with other rows)
    query = torch.randn(batch, 1, head_dim, heads).permute(0, 3, 1, 2)
    mask = {"none": None, "ones": torch.ones(1, 1, 1, length),
            "per-row": (torch.rand(batch, 1, 1, length) > 0.4).float(),
            "shared": (torch.rand(1, 1, 1, length) > 0.4).float()}[mask_kind]
    if mask is not None:
        mask[..., -1] = 1  # the new token always sees itself
    out = cached_attention(query, key, value, mask)
    assert out.shape == (batch, heads, 1, head_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(query, key, value, mask), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_bf16_cache_is_attended_as_its_fp32_values(kernel_build):
    """A bf16 model keeps a bf16 cache where the kernel runs; its attention is that of the same numbers in
    fp32, bit for bit, returned in the query's dtype."""
    key, value = cache_views(2, 4, 45, 64, torch.bfloat16)
    if native.available():
        assert key.dtype == torch.bfloat16 and cache_dtype(torch.bfloat16, "cpu") == torch.bfloat16
        assert cache_dtype(torch.float32, "cpu", low_bit_weights=True) == torch.bfloat16  # int8 / int4 models
        assert cache_dtype(torch.float32, "cpu") == torch.float32
    query = torch.randn(2, 4, 1, 64).bfloat16()
    mask = (torch.rand(2, 1, 1, 45) > 0.3).float()
    mask[..., -1] = 1
    out = cached_attention(query, key, value, mask)
    assert out.dtype == torch.bfloat16
    as_fp32 = cached_attention(query.float(), key.float(), value.float(), mask)
    assert torch.equal(out, as_fp32.bfloat16())
    torch.testing.assert_close(as_fp32.double(), reference(query.float(), key, value, mask), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_serving_cache_rows_of_different_lengths(kernel_build):
    """SlotKVCache's decode step: each row attends over its own filled positions only."""
    cache = SlotKVCache(1, 3, 2, 40, 64, torch.float32, "cpu")
    lengths = [30, 7, 19]
    for row, length in enumerate(lengths):
        cache.buffer[:, :, row, :, :length].normal_()
        cache.lengths[row] = cache._finite[row] = length
    step = cache.decode(3)
    query, new = torch.randn(3, 2, 1, 64), torch.randn(2, 3, 2, 1, 64)
    keys, values = step.append(0, new[0], new[1])
    out = cached_attention(query, keys, values, step.mask)
    for row, length in enumerate(lengths):
        own_keys = torch.cat([cache.keys[0][row:row + 1, :, :length], new[0][row:row + 1]], 2)
        own_values = torch.cat([cache.values[0][row:row + 1, :, :length], new[1][row:row + 1]], 2)
        torch.testing.assert_close(out[row:row + 1].double(), reference(query[row:row + 1], own_keys, own_values, None),
                                   rtol=1e-5, atol=1e-6)


def test_without_a_compiler_torch_attends(monkeypatch, tmp_path, caplog):
    """A failed build leaves no library behind (nor a half-written one) and falls back to torch's attention."""
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    monkeypatch.setenv("COGVLM_KERNEL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert os.listdir(tmp_path) == []
        if cpu_has_vectors():
            assert "building" in caplog.text and "failed" in caplog.text
        key, value = cache_views(1, 2, 9, 64, torch.float32)
        assert cache_dtype(torch.bfloat16, "cpu") == torch.float32
        assert cache_dtype(torch.float32, "cpu", low_bit_weights=True) == torch.float32
        query = torch.randn(1, 2, 1, 64)
        torch.testing.assert_close(cached_attention(query, key, value, None).double(),
                                   reference(query, key, value, None), rtol=1e-5, atol=1e-6)
    finally:
        native.library.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("COGVLM_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    try:
        assert not native.available()
    finally:
        native.library.cache_clear()


def test_built_library_is_reused(monkeypatch, tmp_path):
    """The build is keyed by source, flags and CPU: a second process finds the first one's library."""
    could_build = native.available()
    monkeypatch.setenv("COGVLM_KERNEL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.available() == could_build
        built = os.listdir(tmp_path)
        if not could_build:  # this CPU or machine cannot run it (test_kernel_is_built_where_it_can_run)
            assert len(built) <= 1  # a library without the kernel (non-AVX-512 build), or none
            return
        assert len(built) == 1 and built[0].endswith(".so")
        stamp = os.stat(tmp_path / built[0]).st_mtime_ns
        native.library.cache_clear()
        assert native.available() and os.stat(tmp_path / built[0]).st_mtime_ns == stamp
    finally:
        native.library.cache_clear()


@pytest.mark.skipif(not native.available(), reason="the kernels are not built on this machine (see the test above)")
@pytest.mark.parametrize("in_features, out_features", [(64, 128), (160, 320)])
def test_int4_dequantization_is_the_kernels_weights_rounded_once(in_features, out_features):
    """The prompt path's int4 -> bf16 weights (Int4WeightOnlyLinear): (q - 8) * scale + zero in fp32, from torch's
    packed codes, rounded to bf16 once; the torch-op form (bf16 arithmetic, rounded twice) stays within a
    eighth of a 4-bit step of it (three bf16 roundings of numbers up to 15 steps: measured 0.08)."""
    from models.kernels.quantization import INT4_GROUP_SIZE, Int4WeightOnlyLinear, _int4_block_rows, _unpack_int4_t

    linear = torch.nn.Linear(in_features, out_features, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02, generator=torch.Generator().manual_seed(3))
    layer = Int4WeightOnlyLinear.from_linear(linear)
    block = _int4_block_rows()
    codes = _unpack_int4_t(layer.weight_int4, block, out_features, in_features).float()  # (in, out)
    scale, zero = (layer.scales_and_zeros[..., i].float().repeat_interleave(INT4_GROUP_SIZE, 0) for i in (0, 1))
    expected = ((codes - 8) * scale + zero).bfloat16()
    out = torch.full((in_features * out_features + 7,), float("nan"), dtype=torch.bfloat16)
    weight_t = native.int4_dequantize_t(layer.weight_int4, layer.scales_and_zeros, out_features, in_features,
                                        INT4_GROUP_SIZE, block, out)
    assert weight_t.shape == (in_features, out_features) and weight_t.data_ptr() == out.data_ptr()
    assert torch.equal(weight_t, expected)
    assert ((layer.dequantized_t().float() - expected.float()).abs() <= scale / 8).all()
    with pytest.raises(ValueError, match="does not fit"):
        native.int4_dequantize_t(layer.weight_int4, layer.scales_and_zeros, out_features, in_features + 32,
                                 INT4_GROUP_SIZE, block)
