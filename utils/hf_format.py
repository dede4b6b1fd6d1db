"""CogVLM in Hugging Face layout (`cogvlm-chat-hf`): reading, loading into our model, SAT <-> HF conversion.

An HF-format directory holds `config.json` and the weights as safetensors, either one `model.safetensors`
or shards named by `model.safetensors.index.json`. Both layouts store the same tensors with the same
values and shapes (no transposes, fused QKV rows in the same [q | k | v] order); only the names differ,
plus the rotary `inv_freq` buffer, which SAT keeps once and HF once per decoder layer.

`tensor_specs(sat_config)` is the one description of the mapping: every tensor's SAT key, HF key(s),
full shape (from the config) and how SAT's model parallelism splits it. Everything else reads from it:
key checks, shape checks, model-parallel merging and both conversion directions.

Memory: tensors move one at a time (SAT files are memory-mapped, safetensors files are read per
tensor). Loading holds the model plus one group of `LOAD_GROUP_BYTES`; SAT -> HF holds one output
shard; HF -> SAT holds the output state dict (one copy: `torch.save` writes a whole dict). Never two.
"""
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from models.errors import CheckpointError

logger = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
SAT_CONFIG = "model_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what `transformers` writes by default
LOAD_GROUP_BYTES = 1 << 30  # tensors handed to load_state_dict at once when loading into a model
# Vicuna tokenizer ids (the SAT model_config's bos/eos/pad fields are unused defaults, not these).
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
ROTARY_BASE = 10000  # fixed by the architecture; HF configs of CogVLM do not carry it
TEMPLATE_VERSIONS = ("chat", "base", "vqa")
_LORA_MARKERS = (".matrix_A.", ".matrix_B.", ".original.")


