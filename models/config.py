"""The typed configuration of a CogVLM: `CogVLMConfig` (the LLM) holding a `VisionConfig` (the ViT).

One place reads and writes both on-disk forms: SAT's `model_config.json` (`from_sat_dict` /
`to_sat_dict`) and the `cogvlm-chat-hf` `config.json` (`from_hf_dict` / `to_hf_dict`). Every field is
validated once, when a config is made, with a message naming the field and the file. Fields SAT keeps that
CogVLM does not interpret (e.g. `bos_token_id`, dropout rates) ride along in `extra` and are written back
unchanged. `sat_args` is the one place that turns a config into the `argparse.Namespace` SAT builds from.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from models.errors import ConfigError
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_KEY, TEMPLATE_NAMES
# Vicuna tokenizer ids (SAT's model_config.json bos/eos/pad fields are unused defaults, not these).
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
ROTARY_BASE = 10000  # fixed by the architecture; HF configs of CogVLM do not carry it

# SAT fields fixed by the architecture: written as given, refused when a file says otherwise.
_LLM_FIXED = {"layernorm_order": "pre", "use_bias": False}
_VIT_FIXED = {"model_class": "EVA2CLIPModel", "vocab_size": 1, "layernorm_order": "post",
              "use_final_layernorm": False, "pre_len": 1, "post_len": 0}
_FINETUNE_FIELDS = ("use_lora", "lora_rank", "layer_range", "use_ptuning", "pre_seq_len", "use_qlora")


_REQUIRED = object()


def _integer(data: Mapping, name: str, source: str, where: str = "", default=_REQUIRED, minimum: int = 1) -> int:
    value = data.get(name, None if default is _REQUIRED else default)
    if value is None:
        raise ConfigError(f"{source} is not a CogVLM config: field '{where}{name}' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: field '{where}{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def _number(data: Mapping, name: str, default: float, source: str, where: str = "") -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{source}: field '{where}{name}' must be a number between 0 and 1, got {value!r}")
    return float(value)


def _check_fixed(data: Mapping, fixed: Mapping, source: str, where: str = "") -> None:
    for name, expected in fixed.items():
        if name in data and data[name] != expected:
            raise ConfigError(f"{source}: field '{where}{name}' is {data[name]!r}, but CogVLM's architecture has "
                              f"{expected!r}")


def _mapping(data, source: str, what: str) -> Mapping:
    if data is None:
        raise ConfigError(f"{source} is not a CogVLM config: {what} is missing")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {what} must be a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP ViT: square images of `image_size` px cut into `patch_size` px patches."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int
    image_size: int
    patch_size: int = 14
    in_channels: int = 3
    layernorm_epsilon: float = 1e-6
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by its "
                              f"{self.num_attention_heads} attention heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Position embeddings: one per patch plus the CLS token."""
        return self.num_patches + 1

    @classmethod
    def from_sat_dict(cls, eva: Mapping, source: str) -> "VisionConfig":
        eva = _mapping(eva, source, "field 'eva_args'")
        where = "eva_args."
        _check_fixed(eva, _VIT_FIXED, source, where)
        size = eva.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ConfigError(f"{source}: field 'eva_args.image_size' must be one size or [S, S] (CogVLM takes "
                                  f"square images), got {size!r}")
            size = size[0]
        known = {"num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "image_size",
                 "patch_size", "in_channels", "layernorm_epsilon", "max_sequence_length", "model_parallel_size",
                 *_VIT_FIXED}
        config = cls(num_layers=_integer(eva, "num_layers", source, where),
                     hidden_size=_integer(eva, "hidden_size", source, where),
                     num_attention_heads=_integer(eva, "num_attention_heads", source, where),
                     inner_hidden_size=_integer(eva, "inner_hidden_size", source, where),
                     image_size=_integer({"image_size": size}, "image_size", source, where),
                     patch_size=_integer(eva, "patch_size", source, where, default=14),
                     in_channels=_integer(eva, "in_channels", source, where, default=3),
                     layernorm_epsilon=_number(eva, "layernorm_epsilon", 1e-6, source, where),
                     extra={k: v for k, v in eva.items() if k not in known})
        stated = eva.get("max_sequence_length", config.num_positions)
        if stated != config.num_positions:
            raise ConfigError(f"{source}: field 'eva_args.max_sequence_length' is {stated!r}, but a {size}px image "
                              f"with patch {config.patch_size} needs {config.num_positions} (patches + CLS)")
        return config

    def to_sat_dict(self, model_parallel_size: int = 1) -> Dict[str, Any]:
        return {"model_class": "EVA2CLIPModel", "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads, "vocab_size": 1, "layernorm_order": "post",
                "model_parallel_size": model_parallel_size, "max_sequence_length": self.num_positions,
                "inner_hidden_size": self.inner_hidden_size, "use_final_layernorm": False,
                "layernorm_epsilon": self.layernorm_epsilon, "image_size": [self.image_size, self.image_size],
                "pre_len": 1, "post_len": 0, "in_channels": self.in_channels, "patch_size": self.patch_size,
                **self.extra}


