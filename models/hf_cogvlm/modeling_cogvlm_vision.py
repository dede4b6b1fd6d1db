"""CogVLM's vision side for 🤗 transformers: EVA2-CLIP ViT and the GLU adapter, plus the attention call
that the ViT and the language model share.

EVA2-CLIP differs from a textbook ViT in its post-sublayer LayerNorm (`h = h + LN(Attn(h))`), a learned
CLS vector and no final norm; the CLS position is dropped from the output. The adapter maps ViT width
to LLM width and brackets the image with the learned `boi` / `eoi` vectors.

This file is also copied into converted checkpoint directories as `trust_remote_code` code, so it
imports only torch and transformers.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                    is_causal: bool = True, **kwargs):
    """matmul/softmax attention with the AttentionInterface signature: (B, heads, q, d) queries over
    (B, heads, kv, d) keys/values -> ((B, q, heads, d), weights). attention_mask: None, boolean
    (True = attend) or additive float; with None and is_causal, the upper-left causal mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and is_causal and query.shape[2] > 1:
        attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def attend(module, query, key, value, attention_mask, is_causal: bool) -> torch.Tensor:
    """Attention by `config._attn_implementation`: "sdpa" is transformers' wrapper of
    torch.nn.functional.scaled_dot_product_attention, "eager" the function above. -> (B, q, heads * d)."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention)
    out, _ = attention(module, query, key, value, attention_mask, scaling=query.shape[-1] ** -0.5,
                       is_causal=is_causal)
    return out.flatten(2)


class CogVLMPatchEmbedding(nn.Module):
    def __init__(self, vision: dict):
        super().__init__()
        width, patch = vision["hidden_size"], vision["patch_size"]
        self.proj = nn.Conv2d(vision["in_channels"], width, kernel_size=patch, stride=patch)
        self.cls_embedding = nn.Parameter(torch.zeros(1, width))
        self.position_embedding = nn.Embedding(vision["num_positions"], width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, 1 + patches, width): CLS first, learned position embeddings added."""
        patches = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(patches.shape[0], -1, -1)
        # through the Embedding's forward (not `.weight`), so accelerate's offload hooks load the table
        positions = self.position_embedding(torch.arange(patches.shape[1] + 1, device=patches.device))
        return torch.cat([cls, patches], dim=1) + positions[None]


class CogVLMVisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = config.vision_config["hidden_size"]
        self.config, self.num_heads = config, config.vision_config["num_heads"]
        self.query_key_value = nn.Linear(width, 3 * width)
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.query_key_value(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.dense(attend(self, q, k, v, None, is_causal=False))


class CogVLMVisionMLP(nn.Module):
    def __init__(self, vision: dict):
        super().__init__()
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CogVLMVisionLayer(GradientCheckpointingLayer):
    """h = h + LN1(Attn(h)); h = h + LN2(MLP(h)): the norms act on the branch outputs."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])
        self.attention = CogVLMVisionAttention(config)
        self.mlp = CogVLMVisionMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class CogVLMVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CogVLMVisionLayer(config) for _ in range(config.vision_config["num_hidden_layers"]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class CogVLMGLU(nn.Module):
    """ViT width -> LLM width: linear_proj, LayerNorm, GELU, then a SwiGLU MLP (LLM inner size)."""

    def __init__(self, config):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.linear_proj = nn.Linear(config.vision_config["hidden_size"], hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)  # eps 1e-5 (PyTorch's default) in the released models
        self.dense_h_to_4h = nn.Linear(hidden, inner, bias=False)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.dense_4h_to_h = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class CogVLMVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_embedding = CogVLMPatchEmbedding(config.vision_config)
        self.transformer = CogVLMVisionTransformer(config)
        self.linear_proj = CogVLMGLU(config)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, patches + 2, hidden): [boi, adapter(ViT(image) without CLS), eoi]."""
        images = images.to(self.patch_embedding.proj.weight.dtype)
        features = self.linear_proj(self.transformer(self.patch_embedding(images))[:, 1:]).to(self.boi.device)
        count = features.shape[0]
        return torch.cat([self.boi.expand(count, -1, -1), features, self.eoi.expand(count, -1, -1)], dim=1)
