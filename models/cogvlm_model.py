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
import os

import torch
import torch.nn as nn

from sat import mpu
from sat.arguments import overwrite_args_by_dict
from sat.model.base_model import BaseMixin, get_model
from sat.model.finetune import PTuningV2Mixin
from sat.model.finetune.lora2 import LoraMixin
from sat.model.official.llama_model import LLaMAModel, LMMixin
from sat.mpu.layers import unscaled_init_method

from models import checkpoint_io
from models.eva_clip_model import EVA2CLIPModel
from models.linear import apply_linear
from models.mixin import LlamaVisionExpertAttnMixin, LlamaVisionExpertFCMixin
from utils import hf_format
from models.errors import CheckpointError, CogVLMError

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

    def __init__(self, args):
        super().__init__()
        self.vit_model = EVA2CLIPModel(vit_args_from(args))
        self.linear_proj = GLU(args.eva_args["hidden_size"], args.hidden_size, args.inner_hidden_size)
        self.image_length = args.image_length
        self.boi = nn.Parameter(torch.zeros(1, 1, args.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, args.hidden_size))

    def encode_image(self, image: torch.Tensor, **vit_inputs) -> torch.Tensor:
        """image (B, 3, S, S) -> image embeddings at LLM width (B, image_length, hidden)."""
        features = self.vit_model(image=image, **vit_inputs)[0]
        return self.linear_proj(features)

    def word_embedding_forward(self, input_ids, output_cross_layer, **kw_args):
        embeddings = self.transformer.word_embeddings(input_ids)
        vision_inputs = {k[len("vision_"):]: v for k, v in kw_args.items()
                         if k.startswith("vision_") and k != "vision_expert_mask" and v is not None}
        if "image" not in vision_inputs or input_ids.shape[1] == 1:
            return embeddings
        image_emb = self.encode_image(**vision_inputs)
        batch, _, hidden = image_emb.shape
        block = torch.cat([self.boi.expand(batch, 1, hidden), image_emb, self.eoi.expand(batch, 1, hidden)], dim=1)
        image_embed_mask = kw_args["image_embed_mask"].bool()
        if int(image_embed_mask.sum()) != block.shape[0] * block.shape[1]:
            raise ValueError(f"image_embed_mask marks {int(image_embed_mask.sum())} positions but {batch} image(s) "
                             f"need {block.shape[1]} each (image_length + boi + eoi)")
        embeddings = embeddings.clone()
        embeddings[image_embed_mask] = block.reshape(-1, hidden).to(embeddings.dtype)
        return embeddings


class LMHeadMixin(LMMixin):
    """SAT's LM head that can project only the last position (`last_logits_only=True`): a prefill
    needs one row of logits, and the full (L x vocab) projection is ~10% of its compute."""

    def final_forward(self, logits, **kw_args):
        if kw_args.get("last_logits_only"):
            logits = logits[:, -1:]
        return apply_linear(self.lm_head, logits)


