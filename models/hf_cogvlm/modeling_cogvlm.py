"""CogVLM for 🤗 transformers: EVA2-CLIP ViT -> GLU adapter -> LLaMA with a visual expert.

Parameter names are those of the published `cogvlm-*-hf` checkpoints. Inputs follow them too:
`token_type_ids` 1 marks the image block (boi, patches, eoi), whose embeddings come from `images`.
A token uses the visual-expert weights when it and the next token are of type 1 (so eoi does not);
all image patches share one rotary position (bos 0, boi 1, patches 2, eoi 3, text 4, 5, ...).
Attention runs through `torch.nn.functional.scaled_dot_product_attention` ("sdpa") or plain
matmul/softmax ("eager"); the KV cache is transformers' own (`DynamicCache` by default).

This file is also copied into converted checkpoint directories as `trust_remote_code` code, so it
imports only torch, transformers and its two sibling files.
"""
import json
import os
import struct
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_cogvlm import CogVLMConfig
from .modeling_cogvlm_vision import CogVLMPatchEmbedding, CogVLMVisionModel, eager_attention
from .processing_cogvlm import VISION_TOKEN_TYPE, build_conversation_input_ids, cogvlm_position_ids

ROTARY_BASE = 10000.0  # fixed by the architecture; configs do not carry it


def inverse_frequencies(head_dim: int, device=None) -> torch.Tensor:
    """(head_dim / 2,) float32 rotary frequencies 1 / base^(2i / head_dim)."""
    return 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """(B, L) positions -> cos, sin (B, 1, L, head_dim), computed in float32 (rotate-half layout)."""
    angles = position_ids[..., None].float() * inverse_frequencies(head_dim, position_ids.device)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, d) rotated by the positions' angles (GPT-NeoX rotate-half over all d dims)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def route(x: torch.Tensor, vision_mask: Optional[torch.Tensor], vision_fn, language_fn) -> torch.Tensor:
    """vision_fn on the rows of x (B, L, D) where vision_mask (B, L) is True, language_fn on the others."""
    if vision_mask is None:
        return language_fn(x)
    vision_out, language_out = vision_fn(x[vision_mask]), language_fn(x[~vision_mask])
    out = vision_out.new_empty(*x.shape[:-1], vision_out.shape[-1])
    out[vision_mask] = vision_out
    out[~vision_mask] = language_out.to(out.dtype)
    return out


class CogVLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


# Language model with the visual expert ---------------------------------------------------------

class CogVLMRotaryBuffer(nn.Module):
    """The per-layer `inv_freq` that cogvlm-chat-hf checkpoints store. Positions are computed from exact
    float32 frequencies (`rotary_cos_sin`), so a bf16 checkpoint's rounded copy does not shift them."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim))


class CogVLMVisualExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.config, self.layer_idx, self.num_heads = config, layer_idx, config.num_attention_heads
        self.rotary_emb = CogVLMRotaryBuffer(hidden // self.num_heads)
        self.vision_expert_query_key_value = nn.Linear(hidden, 3 * hidden, bias=False)
        self.vision_expert_dense = nn.Linear(hidden, hidden, bias=False)
        self.language_expert_query_key_value = nn.Linear(hidden, 3 * hidden, bias=False)
        self.language_expert_dense = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, vision_mask, cos, sin, attention_mask, cache: Optional[Cache]) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = route(x, vision_mask, self.vision_expert_query_key_value, self.language_expert_query_key_value)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [q | k | v] rows
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(self, q, k, v, attention_mask, scaling=q.shape[-1] ** -0.5, is_causal=True)
        return route(out.flatten(2), vision_mask, self.vision_expert_dense, self.language_expert_dense)


class CogVLMSwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CogVLMVisualExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = CogVLMSwiGLU(config.hidden_size, config.intermediate_size)
        self.vision_mlp = CogVLMSwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, vision_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return route(x, vision_mask, self.vision_mlp, self.language_mlp)


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CogVLMVisualExpertAttention(config, layer_idx)
        self.post_attention_layernorm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CogVLMVisualExpertMLP(config)

    def forward(self, hidden_states, vision_mask=None, cos=None, sin=None, attention_mask=None, cache=None,
                **kwargs) -> torch.Tensor:
        """hidden_states (B, L, hidden); vision_mask (B, L) bool or None (no visual-expert token)."""
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), vision_mask, cos, sin,
                                                       attention_mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), vision_mask)


# Models ------------------------------------------------------------------------------------------

class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "CogVLMVisionLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, CogVLMVisionModel):
            init.normal_(module.boi, std=std)
            init.normal_(module.eoi, std=std)
        elif isinstance(module, CogVLMPatchEmbedding):
            init.normal_(module.cls_embedding, std=std)
        elif isinstance(module, CogVLMRotaryBuffer):
            init.copy_(module.inv_freq, inverse_frequencies(module.inv_freq.shape[0] * 2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, after `check_weights_match_config` for a local directory."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path) and not kwargs.get("subfolder") and not kwargs.get("gguf_file"):
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                config = cls.config_class.from_pretrained(path)
            if getattr(config, "quantization_config", None) is None:  # pre-quantized weights have other shapes
                check_weights_match_config(cls, config, path)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def local_weight_shapes(directory: str) -> Optional[Dict[str, List[int]]]:
    """{tensor name: shape} from the safetensors headers of a local checkpoint directory (one file or
    shards with an index); None when it has no safetensors weights."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        with open(os.path.join(directory, name), "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        shapes.update({key: value["shape"] for key, value in header.items() if key != "__metadata__"})
    return shapes


