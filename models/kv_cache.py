"""A preallocated key/value cache for decoding, as a SAT mixin.

SAT's `CachedAutoregressiveMixin` returns each step's keys/values and the caller concatenates them
onto the cache (`update_mems`), and the mixin concatenates the cache onto the new keys again: two
copies of the whole cache per decoded token, which dominates decode time once the cache is long.
Here every layer writes its new keys/values in place into a buffer sized for the whole sequence
and attends over a view of the filled part: no copies. `KVCache` holds one batch decoded in lockstep
(utils.generation); `SlotKVCache` holds independent sequences of different lengths, one per row, for
the serving engine (utils/engine.py).

On a CPU where our decode attention kernel runs (models.kernels.native, which reads bf16 as fast as fp32) the caches
of 16-bit models and of models with int8 / int4 weights hold bf16; elsewhere on a CPU 16-bit models get an
fp32 cache (`cache_dtype`): a decode step's attention reads the whole cache, and torch's CPU attention reads
a bf16 cache at a third of the speed it reads an fp32 one.
"""
from typing import List, Optional, Sequence

import torch

from sat.model.base_model import BaseMixin, non_conflict
from sat.transformer_defaults import attention_fn_default

from models.kernels import native
from models.kernels.attention import MaskKinds, mask_kind, prompt_attention


def cache_dtype(dtype: torch.dtype, device, low_bit_weights: bool = False) -> torch.dtype:
    """The dtype a KV cache stores for a model computing in `dtype` on `device`; `low_bit_weights`: the model
    multiplies by int8 or int4 weights (models.kernels.quantization.has_low_bit_weights).

    A step with one query per row reads the whole cache. On a CPU with our kernel (models.kernels.native) the cache
    is bf16 for a bf16 model and for low-bit weights: the kernel reads bf16 as fast as fp32 per element, half
    the bytes (at batch 8 an fp32 cache is read more than the int8 weights). For an fp32 model with int4
    weights (and no bias, as CogVLM's) the values are exact in bf16, the int4 kernel's outputs being bf16
    numbers, and the keys are rounded after their rotation; with int8 weights both are rounded, as llama.cpp's
    default f16 cache does with every weight type (what it costs: bench/RESULTS.md, accuracy). Elsewhere on a
    CPU, 16-bit models get an fp32 cache: torch's CPU kernels for 16-bit attention (SDPA's flash and math
    kernels, bmm through oneDNN) stream the cache at a fraction of fp32's rate (bench/attention.py measures
    both). The values are the model's own (16-bit numbers are exact in fp32); only the memory of the cache
    doubles. Elsewhere (CUDA) the model's dtype.
    """
    if torch.device(device).type != "cpu":
        return dtype
    kernel_reads_bf16 = torch.bfloat16 in native.CACHE_DTYPES and native.available()
    if dtype == torch.bfloat16 or (low_bit_weights and dtype == torch.float32):
        return torch.bfloat16 if kernel_reads_bf16 else torch.float32
    return torch.float32 if dtype == torch.float16 else dtype