class CogVLMModel(LLaMAModel):
    """CogVLM: `model(input_ids, position_ids, attention_mask, vision_expert_mask=, image_embed_mask=,
    vision_image=)` -> (logits (B, L, vocab), *per-layer outputs). Vision inputs are optional
    (text-only prompts); single-token steps of cached decoding use the language expert only.
    """

    def __init__(self, args, transformer=None, params_dtype=torch.float, **kwargs):
        # SAT's BaseTransformer takes `parallel_output` from args; passing it as a kwarg as well
        # (as the upstream code did) raises "got multiple values", so it lives in args only.
        kwargs.pop("parallel_output", None)
        args.parallel_output = getattr(args, "parallel_output", False)
        _check_config(args)
        super().__init__(args, transformer=transformer, params_dtype=params_dtype, **kwargs)
        self.image_length = args.image_length
        # SAT's LLaMAModel built `lm` as a plain LMMixin; upgrading it in place keeps its (already
        # initialised) weights and its checkpoint keys, instead of building a second vocab x hidden head.
        self.get_mixin("lm").__class__ = LMHeadMixin
        self.collect_hooks_()
        device = self.transformer.word_embeddings.weight.device
        expert_kwargs = dict(params_dtype=params_dtype, device=device, skip_init=getattr(args, "skip_init", False),
                             init_method=unscaled_init_method(0.01))
        self.add_mixin("eva", ImageMixin(args))
        self.del_mixin("mlp")
        self.add_mixin("mlp", LlamaVisionExpertFCMixin(args.hidden_size, args.inner_hidden_size, args.num_layers,
                                                       **expert_kwargs))
        self.del_mixin("rotary")
        self.add_mixin("rotary", LlamaVisionExpertAttnMixin(args.hidden_size, args.num_attention_heads, args.num_layers,
                                                            **expert_kwargs))

    def forward(self, input_ids, vision_expert_mask=None, image_embed_mask=None, **kwargs):
        kwargs.pop("parallel_output", None)
        if input_ids.shape[1] > 1 and vision_expert_mask is not None:
            return super().forward(input_ids=input_ids, vision_expert_mask=vision_expert_mask,
                                   image_embed_mask=image_embed_mask, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("vision_")}
        return super().forward(input_ids=input_ids, **kwargs)

    @classmethod
    def add_model_specific_args(cls, parser):
        group = parser.add_argument_group("CogVLM", "CogVLM Configurations")
        group.add_argument("--image_length", type=int, default=256)
        group.add_argument("--eva_args", type=json.loads, default={})
        return super().add_model_specific_args(parser)

    # Loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_base(cls, name, args=None, *, home_path=None, url=None, prefix="", build_only=False,
                             overwrite_args={}, before_load=None, **kwargs):
        """Build the model from `name` (a directory or a name under $SAT_HOME) and load its weights.

        Unlike SAT's loader this never downloads, and a checkpoint whose keys do not match the model
        raises CheckpointError naming the keys. `before_load(model)` runs between building and
        loading (e.g. to swap in layers that quantize as they load). Returns (model, args).
        """
        model_path = checkpoint_io.resolve_checkpoint(name) if home_path is None else os.path.join(home_path, name)
        config = checkpoint_io.read_model_config(model_path)
        is_hf = hf_format.is_hf_checkpoint(model_path)
        if not build_only and not is_hf:
            checkpoint_io.read_latest_iteration(model_path)
        model_class = config.get("model_class", "CogVLMModel")
        if "CogVLM" not in model_class:
            raise CheckpointError(f"{model_path} holds a {model_class}, not a CogVLM checkpoint")
        if args is None:
            args = cls.get_args()
        if is_hf:  # SAT's builder reads model_config.json, which an HF directory lacks: same steps, our config
            kwargs.pop("specific_iteration", None)
            model_args = overwrite_args_by_dict(argparse.Namespace(**{**vars(args), **config}), overwrite_args)
            model = get_model(model_args, cls, **kwargs)
        else:
            model, model_args = super().from_pretrained_base(model_path, args=args, url="local", prefix=prefix,
                                                             build_only=True, overwrite_args=overwrite_args, **kwargs)
        if before_load is not None:
            before_load(model)
        if not build_only:
            load_checkpoint(model, model_args, model_path)
        return model, model_args


def load_checkpoint(model, args, ckpt_dir):
    """Load this model-parallel rank's shard of the SAT checkpoint in `ckpt_dir` (or an HF-format directory,
    model-parallel size 1) into `model`."""
    mode = getattr(args, "mode", "inference")
    # finetuning from a base checkpoint: new finetune parameters start from their initialisation
    new_params = (".matrix_A.", ".matrix_B.", "mixins.ptuning.") if mode != "inference" else ()
    if hf_format.is_hf_checkpoint(ckpt_dir):
        hf_format.load_hf_weights(model, ckpt_dir, allow_missing_prefixes=new_params)
    else:
        path = checkpoint_io.checkpoint_file(ckpt_dir, mpu.get_model_parallel_rank())
        state_dict = checkpoint_io.load_state_dict_file(path)
        checkpoint_io.load_weights(model, state_dict, source=path, allow_missing_prefixes=new_params)
        logger.info("loaded %d tensors from %s", len(state_dict), path)
    if mode == "inference":
        model.eval()


def _check_config(args):
    for name in ("eva_args", "image_length", "inner_hidden_size"):
        if getattr(args, name, None) in (None, {}):
            raise CheckpointError(f"model config has no '{name}'; is this a CogVLM model_config.json?")
    eva = args.eva_args
    image_size = eva.get("image_size", [224, 224])
    patches = (image_size[0] // eva.get("patch_size", 14)) * (image_size[1] // eva.get("patch_size", 14))
    if patches != args.image_length:
        raise CheckpointError(f"model config says image_length={args.image_length} but a {image_size} image "
                              f"with patch {eva.get('patch_size')} has {patches} patches")


class FineTuneTrainCogVLMModel(CogVLMModel):
    """CogVLM with the finetuning mixins the flags ask for: LoRA on the LLM attention (language expert)
    and on the ViT attention, P-tuning v2 prefixes, or QLoRA (4-bit base weights, GPU only)."""

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
            self.add_mixin("lora", LoraMixin(args.num_layers, args.lora_rank, layer_range=layer_range, qlora=qlora),
                           reinit=True)
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
        return super().add_model_specific_args(parser)

    def merge_lora(self):
        """Fold every LoRA update into its base weight (W += scaling * B @ A) and drop the LoRA mixins."""
        if "lora" in self.mixins:
            self.get_mixin("lora").merge_lora()
            self.del_mixin("lora")
        vit = self.get_mixin("eva").vit_model
        if "lora" in vit.mixins:
            vit.get_mixin("lora").merge_lora()
            vit.del_mixin("lora")


class FineTuneTestCogVLMModel(FineTuneTrainCogVLMModel):
    """The finetuned model for inference: same mixins, loaded from a finetuned checkpoint."""