def is_hf_checkpoint(path: str) -> bool:
    """An HF-format directory: `config.json` and no SAT `model_config.json`."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_CONFIG))
            and not os.path.isfile(os.path.join(path, SAT_CONFIG)))


# Configs ---------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"'{hf_dir}' has no {HF_CONFIG}; an HF-format CogVLM directory needs config.json "
                              "next to its safetensors files")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the original download") from None


def sat_config_from_hf(hf_config: dict, source: str = HF_CONFIG) -> dict:
    """The SAT `model_config.json` equivalent of a `cogvlm-chat-hf` style `config.json`."""
    try:
        vision = hf_config["vision_config"]
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
        sat_config = dict(
            model_class="CogVLMModel", num_layers=hf_config["num_hidden_layers"],
            hidden_size=hf_config["hidden_size"], num_attention_heads=hf_config["num_attention_heads"],
            vocab_size=hf_config["vocab_size"], layernorm_order="pre", model_parallel_size=1,
            max_sequence_length=hf_config.get("max_position_embeddings", 4096), use_bias=False,
            inner_hidden_size=hf_config["intermediate_size"], image_length=(image_size // patch_size) ** 2,
            eva_args=dict(
                model_class="EVA2CLIPModel", num_layers=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
                # cogvlm-chat-hf writes `num_heads`; accept the usual transformers name as well
                num_attention_heads=vision.get("num_heads", vision.get("num_attention_heads")), vocab_size=1,
                layernorm_order="post", model_parallel_size=1, max_sequence_length=vision["num_positions"],
                inner_hidden_size=vision["intermediate_size"], use_final_layernorm=False,
                layernorm_epsilon=vision.get("layer_norm_eps", 1e-6), image_size=[image_size, image_size],
                pre_len=1, post_len=0, in_channels=vision.get("in_channels", 3), num_classes=0,
                patch_size=patch_size))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source} is not a CogVLM config: field {e} is missing or malformed "
                              "(expected the cogvlm-chat-hf fields, vision_config nested)") from None
    if sat_config["eva_args"]["num_attention_heads"] is None:
        raise CheckpointError(f"{source}: vision_config has no 'num_heads'")
    if sat_config["eva_args"]["max_sequence_length"] != sat_config["image_length"] + 1:
        raise CheckpointError(f"{source}: vision_config num_positions={vision['num_positions']} but a {image_size}px "
                              f"image with patch {patch_size} needs {sat_config['image_length'] + 1} (patches + CLS)")
    unsupported = {"hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
                   "vision_config.hidden_act": (vision.get("hidden_act", "gelu"), "gelu"),
                   "tie_word_embeddings": (hf_config.get("tie_word_embeddings", False), False)}
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise CheckpointError(f"{source}: {name}={value!r} is not CogVLM's architecture (expects {supported!r})")
    rms_norm_eps = hf_config.get("rms_norm_eps", 1e-5)
    if rms_norm_eps != 1e-5:  # SAT's default; keep model_config.json minimal when it is the default
        sat_config["layernorm_epsilon"] = rms_norm_eps
    return sat_config


def hf_config_from_sat(sat_config: dict, torch_dtype: torch.dtype = torch.float32,
                       template_version: str = "chat") -> dict:
    """The `cogvlm-chat-hf` style `config.json` of a SAT `model_config.json`."""
    eva = sat_config["eva_args"]
    image_size = eva["image_size"][0] if isinstance(eva["image_size"], (list, tuple)) else eva["image_size"]
    return {
        "architectures": ["CogVLMForCausalLM"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": sat_config["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": sat_config["inner_hidden_size"],
        "max_position_embeddings": sat_config.get("max_sequence_length", 4096),
        "model_type": "cogvlm",
        "num_attention_heads": sat_config["num_attention_heads"],
        "num_hidden_layers": sat_config["num_layers"],
        "pad_token_id": PAD_ID,
        "rms_norm_eps": sat_config.get("layernorm_epsilon", 1e-5),
        "template_version": template_version,
        "tie_word_embeddings": False,
        "torch_dtype": str(torch_dtype).replace("torch.", ""),
        "use_cache": True,
        "vision_config": {
            "dropout_prob": 0.0,
            "hidden_act": "gelu",
            "hidden_size": eva["hidden_size"],
            "image_size": image_size,
            "in_channels": eva.get("in_channels", 3),
            "intermediate_size": eva["inner_hidden_size"],
            "layer_norm_eps": eva.get("layernorm_epsilon", 1e-6),
            "num_heads": eva["num_attention_heads"],
            "num_hidden_layers": eva["num_layers"],
            "num_positions": eva["max_sequence_length"],
            "patch_size": eva["patch_size"],
        },
        "vocab_size": sat_config["vocab_size"],
    }


# The tensor table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One SAT tensor and its HF name(s).

    split: the dim SAT's model parallelism splits (0: column-parallel, 1: row-parallel, None: replicated);
    stride: 3 for fused QKV, whose q, k and v blocks are each split across ranks.
    hf_keys has one name, except for the rotary buffer that HF repeats in every decoder layer.
    """
    sat_key: str
    hf_keys: Tuple[str, ...]
    shape: Tuple[int, ...]
    split: Optional[int] = None
    stride: int = 1


_ROTARY_SAT_KEY = "mixins.rotary.rotary_emb.inv_freq"
_VIT = "mixins.eva.vit_model."

