"""CogVLM on SwissArmyTransformer: EVA2-CLIP ViT -> GLU adapter -> LLaMA with a visual expert.

State-dict layout (what the released SAT checkpoints hold):
  transformer.*                     LLaMA body (language expert qkv/dense/up/down, norms, embeddings)
  mixins.lm.lm_head                 output projection
  mixins.eva.{vit_model,linear_proj,boi,eoi}   vision encoder, GLU adapter, image delimiters
  mixins.mlp.{gate_proj,vision_*}   language gate + visual-expert MLP
  mixins.rotary.{rotary_emb,vision_*}   rotary buffer + visual-expert qkv/dense
"""
import argparse
import json
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.model.base_model import BaseMixin
from sat.model.finetune import PTuningV2Mixin
from sat.model.finetune.lora2 import LoraMixin
from sat.model.official.llama_model import LLaMAModel, LMMixin
from sat.mpu.layers import unscaled_init_method
from sat.ops.layernorm import RMSNorm

from models.eva_clip_model import EVA2CLIPModel
from models.inputs import accepted_keywords, check_image_inputs, check_keywords, take_vision_inputs
from models.kernels.linear import apply_linear, single_partition
from models.kv_cache import KVCacheMixin, cached_attention
from models.mixin import LlamaVisionExpertAttnMixin, LlamaVisionExpertFCMixin
from models.vision_expert_lora import VisionExpertLoraMixin
from models.errors import CogVLMError

logger = logging.getLogger(__name__)

# Fields of the LLM's args that the ViT must share (distribution, precision, placement, mode).
_SHARED_VIT_ARGS = ("model_parallel_size", "skip_init", "use_gpu_initialization", "device", "fp16", "bf16",
                    "mode", "checkpoint_activations", "checkpoint_num_layers", "deepspeed")


def vit_args_from(args) -> argparse.Namespace:
    """Build the ViT's args from `args.eva_args` plus the LLM's distribution/precision settings."""
    vit_args = dict(args.eva_args)
    for name in _SHARED_VIT_ARGS:
        if hasattr(args, name):
            vit_args[name] = getattr(args, name)
    return EVA2CLIPModel.get_args(**vit_args)