@dataclass(frozen=True)
class CogVLMConfig:
    """The LLM with its visual expert, the ViT, and what the checkpoint says about its use.

    max_sequence_length: the positions the model was built for (SAT's name; `max_position_embeddings` in HF
        config.json, `context_length` in GGUF). Lengths elsewhere have their own names: a request's or a
        training sample's total tokens, prompt (image included) plus answer, are `max_length` (`--max_length`,
        GenerationConfig; upstream's text processor calls it `max_target_length`), at most these positions;
        the tokens of a prompt before the answer are `prompt_length`.
    model_class: the SAT class name the checkpoint was saved from (see models.cogvlm_model.MODEL_CLASSES).
    template: the prompt template the checkpoint answers best with (None: the caller's default); the files
        spell it `template_version` (models.templates).
    grounding: the checkpoint answers with [[x0,y0,x1,y1]] boxes (front ends then draw them).
    finetune: SAT finetuning flags (use_lora, lora_rank, ...) of a finetuned checkpoint.
    """
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    inner_hidden_size: int
    vision: VisionConfig
    max_sequence_length: int = 4096
    layernorm_epsilon: float = 1e-5
    model_parallel_size: int = 1
    model_class: str = "CogVLMModel"
    template: Optional[str] = None
    grounding: bool = False
    finetune: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} "
                              "attention heads")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ConfigError(f"{TEMPLATE_KEY} {self.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")

    @property
    def image_length(self) -> int:
        """Image patches the LLM sees (the image block is image_length + 2 positions: boi, eoi)."""
        return self.vision.num_patches

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_lora(self) -> bool:
        return bool(self.finetune.get("use_lora") or self.finetune.get("use_qlora"))

    def replace(self, **changes) -> "CogVLMConfig":
        return dataclasses.replace(self, **changes)

    def without_lora(self) -> "CogVLMConfig":
        """The config of the same weights with any LoRA folded into them."""
        return self.replace(finetune={**self.finetune, "use_lora": False, "use_qlora": False})

    # SAT model_config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_sat_dict(cls, data, source: str = "model_config.json") -> "CogVLMConfig":
        data = _mapping(data, source, "the config")
        _check_fixed(data, _LLM_FIXED, source)
        model_class = data.get("model_class", "CogVLMModel")
        if not isinstance(model_class, str) or "CogVLM" not in model_class:
            raise ConfigError(f"{source} describes a {model_class!r}, not a CogVLM checkpoint")
        vision = VisionConfig.from_sat_dict(data.get("eva_args"), source)
        stated = data.get("image_length", vision.num_patches)
        if stated != vision.num_patches:
            raise ConfigError(f"{source}: field 'image_length' is {stated!r}, but a {vision.image_size}px image with "
                              f"patch {vision.patch_size} has {vision.num_patches} patches")
        known = {"num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size", "eva_args",
                 "image_length", "max_sequence_length", "layernorm_epsilon", "model_parallel_size", "model_class",
                 TEMPLATE_KEY, "grounding", *_FINETUNE_FIELDS, *_LLM_FIXED}
        grounding = data.get("grounding", False)
        if not isinstance(grounding, bool):
            raise ConfigError(f"{source}: field 'grounding' must be true or false, got {grounding!r}")
        return cls(num_layers=_integer(data, "num_layers", source), hidden_size=_integer(data, "hidden_size", source),
                   num_attention_heads=_integer(data, "num_attention_heads", source),
                   vocab_size=_integer(data, "vocab_size", source),
                   inner_hidden_size=_integer(data, "inner_hidden_size", source), vision=vision,
                   max_sequence_length=_integer(data, "max_sequence_length", source, default=4096),
                   layernorm_epsilon=_number(data, "layernorm_epsilon", 1e-5, source),
                   model_parallel_size=_integer(data, "model_parallel_size", source, default=1),
                   model_class=model_class, template=data.get(TEMPLATE_KEY), grounding=grounding,
                   finetune={k: data[k] for k in _FINETUNE_FIELDS if k in data},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_sat_dict(self) -> Dict[str, Any]:
        data = {"model_class": self.model_class, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads, "vocab_size": self.vocab_size,
                "layernorm_order": "pre", "model_parallel_size": self.model_parallel_size,
                "max_sequence_length": self.max_sequence_length, "use_bias": False,
                "inner_hidden_size": self.inner_hidden_size, **self.finetune, "image_length": self.image_length,
                "eva_args": self.vision.to_sat_dict()}
        if self.layernorm_epsilon != 1e-5:  # SAT's default; keep model_config.json minimal when it is the default
            data["layernorm_epsilon"] = self.layernorm_epsilon
        if self.template is not None:
            data[TEMPLATE_KEY] = self.template
        if self.grounding:
            data["grounding"] = True
        return {**data, **self.extra}

    # HF config.json (cogvlm-chat-hf) ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data, source: str = "config.json") -> "CogVLMConfig":
        data = _mapping(data, source, "the config")
        vision = _mapping(data.get("vision_config"), source, "field 'vision_config'")
        unsupported = {"hidden_act": (data.get("hidden_act", "silu"), "silu"),
                       "vision_config.hidden_act": (vision.get("hidden_act", "gelu"), "gelu"),
                       "tie_word_embeddings": (data.get("tie_word_embeddings", False), False)}
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(f"{source}: {name}={value!r} is not CogVLM's architecture (expects {supported!r})")
        where = "vision_config."
        # cogvlm-chat-hf writes `num_heads`; accept the usual transformers name as well
        heads = {"num_heads": vision.get("num_heads", vision.get("num_attention_heads"))}
        vision_config = VisionConfig(
            num_layers=_integer(vision, "num_hidden_layers", source, where),
            hidden_size=_integer(vision, "hidden_size", source, where),
            num_attention_heads=_integer(heads, "num_heads", source, where),
            inner_hidden_size=_integer(vision, "intermediate_size", source, where),
            image_size=_integer(vision, "image_size", source, where),
            patch_size=_integer(vision, "patch_size", source, where),
            in_channels=_integer(vision, "in_channels", source, where, default=3),
            layernorm_epsilon=_number(vision, "layer_norm_eps", 1e-6, source, where),
            extra={"num_classes": 0})  # what SAT's own CogVLM configs say (no classification head)
        positions = vision.get("num_positions", vision_config.num_positions)
        if positions != vision_config.num_positions:
            raise ConfigError(f"{source}: vision_config num_positions={positions!r} but a {vision_config.image_size}px "
                              f"image with patch {vision_config.patch_size} needs {vision_config.num_positions} "
                              "(patches + CLS)")
        return cls(num_layers=_integer(data, "num_hidden_layers", source),
                   hidden_size=_integer(data, "hidden_size", source),
                   num_attention_heads=_integer(data, "num_attention_heads", source),
                   vocab_size=_integer(data, "vocab_size", source),
                   inner_hidden_size=_integer(data, "intermediate_size", source), vision=vision_config,
                   max_sequence_length=_integer(data, "max_position_embeddings", source, default=4096),
                   layernorm_epsilon=_number(data, "rms_norm_eps", 1e-5, source),
                   # cogvlm-chat-hf configs always name a template; the default one says nothing the front ends
                   # would not do anyway, and reading it as None keeps SAT -> HF -> SAT the identity
                   template=None if data.get(TEMPLATE_KEY) == DEFAULT_TEMPLATE else data.get(TEMPLATE_KEY),
                   grounding=bool(data.get("grounding", False)))

    def to_hf_dict(self, torch_dtype: torch.dtype = torch.float32, template: Optional[str] = None) -> dict:
        """The `cogvlm-chat-hf` style config.json (template: the given one, else this config's, else the
        default)."""
        vision = self.vision
        return {
            "architectures": ["CogVLMForCausalLM"], "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "hidden_act": "silu", "hidden_size": self.hidden_size, "initializer_range": 0.02,
            "intermediate_size": self.inner_hidden_size, "max_position_embeddings": self.max_sequence_length,
            "model_type": "cogvlm", "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers, "pad_token_id": PAD_ID, "rms_norm_eps": self.layernorm_epsilon,
            TEMPLATE_KEY: template or self.template or DEFAULT_TEMPLATE,
            "tie_word_embeddings": False,
            "torch_dtype": str(torch_dtype).replace("torch.", ""), "use_cache": True,
            "vision_config": {
                "dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": vision.hidden_size,
                "image_size": vision.image_size, "in_channels": vision.in_channels,
                "intermediate_size": vision.inner_hidden_size, "layer_norm_eps": vision.layernorm_epsilon,
                "num_heads": vision.num_attention_heads, "num_hidden_layers": vision.num_layers,
                "num_positions": vision.num_positions, "patch_size": vision.patch_size},
            "vocab_size": self.vocab_size,
        }

    # SAT's Namespace ------------------------------------------------------------------------------------------
    def sat_args(self, runtime: argparse.Namespace) -> argparse.Namespace:
        """SAT's args for building this model: `runtime` (device, dtype, mode, distribution; see `runtime_args`,
        or a finetuning run's full SAT args) with this config's fields on top."""
        fields = self.to_sat_dict()
        return argparse.Namespace(**{**vars(runtime), **fields})


def runtime_args(device: str = "cpu", dtype: torch.dtype = torch.float32, mode: str = "inference", rank: int = 0,
                 world_size: int = 1, skip_init: bool = True) -> argparse.Namespace:
    """What SAT needs besides the config to build a model: placement, precision, mode and distribution
    (model parallel over all `world_size` processes)."""
    return argparse.Namespace(deepspeed=None, local_rank=rank, rank=rank, world_size=world_size,
                              model_parallel_size=world_size, mode=mode, skip_init=skip_init,
                              use_gpu_initialization=str(device).startswith("cuda"), device=str(device),
                              fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    """The parameter dtype SAT args ask for (fp16 / bf16 flags; fp32 otherwise)."""
    return torch.float16 if getattr(args, "fp16", False) else torch.bfloat16 if getattr(args, "bf16", False) \
        else torch.float32
