"""A preallocated key/value cache for decoding, as a SAT mixin.

SAT's `CachedAutoregressiveMixin` returns each step's keys/values and the caller concatenates them
onto the cache (`update_mems`), and the mixin concatenates the cache onto the new keys again: two
copies of the whole cache per decoded token, which dominates decode time once the cache is long.
Here every layer writes its new keys/values in place into a buffer sized for the whole sequence
and attends over a view of the filled part: no copies.
"""
import torch
import torch.nn.functional as F

from sat.model.base_model import BaseMixin, non_conflict
from sat.transformer_defaults import attention_fn_default


class KVCache:
    """Keys and values of every layer: each (batch, heads, max_length, head_dim).

    `length` is the number of filled positions; the generation loop advances it after each forward.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device):
        # One allocation for all layers: glibc serves it with mmap and returns it to the OS when the
        # cache is freed. Per-layer tensors (a few MB each) came from the heap, and glibc kept the
        # freed ones: every generation left its cache resident (bench/RESULTS.md, "memory").
        self.buffer = torch.empty((num_layers, 2, batch_size, num_heads, max_length, head_dim), dtype=dtype,
                                  device=device)
        self.keys = list(self.buffer[:, 0].unbind(0))
        self.values = list(self.buffer[:, 1].unbind(0))
        self.length = 0
        self.max_length = max_length

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def append(self, layer_id: int, key: torch.Tensor, value: torch.Tensor):
        """Write (batch, heads, n, head_dim) at [length, length + n) -> views of positions [0, length + n)."""
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} needed")
        self.keys[layer_id][:, :, self.length:end] = key
        self.values[layer_id][:, :, self.length:end] = value
        return self.keys[layer_id][:, :, :end], self.values[layer_id][:, :, :end]


class KVCacheMixin(BaseMixin):
    """Routes attention through a `KVCache` passed to the model as `kv_cache=`; a no-op without one."""

    @non_conflict
    def attention_fn(self, q, k, v, mask, dropout_fn, kv_cache=None, old_impl=attention_fn_default, **kw_args):
        if kv_cache is None or kw_args.get("cross_attention", False):
            return old_impl(q, k, v, mask, dropout_fn, **kw_args)
        k, v = kv_cache.append(int(kw_args["layer_id"]), k, v)
        if old_impl is attention_fn_default and dropout_fn is None:
            return cached_attention(q, k, v, mask)
        return old_impl(q, k, v, mask, dropout_fn, **kw_args)  # other attention hooks (e.g. P-tuning) first


def cached_attention(query, key, value, mask):
    """Scaled dot-product attention over cache views, for masks as SAT gives them (1 = attend).

    SAT's default attention makes the keys/values contiguous first (for multi-query heads), which
    would copy the whole cache view in every layer at every step; SDPA reads the views in place.
    query (B, H, q, D), key/value (B, H, k, D), mask (B or 1, 1, q, k) -> (B, H, q, D).
    """
    q_len, k_len = query.shape[2], key.shape[2]
    if bool(mask.all()):
        return F.scaled_dot_product_attention(query, key, value)
    if q_len == k_len and mask.shape[0] == 1 and bool((mask[0, 0] == torch.ones_like(mask[0, 0]).tril()).all()):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.bool())


def ensure_kv_cache_mixin(model) -> None:
    """Give `model` the in-place cache (once). SAT's concatenating cache, which upstream scripts add
    by hand as 'auto-regressive', is removed: it would copy the whole cache at every step."""
    if "auto-regressive" in model.mixins:
        model.del_mixin("auto-regressive")
    if "kv-cache" not in model.mixins:
        model.add_mixin("kv-cache", KVCacheMixin())
