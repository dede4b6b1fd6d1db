"""Attention of many queries at once (a prompt's prefill, the ViT), and the one place that picks its kernel.

On a CPU with bf16 vector instructions but no AMX, torch's SDPA kernel for bf16 (flash attention over blocks
of queries x 512 keys, small oneDNN calls in between fp32 softmax steps) is no faster than its fp32 kernel,
where two oneDNN bf16 matmuls with an fp32 softmax between them take about half the time (bench/RESULTS.md).
There, without autograd, blocks of queries are attended that way. The scores leave the first matmul rounded to
bf16 (summed in fp32), as in transformers' eager attention; the softmax runs in fp32 inside torch's bf16
kernel. Elsewhere (fp32, CUDA, AMX, training) torch's SDPA.
"""
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from models.kernels.cpu import has_amx_bf16, native_bf16

# The scores of one block of queries, (batch, heads, block, keys), counted at 4 bytes each, are kept near this
# size (at least MIN_QUERY_BLOCK queries): config M's 283-token prompt fits in one block (blocks of 32 / 64 /
# 128 queries took 37% / 11% / 1% longer there); a 17B prompt at 490 px, 1,200+ keys, runs in about 100-query blocks,
# each causal block multiplying only the keys its queries see.
SCORE_BYTES = 16 * 2**20
MIN_QUERY_BLOCK = 16


def uses_matmul_attention(query: torch.Tensor) -> bool:
    """Whether `prompt_attention` takes the two-matmul path for this query (bf16 on a CPU with native bf16
    products and no AMX, no autograd)."""
    return (query.dtype == torch.bfloat16 and query.device.type == "cpu" and not torch.is_grad_enabled()
            and native_bf16() and not has_amx_bf16())


def prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax scale 1/sqrt(head_dim).

    query (B, H, q, D), key/value (B, H, k, D), one dtype; causal (q == k): query i sees keys 0..i; mask
    (bool, broadcastable to (B, H, q, k), True = attend) instead of `causal`, or neither: every query sees
    every key -> (B, H, q, D).
    """
    if mask is not None or not uses_matmul_attention(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal and mask is None)
    if causal and query.shape[2] != key.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {query.shape[2]} and {key.shape[2]}")
    length, scale = query.shape[2], 1 / math.sqrt(query.shape[-1])
    # the scale folded into the queries (exact for head sizes 64 and 128), written contiguous: heads are usually
    # strided views of the QKV projection, which every block's matmul would otherwise copy
    query = torch.mul(query, scale, out=torch.empty_like(query, memory_format=torch.contiguous_format))
    key, value = key.contiguous(), value.contiguous()
    output = torch.empty_like(query)
    block = max(MIN_QUERY_BLOCK, SCORE_BYTES // (4 * query.shape[0] * query.shape[1] * key.shape[2]))
    for start in range(0, length, block):
        end = min(length, start + block)
        keys = end if causal else key.shape[2]  # a causal block's last query sees keys [0, end)
        scores = torch.matmul(query[:, :, start:end], key[:, :, :keys].transpose(-1, -2))  # (B, H, block, keys)
        if causal:  # query start + r sees keys 0..start + r: only the block's diagonal square has keys to hide
            scores[..., start:].add_(_causal_bias(end - start, scores.dtype))
        # torch's CPU softmax of bf16 computes in fp32 and rounds once: the probabilities the second matmul
        # takes, without fp32 temporaries (fresh prompt-sized tensors cost page faults here)
        output[:, :, start:end] = torch.matmul(torch.softmax(scores, dim=-1), value[:, :, :keys])
    return output


def mask_kind(mask) -> str:
    """What a SAT mask (B or 1, 1, q, k; 1 = attend, 0 = not) or None asks for: "all" (every query sees every key),
    "causal" (q == k, one mask for the batch, the lower triangle) or "mask". Four small ops per mask tensor:
    `MaskKinds` decides once for every layer of a forward."""
    if mask is None or bool(mask.all()):
        return "all"
    if (mask.shape[0] == 1 and mask.shape[-1] == mask.shape[-2]
            and bool((mask[0, 0] == torch.ones_like(mask[0, 0]).tril()).all())):
        return "causal"
    return "mask"


class MaskKinds:
    """`mask_kind`, remembered for the last mask tensor seen (until it changes in place): every layer of a forward
    passes the same mask. Held by the attention mixin that asks (one per model), not by the process."""

    def __init__(self):
        self._last = (None, -1, "all")  # (mask, its version, its kind); holding the mask keeps its identity unique

    def __call__(self, mask) -> str:
        if mask is None:
            return "all"
        last, version, kind = self._last
        if last is mask and version == mask._version:
            return kind
        kind = mask_kind(mask)
        self._last = (mask, mask._version, kind)
        return kind


@functools.lru_cache(maxsize=4)
def _causal_bias(size: int, dtype: torch.dtype) -> torch.Tensor:
    """(size, size): 0 on and below the diagonal, the lowest float above it (not -inf: torch's CPU softmax takes a
    slow path on infinities)."""
    hidden = torch.ones(size, size, dtype=torch.bool).triu_(1)
    return torch.zeros(size, size, dtype=dtype).masked_fill_(hidden, torch.finfo(dtype).min)