# (SAT key, HF key, shape from dims, split, stride); {i} is the layer index, dims `d` come from the config.
_LLM_GLOBAL: List[Tuple[str, str, Callable, Optional[int], int]] = [
    ("transformer.word_embeddings.weight", "model.embed_tokens.weight", lambda d: (d["V"], d["H"]), 0, 1),
    ("transformer.final_layernorm.weight", "model.norm.weight", lambda d: (d["H"],), None, 1),
    ("mixins.lm.lm_head.weight", "lm_head.weight", lambda d: (d["V"], d["H"]), 0, 1),
]
_LLM_LAYER = [
    ("transformer.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight",
     lambda d: (d["H"],), None, 1),
    ("transformer.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
     lambda d: (d["H"],), None, 1),
    ("transformer.layers.{i}.attention.query_key_value.weight",
     "model.layers.{i}.self_attn.language_expert_query_key_value.weight", lambda d: (3 * d["H"], d["H"]), 0, 3),
    ("transformer.layers.{i}.attention.dense.weight", "model.layers.{i}.self_attn.language_expert_dense.weight",
     lambda d: (d["H"], d["H"]), 1, 1),
    ("mixins.rotary.vision_query_key_value_list.{i}.weight",
     "model.layers.{i}.self_attn.vision_expert_query_key_value.weight", lambda d: (3 * d["H"], d["H"]), 0, 3),
    ("mixins.rotary.vision_dense_list.{i}.weight", "model.layers.{i}.self_attn.vision_expert_dense.weight",
     lambda d: (d["H"], d["H"]), 1, 1),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "model.layers.{i}.mlp.language_mlp.up_proj.weight",
     lambda d: (d["F"], d["H"]), 0, 1),
    ("mixins.mlp.gate_proj.{i}.weight", "model.layers.{i}.mlp.language_mlp.gate_proj.weight",
     lambda d: (d["F"], d["H"]), 0, 1),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "model.layers.{i}.mlp.language_mlp.down_proj.weight",
     lambda d: (d["H"], d["F"]), 1, 1),
    ("mixins.mlp.vision_dense_h_to_4h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.up_proj.weight",
     lambda d: (d["F"], d["H"]), 0, 1),
    ("mixins.mlp.vision_gate_proj.{i}.weight", "model.layers.{i}.mlp.vision_mlp.gate_proj.weight",
     lambda d: (d["F"], d["H"]), 0, 1),
    ("mixins.mlp.vision_dense_4h_to_h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.down_proj.weight",
     lambda d: (d["H"], d["F"]), 1, 1),
]
_VISION_GLOBAL = [
    (_VIT + "mixins.patch_embedding.proj.weight", "model.vision.patch_embedding.proj.weight",
     lambda d: (d["E"], d["C"], d["K"], d["K"]), None, 1),
    (_VIT + "mixins.patch_embedding.proj.bias", "model.vision.patch_embedding.proj.bias", lambda d: (d["E"],), None, 1),
    # SAT holds the CLS vector as a vocabulary of one word (a plain nn.Embedding: replicated)
    (_VIT + "transformer.word_embeddings.weight", "model.vision.patch_embedding.cls_embedding",
     lambda d: (1, d["E"]), None, 1),
    (_VIT + "transformer.position_embeddings.weight", "model.vision.patch_embedding.position_embedding.weight",
     lambda d: (d["P"], d["E"]), None, 1),
    ("mixins.eva.linear_proj.linear_proj.weight", "model.vision.linear_proj.linear_proj.weight",
     lambda d: (d["H"], d["E"]), None, 1),
    ("mixins.eva.linear_proj.norm1.weight", "model.vision.linear_proj.norm1.weight", lambda d: (d["H"],), None, 1),
    ("mixins.eva.linear_proj.norm1.bias", "model.vision.linear_proj.norm1.bias", lambda d: (d["H"],), None, 1),
    ("mixins.eva.linear_proj.gate_proj.weight", "model.vision.linear_proj.gate_proj.weight",
     lambda d: (d["F"], d["H"]), None, 1),
    ("mixins.eva.linear_proj.dense_h_to_4h.weight", "model.vision.linear_proj.dense_h_to_4h.weight",
     lambda d: (d["F"], d["H"]), None, 1),
    ("mixins.eva.linear_proj.dense_4h_to_h.weight", "model.vision.linear_proj.dense_4h_to_h.weight",
     lambda d: (d["H"], d["F"]), None, 1),
    ("mixins.eva.boi", "model.vision.boi", lambda d: (1, 1, d["H"]), None, 1),
    ("mixins.eva.eoi", "model.vision.eoi", lambda d: (1, 1, d["H"]), None, 1),
]
_VISION_LAYER = [
    (_VIT + "transformer.layers.{i}.input_layernorm.{p}", "model.vision.transformer.layers.{i}.input_layernorm.{p}",
     lambda d: (d["E"],), None, 1),
    (_VIT + "transformer.layers.{i}.post_attention_layernorm.{p}",
     "model.vision.transformer.layers.{i}.post_attention_layernorm.{p}", lambda d: (d["E"],), None, 1),
    (_VIT + "transformer.layers.{i}.attention.query_key_value.weight",
     "model.vision.transformer.layers.{i}.attention.query_key_value.weight", lambda d: (3 * d["E"], d["E"]), 0, 3),
    (_VIT + "transformer.layers.{i}.attention.query_key_value.bias",
     "model.vision.transformer.layers.{i}.attention.query_key_value.bias", lambda d: (3 * d["E"],), 0, 3),
    (_VIT + "transformer.layers.{i}.attention.dense.weight", "model.vision.transformer.layers.{i}.attention.dense.weight",
     lambda d: (d["E"], d["E"]), 1, 1),
    (_VIT + "transformer.layers.{i}.attention.dense.bias", "model.vision.transformer.layers.{i}.attention.dense.bias",
     lambda d: (d["E"],), None, 1),
    (_VIT + "transformer.layers.{i}.mlp.dense_h_to_4h.weight", "model.vision.transformer.layers.{i}.mlp.fc1.weight",
     lambda d: (d["EF"], d["E"]), 0, 1),
    (_VIT + "transformer.layers.{i}.mlp.dense_h_to_4h.bias", "model.vision.transformer.layers.{i}.mlp.fc1.bias",
     lambda d: (d["EF"],), 0, 1),
    (_VIT + "transformer.layers.{i}.mlp.dense_4h_to_h.weight", "model.vision.transformer.layers.{i}.mlp.fc2.weight",
     lambda d: (d["E"], d["EF"]), 1, 1),
    (_VIT + "transformer.layers.{i}.mlp.dense_4h_to_h.bias", "model.vision.transformer.layers.{i}.mlp.fc2.bias",
     lambda d: (d["E"],), None, 1),
]