class KVCache:
    """Keys and values of every layer: each (batch, heads, max_length, head_dim), in
    `cache_dtype(dtype, device, low_bit_weights)`.

    `length` is the number of filled positions; the generation loop advances it after each forward.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device, low_bit_weights: bool = False):
        # One allocation for all layers: glibc serves it with mmap and returns it to the OS when the
        # cache is freed. Per-layer tensors (a few MB each) came from the heap, and glibc kept the
        # freed ones: every generation left its cache resident (bench/RESULTS.md, "memory").
        self.buffer = torch.empty((num_layers, 2, batch_size, num_heads, max_length, head_dim),
                                  dtype=cache_dtype(dtype, device, low_bit_weights), device=device)
        self.keys = list(self.buffer[:, 0].unbind(0))
        self.values = list(self.buffer[:, 1].unbind(0))
        self.length = 0
        self.max_length = max_length

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def append(self, layer_id: int, key: torch.Tensor, value: torch.Tensor):
        """Write (batch, heads, n, head_dim) at [length, length + n) -> the keys/values of positions
        [0, length + n): views of the cache, or for the first write (the prompt) the given tensors
        themselves, so that the prompt's attention runs in the model's dtype."""
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} needed")
        self.keys[layer_id][:, :, self.length:end] = key
        self.values[layer_id][:, :, self.length:end] = value
        if self.length == 0:
            return key, value
        return self.keys[layer_id][:, :, :end], self.values[layer_id][:, :, :end]


class KVCacheMixin(BaseMixin):
    """Routes attention through a `KVCache` passed to the model as `kv_cache=`; a no-op without one."""

    forward_inputs = ("kv_cache",)

    def __init__(self):
        super().__init__()
        self.mask_kinds = MaskKinds()  # the layers of one forward share its mask

    @non_conflict
    def attention_fn(self, q, k, v, mask, dropout_fn, kv_cache=None, old_impl=attention_fn_default, **kw_args):
        if kv_cache is None or kw_args.get("cross_attention", False):
            return old_impl(q, k, v, mask, dropout_fn, **kw_args)
        k, v = kv_cache.append(int(kw_args["layer_id"]), k, v)
        if old_impl is attention_fn_default and dropout_fn is None:
            return cached_attention(q, k, v, mask, self.mask_kinds)
        # other attention hooks (e.g. P-tuning) first, in the model's dtype
        return old_impl(q, k.to(q.dtype), v.to(q.dtype), mask, dropout_fn, **kw_args)


def cached_attention(query, key, value, mask, mask_kinds=mask_kind):
    """Scaled dot-product attention over cache views, for masks as SAT gives them (1 = attend).

    SAT's default attention makes the keys/values contiguous first (for multi-query heads), which
    would copy the whole cache view in every layer at every step; models.kernels.attention (SDPA, or bf16 matmuls on
    CPU), and for one query per row on a CPU our kernel (models.kernels.native: it streams the cache at about twice
    SDPA's speed), read the views in place.
    query (B, H, q, D), key/value (B, H, k, D) in the cache's dtype, mask (B or 1, 1, q, k), or None where
    every query attends to every key -> (B, H, q, D) in the query's dtype. mask_kinds: what tells the mask's
    kind (`mask_kind`, or a caller's `MaskKinds`, which decides once for all layers).
    """
    kind = mask_kinds(mask)
    attend_all = kind == "all"
    if native.can_decode_attention(query, key):
        return native.decode_attention(query, key, value, None if attend_all else mask.bool()).to(query.dtype)
    if query.dtype != key.dtype:  # an fp32 cache of a 16-bit model or a bf16 one of an fp32 model (cache_dtype)
        wider = torch.promote_types(query.dtype, key.dtype)
        return cached_attention(query.to(wider), key.to(wider), value.to(wider), mask, mask_kinds).to(query.dtype)
    if attend_all:
        return prompt_attention(query, key, value)
    if kind == "causal":
        return prompt_attention(query, key, value, causal=True)
    return prompt_attention(query, key, value, mask=mask.bool())


def ensure_kv_cache_mixin(model) -> None:
    """Give `model` the in-place cache (once). SAT's concatenating cache, which upstream scripts add
    by hand as 'auto-regressive', is removed: it would copy the whole cache at every step."""
    if "auto-regressive" in model.mixins:
        model.del_mixin("auto-regressive")
    if "kv-cache" not in model.mixins:
        model.add_mixin("kv-cache", KVCacheMixin())


class SlotKVCache:
    """The KV memory of the serving engine: `num_slots` rows of `max_length` positions per layer, one
    sequence per row, each at its own length (utils/engine.py keeps the running sequences in rows 0..n-1).

    Buffers: keys/values of every layer, each (num_slots, heads, max_length, head_dim) in
    `cache_dtype(dtype, device, low_bit_weights)`, one allocation as in KVCache. `lengths[row]` is the row's
    filled positions. A prefill writes a group of new sequences into free rows (`prefill`), a decode step
    appends one position to each of the first n rows at that row's own length and attends over the filled part
    through a per-row mask (`decode`).
    """

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device, low_bit_weights: bool = False):
        self.buffer = torch.empty((num_layers, 2, num_slots, num_heads, max_length, head_dim),
                                  dtype=cache_dtype(dtype, device, low_bit_weights), device=device)
        self.keys = list(self.buffer[:, 0].unbind(0))
        self.values = list(self.buffer[:, 1].unbind(0))
        self.num_slots, self.max_length = num_slots, max_length
        self.lengths = [0] * num_slots
        # Positions [0, finite[row]) of a row hold numbers (written once, by this row or an earlier
        # sequence). A decode step reads every row up to the longest row; the masked tail of a shorter row
        # gets weight 0, but 0 * NaN is NaN, so never-written memory is zeroed before it is first read.
        # Zeroing lazily keeps untouched pages of the (large, mostly idle) buffer out of memory.
        self._finite = [0] * num_slots

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def prefill(self, first_row: int, lengths: Sequence[int], padded_length: int,
                cached: Optional[Sequence[int]] = None) -> "SlotPrefill":
        """A cache for the forward over a left-padded group of prompts (utils.generation.collate) that writes
        prompt i (lengths[i] tokens, the last lengths[i] of padded_length columns) into row first_row + i.

        cached: per row, positions [0, cached[i]) the row already holds (`write`: a reused prefix); the group's
        tokens are then that row's positions from cached[i] on, and attend to the row's cached positions too
        (the forward takes the returned cache's `mask`). None or all 0: fresh prompts."""
        cached = [0] * len(lengths) if cached is None else list(cached)
        if first_row + len(lengths) > self.num_slots:
            raise ValueError(f"{first_row + len(lengths)} rows needed, the cache has {self.num_slots}")
        longest = max(c + n for c, n in zip(cached, lengths))
        if longest > self.max_length:
            raise ValueError(f"KV cache rows hold {self.max_length} positions; {longest} needed")
        return SlotPrefill(self, first_row, list(lengths), padded_length, cached)

    def position_bytes(self) -> int:
        """Bytes of one position of one row, keys and values of every layer."""
        return self.nbytes() // (self.num_slots * self.max_length)

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """A copy of row `row`'s positions [start, end): (layers, 2, heads, end - start, head_dim)."""
        if not 0 <= start <= end <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} positions; [{start}, {end}) asked for")
        return self.buffer[:, :, row, :, start:end].clone()

    def write(self, row: int, chunks: Sequence[torch.Tensor]) -> int:
        """Fill row `row` from position 0 with `chunks` (each (layers, 2, heads, n, head_dim), as `read` gives),
        one after the other; returns the positions written. The row's `lengths` entry is the prefill's to set."""
        start = 0
        for chunk in chunks:
            end = start + chunk.shape[3]
            self.buffer[:, :, row, :, start:end] = chunk
            start = end
        self._finite[row] = max(self._finite[row], start)
        return start

    def decode(self, num_rows: int) -> "SlotDecode":
        """A cache for one decode step of rows 0..num_rows-1 (one new token each); its `mask` is the step's
        attention mask (num_rows, 1, 1, span), span = the longest row's length after the step."""
        return SlotDecode(self, num_rows)

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s sequence into row `target` (to keep the running rows packed)."""
        length = self.lengths[source]
        self.buffer[:, :, target, :, :length] = self.buffer[:, :, source, :, :length]
        self.lengths[target] = length
        self._finite[target] = max(self._finite[target], length)
        self.lengths[source] = 0

    def release(self, row: int) -> None:
        self.lengths[row] = 0

    def _make_finite(self, rows: Sequence[int], span: int) -> None:
        for row in rows:
            if self._finite[row] < span:
                self.buffer[:, :, row, :, self._finite[row]:span].zero_()
                self._finite[row] = span


class SlotPrefill:
    """`SlotKVCache.prefill`'s cache: each row's real positions are stored into its slot. Fresh prompts attend
    over the group's own keys/values in the cache's dtype (the prompts' mask does the rest); rows that continue
    a cached prefix attend over their slots' views [0, span) through `mask`."""

    def __init__(self, cache: SlotKVCache, first_row: int, lengths: List[int], padded_length: int,
                 cached: List[int]):
        self.cache, self.first_row, self.lengths, self.padded_length = cache, first_row, lengths, padded_length
        self.cached = cached
        self.continues = any(cached)
        self.mask = None
        if self.continues:
            device = cache.buffer.device
            self.span = max(c + n for c, n in zip(cached, lengths))
            cache._make_finite(range(first_row, first_row + len(lengths)), self.span)
            # slot position of column j of row i: cached[i] + j - (padded_length - lengths[i]); < 0 on padding
            offsets = torch.tensor([c - (padded_length - n) for c, n in zip(cached, lengths)], device=device)
            query_positions = offsets[:, None] + torch.arange(padded_length, device=device)[None]
            keys = torch.arange(self.span, device=device)
            # (group, 1, padded_length, span), 1 = attend: causal over the row's slot; a padding column sees
            # position 0 only (written by every row), so that no attention row is empty
            mask = keys[None, None] <= query_positions[:, :, None]
            mask[:, :, 0] |= query_positions < 0
            self.mask = mask[:, None]

    def append(self, layer_id: int, key: torch.Tensor, value: torch.Tensor):
        """key/value (group, heads, padded_length, head_dim) -> the same tensors (fresh prompts), or views
        (group, heads, span, head_dim) of the group's rows (cached prefixes)."""
        keys, values = self.cache.keys[layer_id], self.cache.values[layer_id]
        for i, (c, n) in enumerate(zip(self.cached, self.lengths)):
            row, start = self.first_row + i, self.padded_length - n
            keys[row, :, c:c + n] = key[i, :, start:]
            values[row, :, c:c + n] = value[i, :, start:]
        if not self.continues:
            # the keys/values as the cache holds them (bf16 for a low-bit model: cache_dtype), so that a prompt
            # attends over the same numbers whether its prefix is computed now or was kept from an earlier one
            return key.to(keys.dtype), value.to(values.dtype)
        rows = slice(self.first_row, self.first_row + len(self.lengths))
        return keys[rows, :, :self.span], values[rows, :, :self.span]

    def commit(self) -> None:
        """After the forward: the rows hold their prompts."""
        for i, (c, n) in enumerate(zip(self.cached, self.lengths)):
            row = self.first_row + i
            self.cache.lengths[row] = c + n
            self.cache._finite[row] = max(self.cache._finite[row], c + n)


class SlotDecode:
    """`SlotKVCache.decode`'s cache: every row writes its new position at its own length and attends over
    views [0, span) of the first num_rows rows (no copy), its unfilled tail masked."""

    def __init__(self, cache: SlotKVCache, num_rows: int):
        self.cache, self.num_rows = cache, num_rows
        lengths = cache.lengths[:num_rows]
        self.span = max(lengths) + 1
        if self.span > cache.max_length:
            raise ValueError(f"KV cache rows hold {cache.max_length} positions; {self.span} needed")
        device = cache.buffer.device
        self.same_length = min(lengths) == max(lengths)
        self.positions = torch.tensor(lengths, device=device)
        self.rows = torch.arange(num_rows, device=device)
        cache._make_finite(range(num_rows), self.span)
        # (num_rows, 1, 1, span), 1 = attend: a row sees its filled positions and its new one
        self.mask = (torch.arange(self.span, device=device)[None] <= self.positions[:, None])[:, None, None]

    def append(self, layer_id: int, key: torch.Tensor, value: torch.Tensor):
        """key/value (num_rows, heads, 1, head_dim) -> views (num_rows, heads, span, head_dim) of the rows."""
        keys, values = self.cache.keys[layer_id], self.cache.values[layer_id]
        if self.same_length:
            position = self.span - 1
            keys[:self.num_rows, :, position] = key[:, :, 0]
            values[:self.num_rows, :, position] = value[:, :, 0]
        else:
            keys[self.rows, :, self.positions] = key[:, :, 0].to(keys.dtype)  # index_put_ needs one dtype
            values[self.rows, :, self.positions] = value[:, :, 0].to(values.dtype)
        return keys[:self.num_rows, :, :self.span], values[:self.num_rows, :, :self.span]

    def commit(self) -> None:
        for row in range(self.num_rows):
            self.cache.lengths[row] += 1