class GLU(nn.Module):
    """Adapter from ViT width to LLM width: proj -> GELU(LayerNorm) -> SwiGLU MLP (no biases).

    in_features: the ViT hidden size (1792 for EVA2-CLIP-E). (B, L, in_features) -> (B, L, hidden).
    """

    def __init__(self, in_features: int, hidden_size: int, inner_hidden_size: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.act1 = nn.GELU()
        self.act2 = nn.functional.silu
        self.dense_h_to_4h = nn.Linear(hidden_size, inner_hidden_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, inner_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(inner_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(self.act2(self.gate_proj(x)) * self.dense_h_to_4h(x))


class ImageMixin(BaseMixin):
    """Replaces the word embeddings of the image block with boi | GLU(ViT(image)) | eoi."""

    def __init__(self, args, params_dtype=torch.float):
        super().__init__()
        # built in the LLM's dtype: a ViT built in fp32 and converted after (SAT's get_model) writes a
        # converted copy of every weight, even those quantization replaces before loading
        self.vit_model = EVA2CLIPModel(vit_args_from(args), params_dtype=params_dtype)
        self.linear_proj = GLU(args.eva_args["hidden_size"], args.hidden_size, args.inner_hidden_size)
        self.image_length = args.image_length
        self.boi = nn.Parameter(torch.zeros(1, 1, args.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, args.hidden_size))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> image embeddings at LLM width (N, image_length, hidden)."""
        return self.linear_proj(self.vit_model(images)[0])

    def word_embedding_forward(self, input_ids, output_cross_layer, images=None, image_embed_mask=None,
                               image_embeds=None, **kw_args):
        embeddings = self.transformer.word_embeddings(input_ids)
        if images is None and image_embeds is None:
            return embeddings
        image_emb = self.encode_image(images.to(embeddings.dtype)) if image_embeds is None else image_embeds
        batch, _, hidden = image_emb.shape
        block = torch.cat([self.boi.expand(batch, 1, hidden), image_emb, self.eoi.expand(batch, 1, hidden)], dim=1)
        embeddings = embeddings.clone()
        embeddings[image_embed_mask.bool()] = block.reshape(-1, hidden).to(embeddings.dtype)
        return embeddings


class LMHeadMixin(LMMixin):
    """SAT's LM head that can project only the last position (`last_logits_only=True`): a prefill
    needs one row of logits, and the full (L x vocab) projection is ~10% of its compute."""

    forward_inputs = ("last_logits_only",)

    def final_forward(self, logits, **kw_args):
        if kw_args.get("last_logits_only"):
            logits = logits[:, -1:]
        return apply_linear(self.lm_head, logits)


class CogVLMModel(LLaMAModel):
    """CogVLM: `model(input_ids, position_ids, attention_mask, vision_expert_mask=, image_embed_mask=, images=)`
    -> (logits (B, L, vocab), *per-layer outputs).

    input_ids, position_ids, vision_expert_mask, image_embed_mask: (B, L); attention_mask (B or 1, 1, L, L),
    1 = attend; images (N, 3, S, S) for the N rows whose image block `image_embed_mask` marks, in row order.
    Upstream's spelling works the same: `model(..., **{"vision_" + k: v for k, v in image_processor(img).items()})`
    (`vision_image` is `images`; the ViT's token inputs beside it are checked). image_rope_mask (B, L), as
    the text processor returns it, is checked against position_ids (or gives them when they are left out).
    The image inputs are optional (text-only prompts). A single-token step with a cache (`kv_cache`, or SAT's
    `mems`) uses the language expert only; the image inputs SAT's generation loop passes again at every step
    belong to the cached prompt and are not read. Everything else is used or refused with a CogVLMError.
    Built from SAT args (models.config.CogVLMConfig.sat_args); loading weights is the checkpoint layer's job
    (models/checkpoint), which also provides the upstream `from_pretrained`.
    """

    def __init__(self, args, transformer=None, params_dtype=torch.float, **kwargs):
        # SAT's BaseTransformer takes `parallel_output` from args; passing it as a kwarg as well
        # (as the upstream code did) raises "got multiple values", so it lives in args only.
        kwargs.pop("parallel_output", None)
        args.parallel_output = getattr(args, "parallel_output", False)
        super().__init__(args, transformer=transformer, params_dtype=params_dtype, **kwargs)
        self.image_length = args.image_length
        # SAT's LLaMAModel built `lm` as a plain LMMixin; upgrading it in place keeps its (already
        # initialised) weights and its checkpoint keys, instead of building a second vocab x hidden head.
        self.get_mixin("lm").__class__ = LMHeadMixin
        self.collect_hooks_()
        device = self.transformer.word_embeddings.weight.device
        expert_kwargs = dict(params_dtype=params_dtype, device=device, skip_init=getattr(args, "skip_init", False),
                             init_method=unscaled_init_method(0.01))
        self.add_mixin("eva", ImageMixin(args, params_dtype))
        self.del_mixin("mlp")
        self.add_mixin("mlp", LlamaVisionExpertFCMixin(args.hidden_size, args.inner_hidden_size, args.num_layers,
                                                       **expert_kwargs))
        self.del_mixin("rotary")
        self.add_mixin("rotary", LlamaVisionExpertAttnMixin(args.hidden_size, args.num_attention_heads, args.num_layers,
                                                            **expert_kwargs))

    def forward(self, input_ids, position_ids=None, attention_mask=None, *, vision_expert_mask=None,
                image_embed_mask=None, images=None, image_rope_mask=None, image_embeds=None, **kwargs):
        """Logits of `input_ids`; see the class docstring for the inputs. Every keyword is used or refused
        (`CogVLMError` naming it): `forward_inputs` of the model's mixins are the only extra keywords.
        image_embeds (N, image_length, hidden): the images' `encode_image` output, given instead of `images`."""
        images = take_vision_inputs(kwargs, images, input_ids.device)
        if image_embeds is not None:
            if images is not None:
                raise CogVLMError("forward got both images and image_embeds; pass the pixels or their embeddings")
            hidden = self.transformer.word_embeddings.weight.shape[1]
            if image_embeds.dim() != 3 or tuple(image_embeds.shape[1:]) != (self.image_length, hidden):
                raise CogVLMError(f"image_embeds has shape {tuple(image_embeds.shape)}; it must be (N, "
                                  f"{self.image_length}, {hidden}), encode_image's output")
        check_keywords(kwargs, self.accepted_inputs())
        cached_step = input_ids.shape[1] == 1 and (kwargs.get("kv_cache") is not None
                                                   or kwargs.get("mems") is not None)
        if cached_step:
            # the prompt's image is in the cache already; SAT's filling_sequence passes the prompt's image
            # inputs again at every step, and they have the prompt's length, not this step's
            kwargs.update(position_ids=position_ids, attention_mask=attention_mask)
            if self._decodes_directly(input_ids, kwargs):
                return (self.decode_step(input_ids, position_ids, attention_mask, kwargs["kv_cache"]),)
            return super().forward(input_ids=input_ids, **kwargs)
        position_ids = check_image_inputs(input_ids, position_ids, vision_expert_mask, image_embed_mask,
                                          image_rope_mask, images if image_embeds is None else image_embeds,
                                          self.image_length)
        if images is None and image_embeds is None:
            return super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   **kwargs)
        return super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               vision_expert_mask=vision_expert_mask, image_embed_mask=image_embed_mask,
                               images=images, image_embeds=image_embeds, **kwargs)

    def accepted_inputs(self) -> frozenset:
        """The keywords `forward` takes besides its named ones: SAT's and those the model's mixins read."""
        return accepted_keywords(self.mixins.values())

    def _decodes_directly(self, input_ids, kwargs) -> bool:
        """Whether this forward is a cached decode step that `decode_step` computes: one token per row,
        inference, and no mixin beyond the inference ones (LoRA, P-tuning and any added hook go through SAT)."""
        return (input_ids.shape[1] == 1 and kwargs.get("kv_cache") is not None and not self.training
                and not torch.is_grad_enabled() and set(kwargs) == {"position_ids", "attention_mask", "kv_cache"}
                and all(name in self.mixins and type(self.mixins[name]) is kind
                        for name, kind in _DIRECT_DECODE_MIXINS.items())
                and len(self.mixins) == len(_DIRECT_DECODE_MIXINS))

    def decode_step(self, input_ids, position_ids, attention_mask, kv_cache) -> torch.Tensor:
        """One cached decoding step, the language expert's pre-LN LLaMA layers written out.

        input_ids, position_ids (B, 1); attention_mask (B or 1, 1, 1, cached + 1), 1 = attend; kv_cache: a
        models.kv_cache cache holding the rows' earlier positions -> logits (B, 1, vocab).

        The same operations as `forward` (SAT's layer_forward_default with this model's mixins, bit for bit:
        tests/test_decode.py) without SAT's per-layer plumbing (three module calls, hook lookups and keyword
        dictionaries per layer), which cost a noticeable share of a one-token step on a CPU.
        """
        attention_mixin, mlp_mixin = self.get_mixin("rotary"), self.get_mixin("mlp")
        mask_kinds = self.get_mixin("kv-cache").mask_kinds
        mask = None if bool(attention_mask.all()) else attention_mask.bool()  # decided once for all layers
        embeddings = self.transformer.word_embeddings
        if single_partition():  # SAT's layer adds a (here empty) all-reduce, an autograd function call
            hidden = F.embedding(input_ids, embeddings.weight)  # (B, 1, hidden)
        else:
            hidden = embeddings(input_ids)
        for layer_id, layer in enumerate(self.transformer.layers):
            attention = layer.attention
            qkv = apply_linear(attention.query_key_value, _rms_norm(layer.input_layernorm, hidden))  # (B, 1, 3 hidden)
            query, key, value = attention_mixin.rotated_qkv(qkv, position_ids)  # (B, heads, 1, head_dim) each
            key, value = kv_cache.append(layer_id, key, value)  # (B, heads, cached + 1, head_dim)
            context = cached_attention(query, key, value, mask, mask_kinds)  # (B, heads, 1, head_dim)
            context = context.transpose(1, 2).reshape(*hidden.shape[:2], attention.hidden_size_per_partition)
            hidden = hidden + apply_linear(attention.dense, context)
            hidden = hidden + mlp_mixin.language_mlp(_rms_norm(layer.post_attention_layernorm, hidden), layer_id)
        return self.get_mixin("lm").final_forward(_rms_norm(self.transformer.final_layernorm, hidden))

    @classmethod
    def add_model_specific_args(cls, parser):
        group = parser.add_argument_group("CogVLM", "CogVLM Configurations")
        group.add_argument("--image_length", type=int, default=256)
        group.add_argument("--eva_args", type=json.loads, default={})
        return super().add_model_specific_args(parser)

    # The upstream entry point `CogVLMModel.from_pretrained(name, args)`: reading checkpoints belongs to the
    # checkpoint layer above the networks (models/checkpoint), which installs its loader here when imported
    # (`import models` does it), so that this file never imports it.
    checkpoint_loader = None

    @classmethod
    def from_pretrained(cls, name, args=None, *, home_path=None, url=None, prefix="", build_only=False,
                        use_node_group=True, overwrite_args=None, **kwargs):
        """Build this class from the checkpoint `name` (a directory, or a name under `home_path` / $SAT_HOME)
        and load its weights; returns (model, args) as SAT does, with SAT's arguments. See
        models.checkpoint.loader.from_pretrained."""
        if cls.checkpoint_loader is None:
            raise RuntimeError("import models.checkpoint (or models) before CogVLMModel.from_pretrained")
        return cls.checkpoint_loader(name, args, home_path=home_path, url=url, prefix=prefix, build_only=build_only,
                                     use_node_group=use_node_group, overwrite_args=overwrite_args, **kwargs)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for SAT's RMSNorm through torch's `F.rms_norm`: the same numbers (tests/test_decode.py) in
    fewer operations."""
    if type(norm) is RMSNorm:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


# The mixins an inference model has (`decode_step` computes exactly their forward).
_DIRECT_DECODE_MIXINS = {"lm": LMHeadMixin, "eva": ImageMixin, "mlp": LlamaVisionExpertFCMixin,
                         "rotary": LlamaVisionExpertAttnMixin, "kv-cache": KVCacheMixin}


class FineTuneTrainCogVLMModel(CogVLMModel):
    """CogVLM with the finetuning mixins the flags ask for: LoRA on the LLM attention (`--lora_experts`: the
    language expert, the visual expert or both) and on the ViT attention, P-tuning v2 prefixes, or QLoRA
    (4-bit base weights, GPU only)."""

    def __init__(self, args, transformer=None, **kwargs):
        super().__init__(args, transformer=transformer, **kwargs)
        self.args = args
        layer_range = getattr(args, "layer_range", None)
        if getattr(args, "use_ptuning", False):
            self.add_mixin("ptuning", PTuningV2Mixin(args.num_layers, args.hidden_size // args.num_attention_heads,
                                                     args.num_attention_heads, args.pre_seq_len))
        if getattr(args, "use_qlora", False) and not torch.cuda.is_available():
            raise CogVLMError("--use_qlora needs a CUDA GPU (bitsandbytes 4-bit layers); on CPU use --use_lora")
        if getattr(args, "use_lora", False) or getattr(args, "use_qlora", False):
            qlora = bool(getattr(args, "use_qlora", False))
            experts = getattr(args, "lora_experts", "language")
            if experts in ("language", "both"):
                self.add_mixin("lora", LoraMixin(args.num_layers, args.lora_rank, layer_range=layer_range, qlora=qlora),
                               reinit=True)
            if experts in ("vision", "both"):
                self.add_mixin("vision_lora", VisionExpertLoraMixin(args.num_layers, args.lora_rank,
                                                                    layer_range=layer_range), reinit=True)
            vit = self.get_mixin("eva").vit_model
            vit.add_mixin("lora", LoraMixin(args.eva_args["num_layers"], args.lora_rank, layer_range=layer_range),
                          reinit=True)

    @classmethod
    def add_model_specific_args(cls, parser):
        group = parser.add_argument_group("CogVLM-finetune", "CogVLM finetune Configurations")
        group.add_argument("--pre_seq_len", type=int, default=8)
        group.add_argument("--lora_rank", type=int, default=10)
        group.add_argument("--use_ptuning", action="store_true")
        group.add_argument("--use_lora", action="store_true")
        group.add_argument("--use_qlora", action="store_true")
        group.add_argument("--layer_range", nargs="+", type=int, default=None)
        group.add_argument("--lora_experts", choices=("language", "vision", "both"), default="language",
                           help="whose LLM attention --use_lora adapts: the language expert (upstream), the "
                                "visual expert or both")
        return super().add_model_specific_args(parser)

    def merge_lora(self):
        """Fold every LoRA update into its base weight (W += scaling * B @ A) and drop the LoRA mixins."""
        if "lora" in self.mixins:
            self.get_mixin("lora").merge_lora()
            self.del_mixin("lora")
        if "vision_lora" in self.mixins:
            self.get_mixin("vision_lora").merge_lora(self)
            self.del_mixin("vision_lora")
        vit = self.get_mixin("eva").vit_model
        if "lora" in vit.mixins:
            vit.get_mixin("lora").merge_lora()
            vit.del_mixin("lora")


class FineTuneTestCogVLMModel(FineTuneTrainCogVLMModel):
    """The finetuned model for inference: same mixins, loaded from a finetuned checkpoint."""


# model_config.json's `model_class` -> the class that loads it for inference. Finetuned checkpoints carry
# their finetuning mixins (LoRA, P-tuning), which the finetune classes build from the config's flags.
INFERENCE_CLASSES = {"CogVLMModel": CogVLMModel, "FineTuneTrainCogVLMModel": FineTuneTestCogVLMModel,
                     "FineTuneTestCogVLMModel": FineTuneTestCogVLMModel}