def check_weights_match_config(model_class, config: CogVLMConfig, directory: str) -> None:
    """Raise one clear error when a local directory has no weights or weights that its config does
    not describe (transformers would otherwise print a long report, or initialise missing layers)."""
    found = local_weight_shapes(directory)
    if found is None:
        if not any(name.startswith("pytorch_model") for name in os.listdir(directory)):
            raise OSError(f"'{directory}' holds no model weights (model.safetensors, or shards named by "
                          "model.safetensors.index.json); put the weights next to config.json")
        return
    with torch.device("meta"):
        expected = {key: list(value.shape) for key, value in model_class(config).state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    if not any(key.startswith(prefix) for key in expected):  # the bare CogVLMModel
        found = {key[len(prefix):]: shape for key, shape in found.items() if key.startswith(prefix)}
    # a checkpoint may leave out the fixed rotary buffers; they are recomputed
    missing = [key for key in expected if key not in found and not key.endswith("rotary_emb.inv_freq")]
    unexpected = [key for key in found if key not in expected]
    mismatched = [key for key in expected if key in found and found[key] != expected[key]]
    if missing or unexpected or mismatched:
        examples = [f"{len(mismatched)} with other shapes" + (f" (e.g. {mismatched[0]}: {found[mismatched[0]]} "
                    f"in the weights, {expected[mismatched[0]]} by the config)" if mismatched else ""),
                    f"{len(missing)} missing" + (f" (e.g. {missing[0]})" if missing else ""),
                    f"{len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]})" if unexpected else "")]
        raise ValueError(f"config.json in '{directory}' does not match its weights: {', '.join(examples)} "
                         "tensors; use the config.json that was written with these weights")


def _stack_images(images, count: int, image_tokens: int) -> torch.Tensor:
    """`images` (a (N, C, S, S) tensor, per-sample lists [[image], [], ...], or None) -> (N, C, S, S) or None."""
    if isinstance(images, torch.Tensor):
        stacked = images if images.dim() == 4 else images[None]
    else:
        flat = []
        for sample in images or []:
            sample = [sample] if isinstance(sample, torch.Tensor) else list(sample or [])
            if len(sample) > 1:
                raise ValueError(f"CogVLM takes one image per conversation, got {len(sample)} in one sample")
            flat += sample
        stacked = torch.stack(flat) if flat else None
    if (0 if stacked is None else stacked.shape[0]) != count:
        raise ValueError(f"token_type_ids mark {count} image blocks of {image_tokens} tokens but "
                         f"{0 if stacked is None else stacked.shape[0]} images were given")
    return stacked


