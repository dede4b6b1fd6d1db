"""Every tensor of a CogVLM: its SAT key, its HF key(s), its full shape, and how SAT splits it.

`tensor_table(config)` is the one source of these facts. Loading (any rank of any split), merging and
splitting model-parallel shards, the HF mapping and every shape check read from it.

SAT's mpu layers divide a tensor across model-parallel ranks like this, and nothing else is divided:
  ColumnParallelLinear   weight and bias on dim 0 (output rows); a fused q|k|v (stride 3) is split block by
                         block, so rank r holds [q_r; k_r; v_r]
  RowParallelLinear      weight on dim 1 (input columns); its bias is replicated
  VocabParallelEmbedding weight on dim 0 (vocabulary rows); SAT uses it only for vocabularies of 1000 words
                         or more (smaller ones, such as the ViT's one-word CLS, are a plain nn.Embedding)
Norms, the ViT's position embeddings and conv, the GLU adapter, boi / eoi and the rotary buffer are
replicated. LoRA matrices are folded into their weight before anything is split (SAT's LoRA layers are not
correct under model parallelism), so they need no rule; P-tuning prefixes are replicated.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from models.config import CogVLMConfig
from models.errors import CheckpointError, CogVLMError

ROTARY_KEY = "mixins.rotary.rotary_emb.inv_freq"
PTUNING_PREFIX = "mixins.ptuning."
# SAT's lora2 stores a wrapped linear X as X.original.weight, X.matrix_A.k and X.matrix_B.k
LORA_ORIGINAL, LORA_A, LORA_B = ".original.", ".matrix_A.", ".matrix_B."
LORA_MARKERS = (LORA_A, LORA_B, LORA_ORIGINAL)
# SAT builds the word embeddings as a VocabParallelEmbedding from this vocabulary size on (BaseTransformer)
SAT_MIN_PARALLEL_VOCAB = 1000


def is_lora_matrix(key: str) -> bool:
    """Whether `key` is a LoRA A or B matrix (not the wrapped layer's own weight)."""
    return LORA_A in key or LORA_B in key


def is_finetune_parameter(key: str) -> bool:
    """Whether `key` is what finetuning adds to a base model: LoRA matrices and P-tuning prefixes."""
    return is_lora_matrix(key) or key.startswith(PTUNING_PREFIX)


def unwrapped_key(key: str) -> str:
    """A LoRA-wrapped layer's key as the plain layer spells it (X.original.weight -> X.weight)."""
    return key.replace(LORA_ORIGINAL, ".")


@dataclass(frozen=True)
class Split:
    """How a tensor is divided across model-parallel ranks.

    dim: the split dimension, or None for a replicated tensor. blocks: relative sizes of the
    independently split blocks along `dim` ((1, 1, 1) for a fused q|k|v, (1,) otherwise).
    """
    dim: Optional[int] = None
    blocks: Tuple[int, ...] = (1,)


REPLICATED = Split()
COLUMN, ROW, FUSED_QKV = Split(0), Split(1), Split(0, (1, 1, 1))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: SAT key, HF key(s) (the rotary buffer has one per HF decoder layer), full shape, split."""
    sat_key: str
    hf_keys: Tuple[str, ...]
    shape: Tuple[int, ...]
    split: Split = REPLICATED


_VIT = "mixins.eva.vit_model."
_VIT_HF = "model.vision."

# (SAT key, HF key, shape in dims of `_dims`, split); {i} is the layer index.
_LLM_LAYER = [
    ("transformer.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", ("H",), REPLICATED),
    ("transformer.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
     ("H",), REPLICATED),
    ("transformer.layers.{i}.attention.query_key_value.weight",
     "model.layers.{i}.self_attn.language_expert_query_key_value.weight", ("3H", "H"), FUSED_QKV),
    ("transformer.layers.{i}.attention.dense.weight", "model.layers.{i}.self_attn.language_expert_dense.weight",
     ("H", "H"), ROW),
    ("mixins.rotary.vision_query_key_value_list.{i}.weight",
     "model.layers.{i}.self_attn.vision_expert_query_key_value.weight", ("3H", "H"), FUSED_QKV),
    ("mixins.rotary.vision_dense_list.{i}.weight", "model.layers.{i}.self_attn.vision_expert_dense.weight",
     ("H", "H"), ROW),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "model.layers.{i}.mlp.language_mlp.up_proj.weight",
     ("F", "H"), COLUMN),
    ("mixins.mlp.gate_proj.{i}.weight", "model.layers.{i}.mlp.language_mlp.gate_proj.weight", ("F", "H"), COLUMN),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "model.layers.{i}.mlp.language_mlp.down_proj.weight",
     ("H", "F"), ROW),
    ("mixins.mlp.vision_dense_h_to_4h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.up_proj.weight",
     ("F", "H"), COLUMN),
    ("mixins.mlp.vision_gate_proj.{i}.weight", "model.layers.{i}.mlp.vision_mlp.gate_proj.weight", ("F", "H"), COLUMN),
    ("mixins.mlp.vision_dense_4h_to_h_list.{i}.weight", "model.layers.{i}.mlp.vision_mlp.down_proj.weight",
     ("H", "F"), ROW),
]
_VISION_GLOBAL = [
    (_VIT + "mixins.patch_embedding.proj.weight", _VIT_HF + "patch_embedding.proj.weight", ("E", "C", "K", "K"),
     REPLICATED),
    (_VIT + "mixins.patch_embedding.proj.bias", _VIT_HF + "patch_embedding.proj.bias", ("E",), REPLICATED),
    # SAT holds the CLS vector as a vocabulary of one word (a plain nn.Embedding)
    (_VIT + "transformer.word_embeddings.weight", _VIT_HF + "patch_embedding.cls_embedding", ("1", "E"), REPLICATED),
    (_VIT + "transformer.position_embeddings.weight", _VIT_HF + "patch_embedding.position_embedding.weight",
     ("P", "E"), REPLICATED),
    ("mixins.eva.linear_proj.linear_proj.weight", _VIT_HF + "linear_proj.linear_proj.weight", ("H", "E"), REPLICATED),
    ("mixins.eva.linear_proj.norm1.weight", _VIT_HF + "linear_proj.norm1.weight", ("H",), REPLICATED),
    ("mixins.eva.linear_proj.norm1.bias", _VIT_HF + "linear_proj.norm1.bias", ("H",), REPLICATED),
    ("mixins.eva.linear_proj.gate_proj.weight", _VIT_HF + "linear_proj.gate_proj.weight", ("F", "H"), REPLICATED),
    ("mixins.eva.linear_proj.dense_h_to_4h.weight", _VIT_HF + "linear_proj.dense_h_to_4h.weight", ("F", "H"),
     REPLICATED),
    ("mixins.eva.linear_proj.dense_4h_to_h.weight", _VIT_HF + "linear_proj.dense_4h_to_h.weight", ("H", "F"),
     REPLICATED),
    ("mixins.eva.boi", _VIT_HF + "boi", ("1", "1", "H"), REPLICATED),
    ("mixins.eva.eoi", _VIT_HF + "eoi", ("1", "1", "H"), REPLICATED),
]
_VISION_LAYER = [  # {p}: weight and bias
    ("transformer.layers.{i}.input_layernorm.{p}", "transformer.layers.{i}.input_layernorm.{p}", ("E",), REPLICATED),
    ("transformer.layers.{i}.post_attention_layernorm.{p}", "transformer.layers.{i}.post_attention_layernorm.{p}",
     ("E",), REPLICATED),
    ("transformer.layers.{i}.attention.query_key_value.weight", "transformer.layers.{i}.attention.query_key_value.weight",
     ("3E", "E"), FUSED_QKV),
    ("transformer.layers.{i}.attention.query_key_value.bias", "transformer.layers.{i}.attention.query_key_value.bias",
     ("3E",), FUSED_QKV),
    ("transformer.layers.{i}.attention.dense.weight", "transformer.layers.{i}.attention.dense.weight", ("E", "E"), ROW),
    ("transformer.layers.{i}.attention.dense.bias", "transformer.layers.{i}.attention.dense.bias", ("E",), REPLICATED),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "transformer.layers.{i}.mlp.fc1.weight", ("EF", "E"), COLUMN),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.bias", "transformer.layers.{i}.mlp.fc1.bias", ("EF",), COLUMN),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "transformer.layers.{i}.mlp.fc2.weight", ("E", "EF"), ROW),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.bias", "transformer.layers.{i}.mlp.fc2.bias", ("E",), REPLICATED),
]


def _dims(config: CogVLMConfig) -> Dict[str, int]:
    vision = config.vision
    dims = dict(H=config.hidden_size, F=config.inner_hidden_size, V=config.vocab_size, E=vision.hidden_size,
                EF=vision.inner_hidden_size, P=vision.num_positions, C=vision.in_channels, K=vision.patch_size)
    dims.update({"1": 1, "3H": 3 * dims["H"], "3E": 3 * dims["E"], "R": config.head_dim // 2})
    return dims


def tensor_table(config: CogVLMConfig) -> List[TensorSpec]:
    """Every tensor of the (LoRA-free, P-tuning-free) CogVLM of `config`, in a fixed order: LLM, then vision."""
    d = _dims(config)

    def spec(sat, hf, shape, split, **names):
        return TensorSpec(sat.format(**names), (hf.format(**names),), tuple(d[s] for s in shape), split)

    vocab_split = COLUMN if config.vocab_size >= SAT_MIN_PARALLEL_VOCAB else REPLICATED
    layers = range(config.num_layers)
    table = [spec("transformer.word_embeddings.weight", "model.embed_tokens.weight", ("V", "H"), vocab_split),
             spec("transformer.final_layernorm.weight", "model.norm.weight", ("H",), REPLICATED),
             spec("mixins.lm.lm_head.weight", "lm_head.weight", ("V", "H"), COLUMN),
             TensorSpec(ROTARY_KEY, tuple(f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in layers),
                        (d["R"],))]
    table += [spec(*row, i=i) for i in layers for row in _LLM_LAYER]
    table += [spec(*row) for row in _VISION_GLOBAL]
    for i in range(config.vision.num_layers):
        for sat, hf, shape, split in _VISION_LAYER:
            for p in (("weight", "bias") if "{p}" in sat else ("",)):
                table.append(spec(_VIT + sat, _VIT_HF + hf, shape, split, i=i, p=p))
    return table


def split_rules(config: CogVLMConfig) -> Dict[str, Split]:
    """{SAT key: Split} of every tensor of `config`'s model (P-tuning prefixes included when present)."""
    rules = {spec.sat_key: spec.split for spec in tensor_table(config)}
    if config.finetune.get("use_ptuning"):
        rules[PTUNING_PREFIX + "prefix"] = REPLICATED
    return rules


def _block_sizes(size: int, split: Split, key: str) -> List[int]:
    unit, rest = divmod(size, sum(split.blocks))
    if rest:
        raise CheckpointError(f"{key}: dim {split.dim} of size {size} cannot hold blocks {split.blocks}")
    return [unit * b for b in split.blocks]


def split_tensor(full: torch.Tensor, split: Split, rank: int, world_size: int, key: str = "tensor") -> torch.Tensor:
    """Rank `rank`'s part of `full` when divided over `world_size` ranks as SAT's mpu layers do."""
    if split.dim is None or world_size == 1:
        return full
    parts = []
    for block in torch.split(full, _block_sizes(full.shape[split.dim], split, key), dim=split.dim):
        size, rest = divmod(block.shape[split.dim], world_size)
        if rest:
            raise CogVLMError(f"{key} {tuple(full.shape)} cannot be split over {world_size} ranks (dim {split.dim}); "
                              "use a number of processes that divides the attention heads and widths")
        parts.append(block.narrow(split.dim, rank * size, size))
    return torch.cat(parts, dim=split.dim)


def merge_tensors(shards: Sequence[torch.Tensor], split: Split, key: str = "tensor") -> torch.Tensor:
    """Inverse of `split_tensor`: the full tensor from the parts of all ranks, in rank order."""
    if split.dim is None or len(shards) == 1:
        return shards[0]
    per_shard = [torch.split(s, _block_sizes(s.shape[split.dim], split, key), dim=split.dim) for s in shards]
    return torch.cat([part for block in zip(*per_shard) for part in block], dim=split.dim)


def split_shape(shape: Sequence[int], split: Split, world_size: int) -> Tuple[int, ...]:
    """The shape of one rank's part of a tensor of full `shape`."""
    shape = list(shape)
    if split.dim is not None:
        shape[split.dim] //= world_size
    return tuple(shape)


def check_divisible(config: CogVLMConfig, world_size: int) -> None:
    """Refuse a model-parallel size that SAT's layers cannot divide this model by, naming the culprit."""
    sizes = {"attention heads": config.num_attention_heads, "hidden size": config.hidden_size,
             "MLP inner size": config.inner_hidden_size, "vocabulary": config.vocab_size,
             "ViT attention heads": config.vision.num_attention_heads,
             "ViT MLP inner size": config.vision.inner_hidden_size}
    bad = [f"{name} {value}" for name, value in sizes.items() if value % world_size]
    if bad:
        raise CogVLMError(f"cannot split this model over {world_size} processes: {', '.join(bad)} not divisible "
                          f"by {world_size}; use a process count that divides them (e.g. 1, 2, 4)")


def summarise(keys, limit: int = 6) -> str:
    """A few sorted keys and the count, for error messages."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def mismatch_error(source: str, missing: Sequence[str] = (), unexpected: Sequence[str] = ()) -> CheckpointError:
    """The one error for a checkpoint whose tensors are not the model's."""
    parts = ([f"unknown tensors: {summarise(unexpected)}"] if unexpected else []) + \
            ([f"missing tensors: {summarise(missing)}"] if missing else [])
    hint = "check that it is a CogVLM checkpoint matching its model_config.json / config.json"
    if any(marker in k for k in unexpected for marker in LORA_MARKERS):
        hint = ("it holds LoRA weights: load it with its finetuning flags (use_lora in its model_config.json), "
                "or merge it first with merge_model.py")
    return CheckpointError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); {hint}")


def shape_error(source: str, key: str, shape, expected) -> CheckpointError:
    """The one error for a tensor whose shape is not the one the config asks for."""
    return CheckpointError(f"{source}: tensor {key} has shape {tuple(shape)} but the config asks for "
                           f"{tuple(expected)}; the weights and model_config.json/config.json do not belong together")
