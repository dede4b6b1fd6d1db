"""Visual-expert mixins for the LLaMA layers of CogVLM, and a plain-torch rotary embedding.

Every LLM layer holds two sets of weights: the language expert (SAT's own
`attention.query_key_value`, `attention.dense`, `mlp.*` plus `mixins.mlp.gate_proj`) and the
visual expert (`mixins.rotary.vision_*`, `mixins.mlp.vision_*`). Positions where
`vision_expert_mask == 1` (boi + image patches) go through the visual expert, all others through
the language expert. Attention itself runs over all positions together.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.model.base_model import BaseMixin
from sat.mpu import ColumnParallelLinear, RowParallelLinear
from sat.transformer_defaults import attention_fn_default

from models.kernels.linear import apply_linear


class RotaryEmbedding(nn.Module):
    """GPT-NeoX (rotate-half) rotary embedding over all head dims, in plain torch.

    Same math as SAT's `FastRotaryEmbedding` (cos/sin computed in fp32 from position * inv_freq),
    but written without triton so that it runs on CPU, and out of place so that autograd works
    (SAT's kernel rotates in place, which torch refuses under autograd for permuted views).
    The `inv_freq` buffer keeps SAT's name so the checkpoint key `mixins.rotary.rotary_emb.inv_freq`
    loads unchanged.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("inv_freq", self._compute_inv_freq(), persistent=True)
        self._last = None  # (position_ids, its version, cos, signed sin) of the last call

    def _compute_inv_freq(self, device=None):
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))

    def forward(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor):
        """Rotate query and key.

        query, key: (batch, heads, seq, head_dim); position_ids: (batch or 1, seq).
        Returns the rotated (query, key) in their input dtype.
        """
        return self.rotate(query, position_ids), self.rotate(key, position_ids)

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x (..., batch, heads, seq, head_dim), e.g. query and key stacked, rotated by position_ids
        (batch or 1, seq); in x's dtype."""
        cos, signed_sin = self._cos_sin(position_ids, x.device)
        return _rotate(x, cos, signed_sin)

    def rotate_(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`rotate` in place of x (no autograd): the same numbers, without a fresh tensor per operation. For a
        prompt each fresh (..., seq, head_dim) temporary is a new memory mapping whose page faults cost more
        than the arithmetic on this CPU (bench/RESULTS.md, "bf16 KV cache for low-bit models")."""
        cos, signed_sin = self._cos_sin(position_ids, x.device)
        full = x if x.dtype == cos.dtype else x.to(cos.dtype)
        first, second = full.chunk(2, dim=-1)
        turned = torch.cat((second, first), dim=-1).mul_(signed_sin)
        full.mul_(cos).add_(turned)
        return x if full is x else x.copy_(full)

    def _cos_sin(self, position_ids: torch.Tensor, device):
        """(cos, sin) of every position and frequency, each (batch, 1, seq, head_dim) fp32, the sin
        negated on the first half. Every layer of a forward passes the same `position_ids` tensor, so
        they are computed once per forward (bench/RESULTS.md has what that saves per decoding step)."""
        last = self._last
        if last is not None and last[0] is position_ids and last[1] == position_ids._version and last[2].device == device:
            return last[2], last[3]
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        # (batch, 1, seq, head_dim/2): one angle per position and frequency, broadcast over heads
        angles = position_ids.to(torch.float32)[:, None, :, None] * inv_freq.to(device)
        cos, sin = angles.cos(), angles.sin()
        cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        self._last = (position_ids, position_ids._version, cos, signed_sin)  # holding it keeps its address unique
        return cos, signed_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1); the minus sits in signed_sin.
    Bit-identical to (x1 cos - x2 sin, x2 cos + x1 sin)."""
    full = x.to(cos.dtype)
    first, second = full.chunk(2, dim=-1)
    return (full * cos + torch.cat((second, first), dim=-1) * signed_sin).to(x.dtype)


def _route(hidden_states, vision_expert_mask, language_fn, vision_fn, out_features):
    """Apply `language_fn` to rows where the mask is 0 and `vision_fn` where it is 1.

    hidden_states: (batch, seq, in); vision_expert_mask: (batch, seq) -> (batch, seq, out_features).
    """
    # rows of the flattened (batch * seq, in) states, found once: boolean-mask indexing finds them again in
    # each of its four gathers / scatters
    is_vision = vision_expert_mask.reshape(-1).bool()
    vision_rows, language_rows = is_vision.nonzero().squeeze(1), (~is_vision).nonzero().squeeze(1)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    language, vision = language_fn(flat.index_select(0, language_rows)), vision_fn(flat.index_select(0, vision_rows))
    output = language.new_empty(flat.shape[0], out_features)  # the experts' dtype (autocast)
    output.index_copy_(0, language_rows, language)
    output.index_copy_(0, vision_rows, vision.to(output.dtype))
    return output.view(*hidden_states.shape[:-1], out_features)


def _gated(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up. Without autograd, computed in gate's buffer: each fresh (tokens, inner) tensor
    cost page faults on this CPU (a large share of a prefill's SwiGLU time; bench/RESULTS.md)."""
    if torch.is_grad_enabled():
        return act(gate) * up
    hidden = F.silu(gate, inplace=True) if act is F.silu else act(gate)
    return hidden.mul_(up)


def _use_vision_expert(kw_args, seq_len):
    mask = kw_args.get("vision_expert_mask")
    return mask is not None and mask.shape[-1] == seq_len and bool(mask.any())


class LlamaVisionExpertFCMixin(BaseMixin):
    """SwiGLU MLP with a language expert and a visual expert in every layer."""

    def __init__(self, in_features, hidden_features, num_layers, params_dtype=torch.float, device="cpu",
                 skip_init=True, init_method=None):
        super().__init__()
        extra = dict(bias=False, module=self, params_dtype=params_dtype, device=device, skip_init=skip_init)
        if init_method is not None:
            extra["init_method"] = init_method
        # language gate (SAT's LLaMA keeps it in a mixin too), then the visual expert's up/gate/down
        self.gate_proj = nn.ModuleList([
            ColumnParallelLinear(in_features, hidden_features, gather_output=False, name="dense_h_to_4h_gate", **extra)
            for _ in range(num_layers)])
        self.vision_dense_h_to_4h_list = nn.ModuleList([
            ColumnParallelLinear(in_features, hidden_features, gather_output=False, name="vision_dense_h_to_4h", **extra)
            for _ in range(num_layers)])
        self.vision_gate_proj = nn.ModuleList([
            ColumnParallelLinear(in_features, hidden_features, gather_output=False, name="vision_gate_proj", **extra)
            for _ in range(num_layers)])
        self.vision_dense_4h_to_h_list = nn.ModuleList([
            RowParallelLinear(hidden_features, in_features, input_is_parallel=True, name="vision_dense_4h_to_h", **extra)
            for _ in range(num_layers)])

    def mlp_forward(self, hidden_states, **kw_args):
        layer_id = int(kw_args["layer_id"])
        if not _use_vision_expert(kw_args, hidden_states.shape[1]):
            return self.language_mlp(hidden_states, layer_id)
        act = self.transformer.layers[layer_id].mlp.activation_func

        def vision(x):
            up = self.vision_dense_h_to_4h_list[layer_id](x)
            return self.vision_dense_4h_to_h_list[layer_id](_gated(act, self.vision_gate_proj[layer_id](x), up))

        return _route(hidden_states, kw_args["vision_expert_mask"], lambda x: self.language_mlp(x, layer_id), vision,
                      hidden_states.shape[-1])

    def language_mlp(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        """The language expert's SwiGLU MLP of layer `layer_id`: (..., hidden) -> (..., hidden)."""
        mlp = self.transformer.layers[layer_id].mlp
        gate, up = apply_linear(self.gate_proj[layer_id], x), apply_linear(mlp.dense_h_to_4h, x)
        return apply_linear(mlp.dense_4h_to_h, _gated(mlp.activation_func, gate, up))


class LlamaVisionExpertAttnMixin(BaseMixin):
    """Causal self-attention with rotary positions and visual-expert QKV / output projections."""

    def __init__(self, hidden_size, num_heads, num_layers, params_dtype=torch.float, device="cpu",
                 skip_init=True, init_method=None):
        super().__init__()
        self.rotary_emb = RotaryEmbedding(hidden_size // num_heads)
        extra = dict(bias=False, module=self, params_dtype=params_dtype, device=device, skip_init=skip_init)
        if init_method is not None:
            extra["init_method"] = init_method
        self.vision_query_key_value_list = nn.ModuleList([
            ColumnParallelLinear(hidden_size, 3 * hidden_size, stride=3, gather_output=False,
                                 name="vision_query_key_value", **extra)
            for _ in range(num_layers)])
        self.vision_dense_list = nn.ModuleList([
            RowParallelLinear(hidden_size, hidden_size, input_is_parallel=True, name="vision_dense", **extra)
            for _ in range(num_layers)])

    def attention_forward(self, hidden_states, mask, **kw_args):
        layer_id = int(kw_args["layer_id"])
        attn = self.transformer.layers[layer_id].attention
        attention_fn = attn.hooks.get("attention_fn", attention_fn_default)
        use_vision = _use_vision_expert(kw_args, hidden_states.shape[1])

        if use_vision:
            mixed = _route(hidden_states, kw_args["vision_expert_mask"], attn.query_key_value,
                           self.vision_query_key_value_list[layer_id], 3 * attn.hidden_size_per_partition)
        else:
            mixed = apply_linear(attn.query_key_value, hidden_states)
        query, key, value = self.rotated_qkv(mixed, kw_args["position_ids"])

        dropout_fn = attn.attention_dropout if attn.training else None
        context = attention_fn(query, key, value, mask, dropout_fn, **kw_args)
        context = context.permute(0, 2, 1, 3).reshape(*hidden_states.shape[:2], attn.hidden_size_per_partition)

        if use_vision:
            output = _route(context, kw_args["vision_expert_mask"], attn.dense, self.vision_dense_list[layer_id],
                            hidden_states.shape[-1])
        else:
            output = apply_linear(attn.dense, context)
        if attn.training:
            output = attn.output_dropout(output)
        return output

    def rotated_qkv(self, mixed: torch.Tensor, position_ids: torch.Tensor):
        """mixed (batch, seq, 3 * heads * head_dim), laid out [query | key | value] -> query, key, value, each
        (batch, heads, seq, head_dim): views of `mixed`, whose query and key are rotated in place without
        autograd (with it, the rotated query and key are new tensors).

        The heads of SAT's `_transpose_for_scores` on `split_tensor_along_last_dim(mixed, 3)`; query and key
        are rotated together, one set of elementwise ops for both.
        """
        batch, length, width = mixed.shape
        head_dim = self.rotary_emb.head_dim
        qkv = mixed.view(batch, length, 3, width // (3 * head_dim), head_dim).permute(2, 0, 3, 1, 4)
        rotate = self.rotary_emb.rotate if torch.is_grad_enabled() else self.rotary_emb.rotate_
        query, key = rotate(qkv[:2], position_ids).unbind(0)
        return query, key, qkv[2]