class CogVLMModel(CogVLMPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.weight"]  # loading the bare model from a CausalLM checkpoint

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = CogVLMVisionModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(self, input_ids, images, vision_tokens: Optional[torch.Tensor], inputs_embeds=None) -> torch.Tensor:
        """Word embeddings with the image block's rows replaced by [boi, image features, eoi]."""
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        image_tokens = self.config.num_image_patches + 2
        if vision_tokens is None:  # pixels without an image block to take them are an error, not ignored
            _stack_images(images, 0, image_tokens)
            return embeds
        per_sample = vision_tokens.sum(-1)
        if not bool(((per_sample == 0) | (per_sample == image_tokens)).all()):
            raise ValueError(f"each sample needs 0 or {image_tokens} tokens of type 1 (boi, "
                             f"{image_tokens - 2} patches, eoi), got {per_sample.tolist()}")
        if images is None:
            raise ValueError("token_type_ids mark an image block but no images were given")
        pixels = _stack_images(images, int((per_sample > 0).sum()), image_tokens)
        image_embeds = self.vision(pixels).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(vision_tokens[..., None], image_embeds)

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, position_ids=None,
                cache: Optional[Cache] = None, inputs_embeds=None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        """input_ids / token_type_ids (B, L); attention_mask (B, past + L) 0/1; images (N, C, S, S) or
        per-sample lists; position_ids (B, L), derived from token_type_ids when absent."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if use_cache is None:  # a cache only serves decoding; training forwards go without one
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(reference, dtype=torch.long)
        vision_tokens = token_type_ids == VISION_TOKEN_TYPE
        has_vision = bool(vision_tokens.any())
        hidden_states = self.embed(input_ids, images, vision_tokens if has_vision else None, inputs_embeds)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            # Continuing a cache: positions go on from where the last call left them (an image block
            # takes 3 positions for patches + 2 cache slots, so the cache length is not the position).
            start = getattr(cache, "cogvlm_next_position", None) if past else None
            if start is not None:
                position_ids = start[:, None] + torch.arange(reference.shape[1], device=start.device)
            else:
                position_ids = cogvlm_position_ids(token_type_ids, attention_mask) + past
        if cache is not None:
            cache.cogvlm_next_position = position_ids[:, -1] + 1
        vision_mask = None
        if has_vision:  # a token uses the visual expert when it and the next token are image tokens
            vision_mask = torch.zeros_like(vision_tokens)
            vision_mask[:, :-1] = vision_tokens[:, :-1] & vision_tokens[:, 1:]
        # position_ids are left out on purpose: transformers would read our shared image positions as packed sequences
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache)
        cos, sin = rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                  hidden_states.dtype)
        all_hidden = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, vision_mask=vision_mask, cos=cos, sin=sin, attention_mask=mask,
                                  cache=cache)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None,
                                       hidden_states=tuple(all_hidden + [hidden_states]) if output_hidden_states
                                       else None)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, position_ids=None,
                cache: Optional[Cache] = None, inputs_embeds=None, labels=None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep: Union[int, torch.Tensor] = 0, past_key_values: Optional[Cache] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Inputs as `CogVLMModel.forward`; labels (B, L) with -100 where no loss is taken (shifted inside)."""
        outputs = self.model(input_ids=input_ids, images=images, token_type_ids=token_type_ids,
                             attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                        hidden_states=outputs.hidden_states)
        return output if return_dict is not False else output.to_tuple()

    def build_conversation_input_ids(self, tokenizer, *, query: str, history: Optional[List] = None,
                                     images: Optional[List] = None, template_version: Optional[str] = None):
        """The cogvlm-chat-hf call: one conversation -> 1-D `input_ids`, `token_type_ids`,
        `attention_mask` and `images` (a list of one (3, S, S) tensor, or None)."""
        vision = self.config.vision_config
        return build_conversation_input_ids(tokenizer, query=query, history=history, images=images,
                                            template_version=template_version or self.config.template_version,
                                            image_size=vision["image_size"], patch_size=vision["patch_size"])

    # generate(): CogVLM positions, images only in the prefill, generated tokens are text -----------

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        token_type_ids = model_kwargs.get("token_type_ids")
        if token_type_ids is None:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return cogvlm_position_ids(token_type_ids, model_kwargs.get("attention_mask"))

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        # the image block's placeholder ids equal the pad id: never infer padding there
        mask = super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)
        token_type_ids = model_kwargs.get("token_type_ids")
        if token_type_ids is not None and token_type_ids.shape == mask.shape:
            mask = mask | (token_type_ids == VISION_TOKEN_TYPE).to(mask.dtype)
        return mask

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        images = model_kwargs.get("images")
        if expand_size > 1 and isinstance(images, (list, tuple)):  # tensors are expanded by transformers
            model_kwargs["images"] = [sample for sample in images for _ in range(expand_size)]
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, images=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if cache is None or cache.get_seq_length() == 0:
            inputs["images"] = images
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if token_type_ids is not None:
            model_kwargs["token_type_ids"] = torch.cat(
                [token_type_ids, token_type_ids.new_zeros(token_type_ids.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs


__all__ = ["CogVLMForCausalLM", "CogVLMModel", "CogVLMPreTrainedModel"]