def _dims(sat_config: dict) -> Dict[str, int]:
    eva = sat_config["eva_args"]
    return dict(H=sat_config["hidden_size"], F=sat_config["inner_hidden_size"], V=sat_config["vocab_size"],
                heads=sat_config["num_attention_heads"], E=eva["hidden_size"], EF=eva["inner_hidden_size"],
                P=eva["max_sequence_length"], C=eva.get("in_channels", 3), K=eva["patch_size"])


def tensor_specs(sat_config: dict) -> List[TensorSpec]:
    """Every tensor of the CogVLM described by `sat_config`, in a fixed order (LLM, then vision)."""
    d = _dims(sat_config)
    specs = [TensorSpec(sat, (hf,), shape(d), split, stride) for sat, hf, shape, split, stride in _LLM_GLOBAL]
    layers = range(sat_config["num_layers"])
    specs.append(TensorSpec(_ROTARY_SAT_KEY, tuple(f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in layers),
                            (d["H"] // d["heads"] // 2,)))
    for i in layers:
        specs += [TensorSpec(sat.format(i=i), (hf.format(i=i),), shape(d), split, stride)
                  for sat, hf, shape, split, stride in _LLM_LAYER]
    specs += [TensorSpec(sat, (hf,), shape(d), split, stride) for sat, hf, shape, split, stride in _VISION_GLOBAL]
    for i in range(sat_config["eva_args"]["num_layers"]):
        for sat, hf, shape, split, stride in _VISION_LAYER:
            for p in (("weight", "bias") if "{p}" in sat else ("",)):
                specs.append(TensorSpec(sat.format(i=i, p=p), (hf.format(i=i, p=p),), shape(d), split, stride))
    return specs


def _summarise(keys, limit=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_shape(key: str, shape, expected, source: str) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{source}: tensor {key} has shape {tuple(shape)} but the config asks for "
                              f"{tuple(expected)}; the weights and config.json/model_config.json do not belong together")


# Reading HF directories ------------------------------------------------------------------------

class HFCheckpoint:
    """An HF-format directory opened for reading one tensor at a time.

    Checks up front that config.json parses, that every shard the index names exists and holds the
    tensors the index says it holds. `shape()` reads only file headers.
    """

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.dir = hf_dir
        self.config = read_hf_config(hf_dir)
        index_path, single_path = os.path.join(hf_dir, HF_INDEX), os.path.join(hf_dir, HF_WEIGHTS)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index_path} is not a safetensors index (needs a 'weight_map'; {e})") from None
        elif os.path.isfile(single_path):
            self.weight_map = None
        else:
            found = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".safetensors")))
            hint = (f" (found {', '.join(found[:3])}: only safetensors weights are supported; re-save them with "
                    "safetensors)" if found else "")
            raise CheckpointError(f"'{hf_dir}' has neither {HF_WEIGHTS} nor {HF_INDEX}{hint}")
        files = [HF_WEIGHTS] if self.weight_map is None else sorted(set(self.weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing:
            raise CheckpointError(f"'{hf_dir}' is missing shard(s) {', '.join(missing)} named in {HF_INDEX}; "
                                  "the download is incomplete, fetch the missing files")
        self._files = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                self._files[name] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file is "
                                      "corrupt or incomplete, download it again") from None
        if self.weight_map is None:
            self.weight_map = {key: HF_WEIGHTS for key in self._files[HF_WEIGHTS].keys()}
        else:
            for name, handle in self._files.items():
                claimed = {k for k, f in self.weight_map.items() if f == name}
                absent = claimed - set(handle.keys())
                if absent:
                    raise CheckpointError(f"{HF_INDEX} in '{hf_dir}' places {_summarise(absent)} in {name}, which "
                                          "does not hold them; the index and the shards do not belong together")

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._files[self.weight_map[key]].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._files[self.weight_map[key]].get_tensor(key)

    def sat_config(self) -> dict:
        return sat_config_from_hf(self.config, source=os.path.join(self.dir, HF_CONFIG))


def check_hf_tensors(ckpt: HFCheckpoint, specs: List[TensorSpec]) -> None:
    """Every HF tensor is known and has its shape; every tensor but the rotary buffer is present."""
    expected = {hf: spec for spec in specs for hf in spec.hf_keys}
    present = set(ckpt.keys())
    unknown = present - set(expected)
    missing = {k for k in set(expected) - present if expected[k].sat_key != _ROTARY_SAT_KEY}
    if unknown or missing:
        parts = ([f"unknown tensors: {_summarise(unknown)}"] if unknown else []) + \
                ([f"missing tensors: {_summarise(missing)}"] if missing else [])
        hint = ("it holds LoRA weights: merge them into the base weights before converting"
                if any(m in k for k in unknown for m in ("lora", ) + _LORA_MARKERS)
                else "is it a CogVLM checkpoint (cogvlm-chat-hf layout) matching its config.json?")
        raise CheckpointError(f"HF checkpoint '{ckpt.dir}' does not match CogVLM ({'; '.join(parts)}); {hint}")
    for key in present:
        _check_shape(key, ckpt.shape(key), expected[key].shape, source=f"HF checkpoint '{ckpt.dir}'")


def rotary_inv_freq(sat_config: dict) -> torch.Tensor:
    """The rotary frequency table, for checkpoints that leave it out (it is fixed by the head size)."""
    from models.mixin import RotaryEmbedding

    return RotaryEmbedding(sat_config["hidden_size"] // sat_config["num_attention_heads"], base=ROTARY_BASE).inv_freq


class HFStateReader:
    """An HF-format directory read as a SAT state dict, one tensor at a time.

    All keys and shapes are checked on opening. The rotary buffer comes from the first layer that
    stores it (all must agree) or is recomputed. It offers the reading interface of
    models.model_parallel.ShardedCheckpoint (`has`, `tensor(key, split, rank, world_size)`,
    `unconsumed`), so a torchrun process can load its model-parallel share from an HF directory.
    """
    mp_size = 1
    has_lora = False

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.hf = HFCheckpoint(hf_dir)
        self.config = self.hf.sat_config()
        self.specs = tensor_specs(self.config)
        check_hf_tensors(self.hf, self.specs)
        self._hf_key = {}  # SAT key -> HF key (None: recomputed rotary buffer)
        for spec in self.specs:
            stored = [k for k in spec.hf_keys if k in self.hf.weight_map]
            self._hf_key[spec.sat_key] = stored[0] if stored else None  # only the rotary buffer may be absent
            for other in stored[1:]:
                if not torch.equal(self.hf.tensor(other), self.hf.tensor(stored[0])):
                    raise CheckpointError(f"HF checkpoint '{hf_dir}': {other} differs from {stored[0]}; CogVLM "
                                          "uses one rotary frequency table for all layers")
        self.consumed = set()

    @property
    def keys(self) -> List[str]:
        return list(self._hf_key)

    def has(self, key: str) -> bool:
        return key in self._hf_key

    def sat_tensor(self, key: str) -> torch.Tensor:
        """The full tensor of SAT key `key`."""
        self.consumed.add(key)
        hf_key = self._hf_key[key]
        return rotary_inv_freq(self.config) if hf_key is None else self.hf.tensor(hf_key)

    def tensor(self, key: str, split, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s part of `key` split `world_size` ways (`split`: a models.model_parallel.Split)."""
        from models.model_parallel import split_tensor

        return split_tensor(self.sat_tensor(key), split, rank, world_size, key)

    def open_for(self, rank: int, world_size: int) -> None:
        pass  # the safetensors files are already open (memory-mapped)

    def unconsumed(self) -> List[str]:
        return [k for k in self._hf_key if k not in self.consumed]

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(SAT key, full tensor) for every tensor, in `tensor_specs` order."""
        for key in self._hf_key:
            yield key, self.sat_tensor(key)


def load_hf_weights(model: torch.nn.Module, hf_dir: str, allow_missing_prefixes=()) -> None:
    """Load the HF-format checkpoint in `hf_dir` into a SAT-layout CogVLM `model`.

    Tensors go through `model.load_state_dict` in groups of at most LOAD_GROUP_BYTES, so SAT's
    own key handling (e.g. LoRA-wrapped linears) applies and memory holds the model plus one group.
    A model key that no group loads is missing (allow_missing_prefixes as in checkpoint_io.load_weights).
    """
    reader = HFStateReader(hf_dir)
    missing: Optional[set] = None
    unexpected: List[str] = []

    def load_group(group):
        nonlocal missing
        result = model.load_state_dict(group, strict=False)
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        unexpected.extend(result.unexpected_keys)

    group, group_bytes = {}, 0
    for key, tensor in reader.items():
        group[key] = tensor
        group_bytes += tensor.numel() * tensor.element_size()
        if group_bytes >= LOAD_GROUP_BYTES:
            load_group(group)
            group, group_bytes = {}, 0
    if group:
        load_group(group)
    missing = [k for k in (missing or ()) if not any(p in k for p in allow_missing_prefixes)]
    if missing or unexpected:
        parts = ([f"missing keys: {_summarise(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_summarise(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"HF checkpoint '{hf_dir}' does not match the model ({'; '.join(parts)}); "
                              "check the model flags against its config.json")
    logger.info("loaded %d tensors from HF checkpoint %s", len(reader.keys), hf_dir)


# Reading SAT checkpoints (model-parallel shards merged) ----------------------------------------

def check_sat_state_keys(keys, source: str) -> None:
    """Refuse finetuning state HF cannot express (unmerged LoRA, P-tuning prefixes)."""
    lora = [k for k in keys if any(m in k for m in _LORA_MARKERS)]
    if lora:
        raise CheckpointError(f"{source} holds unmerged LoRA weights ({_summarise(lora, 2)}); merge them into the base "
                              "weights first (merge_model.py, or FineTuneTrainCogVLMModel.merge_lora() then save) "
                              "and convert the merged checkpoint")
    ptuning = [k for k in keys if k.startswith("mixins.ptuning.")]
    if ptuning:
        raise CheckpointError(f"{source} holds P-tuning prefixes ({_summarise(ptuning, 2)}), which the HF layout "
                              "cannot hold; finetune with LoRA (and merge it) to export to HF")


def read_sat_checkpoint(sat_dir: str) -> Tuple[dict, Iterator[Tuple[str, torch.Tensor]]]:
    """Open a SAT checkpoint directory: (model config, iterator of (SAT key, full tensor)).

    The model-parallel shard files are memory-mapped and merged tensor by tensor (models.model_parallel
    owns SAT's split rules; the table here says which tensors are split). All keys and shapes are
    checked before the first tensor is yielded.
    """
    from models.model_parallel import ShardedCheckpoint, Split, merge_tensors

    reader = ShardedCheckpoint(sat_dir)
    config = reader.config
    if "CogVLM" not in config.get("model_class", "CogVLMModel"):
        raise CheckpointError(f"{sat_dir} holds a {config['model_class']}, not a CogVLM checkpoint")
    keys = set(reader.keys)
    check_sat_state_keys(keys, source=f"checkpoint {sat_dir}")
    specs = tensor_specs(config)
    expected = {spec.sat_key for spec in specs}
    unknown, missing = keys - expected, expected - keys
    if unknown or missing:
        parts = ([f"unknown tensors: {_summarise(unknown)}"] if unknown else []) + \
                ([f"missing tensors: {_summarise(missing)}"] if missing else [])
        raise CheckpointError(f"checkpoint {sat_dir} does not match its model_config.json ({'; '.join(parts)})")
    ranks = range(reader.mp_size)
    reader.open_for(0, 1)  # every shard file, each checked to hold the same keys

    def is_split(spec, first_piece):
        # a whole tensor on every rank is replicated; SAT also keeps vocabularies under 1000 words
        # (e.g. the ViT's one-word CLS) in a plain nn.Embedding, which it does not split
        return reader.mp_size > 1 and spec.split is not None and tuple(first_piece.shape) != spec.shape

    for spec in specs:  # merged shapes follow from the pieces' shapes: nothing is read yet
        piece = reader.stored(spec.sat_key, 0)
        shape = list(piece.shape)
        if is_split(spec, piece):
            shape[spec.split] *= reader.mp_size
        _check_shape(spec.sat_key, shape, spec.shape, source=f"checkpoint {sat_dir}")

    def tensors():
        for spec in specs:
            pieces = [reader.stored(spec.sat_key, rank) for rank in ranks]
            if is_split(spec, pieces[0]):
                yield spec.sat_key, merge_tensors(pieces, Split(spec.split, (1,) * spec.stride), spec.sat_key)
            else:
                yield spec.sat_key, pieces[0]

    return config, tensors()


# Writing ---------------------------------------------------------------------------------------

def parse_size(text) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise CheckpointError(f"cannot read the size '{text}'; write it like 5GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def _check_output_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"output directory '{out_dir}' is not empty; pass a new or empty directory")


def _prepare_output_dir(out_dir: str) -> None:
    _check_output_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def write_hf_config(out_dir: str, hf_config: dict) -> None:
    with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_hf_weights(out_dir: str, tensors: Iterator[Tuple[str, torch.Tensor]],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write the (HF key, tensor) stream as safetensors shards into a new directory; returns the file names.

    One shard is held in memory at a time. A single shard is named model.safetensors; several are
    named model-0000k-of-0000n.safetensors and listed in model.safetensors.index.json.
    """
    from safetensors.torch import save_file

    _prepare_output_dir(out_dir)
    shard, shard_bytes, written, weight_map, total_bytes = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(written):05d}.tmp"  # final names need the shard count, known only at the end
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        written.append(name)
        shard, shard_bytes = {}, 0

    for key, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        # a copy of our own: safetensors refuses tensors that share memory (the per-layer rotary copies,
        # views into one storage) or are not contiguous; it also bounds what is resident to one shard
        shard[key] = tensor.detach().clone(memory_format=torch.contiguous_format)
        shard_bytes += size
        total_bytes += size
    if shard or not written:
        flush()
    if len(written) == 1:
        final = {written[0]: HF_WEIGHTS}
    else:
        final = {name: f"model-{k + 1:05d}-of-{len(written):05d}.safetensors" for k, name in enumerate(written)}
    umask = os.umask(0)
    os.umask(umask)
    for tmp, name in final.items():
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
        os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)  # safetensors creates its files owner-only
    if len(written) > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {key: final[name] for key, name in sorted(weight_map.items())}}
        with open(os.path.join(out_dir, HF_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return list(final.values())


def write_sat_checkpoint(out_dir: str, sat_config: dict, state_dict: Dict[str, torch.Tensor]) -> str:
    """Write a SAT checkpoint directory (model_config.json, latest, 1/mp_rank_00_model_states.pt)."""
    _prepare_output_dir(out_dir)
    with open(os.path.join(out_dir, SAT_CONFIG), "w") as f:
        json.dump(sat_config, f, indent=4)
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write("1")
    os.makedirs(os.path.join(out_dir, "1"))
    path = os.path.join(out_dir, "1", "mp_rank_00_model_states.pt")
    torch.save({"module": state_dict}, path)
    return path


# Conversion ------------------------------------------------------------------------------------

def convert_sat_to_hf(sat_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      template_version: str = "chat") -> List[str]:
    """SAT checkpoint (any model-parallel size, LoRA merged) -> HF-format directory. Returns the weight files."""
    if template_version not in TEMPLATE_VERSIONS:
        raise CheckpointError(f"unknown template version '{template_version}'; choose one of "
                              f"{', '.join(TEMPLATE_VERSIONS)}")
    _check_output_dir(out_dir)
    sat_config, tensors = read_sat_checkpoint(sat_dir)
    specs = {spec.sat_key: spec for spec in tensor_specs(sat_config)}
    dtypes = set()

    def hf_tensors():
        for key, tensor in tqdm(tensors, total=len(specs), desc="SAT -> HF", unit="tensor"):
            if key != _ROTARY_SAT_KEY:  # the fixed fp32 rotary buffer does not say what the weights are
                dtypes.add(tensor.dtype)
            for hf_key in specs[key].hf_keys:
                yield hf_key, tensor

    files = write_hf_weights(out_dir, hf_tensors(), max_shard_bytes)
    # config.json names the weights' dtype, known once they have been read
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    write_hf_config(out_dir, hf_config_from_sat(sat_config, dtype, template_version))
    logger.info("wrote %s (%d weight file(s)) from %s", out_dir, len(files), sat_dir)
    return files


def convert_hf_to_sat(hf_dir: str, out_dir: str) -> str:
    """HF-format directory -> SAT checkpoint (model-parallel size 1). Returns the written .pt file."""
    _check_output_dir(out_dir)
    reader = HFStateReader(hf_dir)
    state_dict = dict(tqdm(reader.items(), total=len(reader.keys), desc="HF -> SAT", unit="tensor"))
    path = write_sat_checkpoint(out_dir, reader.config, state_dict)
    logger.info("wrote %s from %s", path, hf_dir)
    return path
