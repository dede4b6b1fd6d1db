"""Model-parallel SAT checkpoints: which tensors SAT's mpu splits, and streaming split / merge.

SAT's mpu layers split a tensor across model-parallel ranks as follows (and nothing else is split):
  ColumnParallelLinear   weight and bias on dim 0 (output rows); with `stride` k (fused q|k|v) each of
                         the k blocks is split separately, so rank r holds [q_r; k_r; v_r]
  RowParallelLinear      weight on dim 1 (input columns); the bias is replicated
  VocabParallelEmbedding weight on dim 0 (vocabulary rows)
Everything else (norms, the ViT's CLS / position embeddings and conv, the GLU adapter, boi / eoi, the
rotary buffer) is replicated. `parallel_layout` reads this off the modules of a built model, so any
layer a mixin adds is covered by its type, not by a list of names.

We load and convert checkpoints here rather than with SAT's `from_pretrained(overwrite_args=
{'model_parallel_size': N})`, because that path moves every shard with `.cuda()` (it cannot run on
CPU / gloo), has rank 0 hold the full model next to its shard, cannot load an N-way checkpoint on a
different number of ranks, and ignores LoRA. Here each rank reads only what it needs from the
memory-mapped checkpoint files, tensor by tensor, with no communication at all.

LoRA (SAT `lora2`: `X.original.weight`, `X.matrix_A.j`, `X.matrix_B.j`) is folded into `X.weight`
whenever the result is model-parallel or merged: SAT's LoRA layers are not correct under model
parallelism (the LoRA branch of a row-parallel layer is never all-reduced), so a LoRA model only
runs unmerged on one unsplit process.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from sat import mpu
from sat.mpu import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from models import checkpoint_io
from utils import hf_format
from models.errors import CheckpointError, CogVLMError

logger = logging.getLogger(__name__)

LORA_FLAGS_OFF = {"use_lora": False, "use_qlora": False}


@dataclass(frozen=True)
class Split:
    """How one state-dict tensor is divided across model-parallel ranks.

    dim: the split dimension, or None for a replicated tensor. blocks: relative sizes of the
    independently split blocks along `dim` ((1, 1, 1) for a fused q|k|v, (1,) otherwise).
    """
    dim: Optional[int] = None
    blocks: Tuple[int, ...] = (1,)


REPLICATED = Split()


def _split_of(module: torch.nn.Module, tensor_name: str) -> Split:
    if isinstance(module, VocabParallelEmbedding):
        return Split(0)
    if isinstance(module, ColumnParallelLinear):
        stride = module.stride
        return Split(0, (1,) * stride if isinstance(stride, int) else tuple(stride))
    if isinstance(module, RowParallelLinear):
        return Split(1) if tensor_name == "weight" else REPLICATED
    return REPLICATED


def parallel_layout(model: torch.nn.Module) -> Dict[str, Split]:
    """{state-dict key: Split} for every tensor of `model`, from the type of the module holding it."""
    layout = {}
    for key in model.state_dict():
        module_name, _, tensor_name = key.rpartition(".")
        layout[key] = _split_of(model.get_submodule(module_name), tensor_name)
    return layout


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


def check_divisible(config: dict, world_size: int) -> None:
    """Refuse a model-parallel size that SAT's layers cannot divide this model by, naming the culprit."""
    eva = config.get("eva_args", {})
    sizes = {"attention heads": config.get("num_attention_heads"), "hidden size": config.get("hidden_size"),
             "MLP inner size": config.get("inner_hidden_size"), "vocabulary": config.get("vocab_size"),
             "ViT attention heads": eva.get("num_attention_heads"), "ViT MLP inner size": eva.get("inner_hidden_size")}
    bad = [f"{n} {v}" for n, v in sizes.items() if isinstance(v, int) and v % world_size]
    if bad:
        raise CogVLMError(f"cannot split this model over {world_size} processes: {', '.join(bad)} not divisible "
                          f"by {world_size}; use a process count that divides them (e.g. 1, 2, 4)")


class ShardedCheckpoint:
    """The state dict of a SAT checkpoint saved as M model-parallel shard files, read lazily.

    The shard files are opened when first needed and memory-mapped: a tensor is read from disk when
    asked for, so reading never holds more than the tensors the caller keeps, and a rank of an N-way
    checkpoint loaded on N ranks only opens its own file. `tensor(key, split, rank, world)`
    returns any rank's part of any tensor for any world size (M -> world: merged, then re-split),
    with LoRA folded into `X.weight` / `X.bias` when the checkpoint holds `X.original.*` instead.
    """

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.config = checkpoint_io.read_model_config(ckpt_dir)
        self.mp_size = int(self.config.get("model_parallel_size", 1))
        iteration = checkpoint_io.read_latest_iteration(ckpt_dir)
        folder = os.path.join(ckpt_dir, iteration)
        found = sorted(f for f in os.listdir(folder) if f.startswith("mp_rank_")) if os.path.isdir(folder) else []
        expected = [f"mp_rank_{r:02d}_model_states.pt" for r in range(self.mp_size)]
        if found and sorted(found) != expected:
            raise CheckpointError(f"{ckpt_dir}: model_config.json says model_parallel_size={self.mp_size} but "
                                  f"{folder} holds {', '.join(found)}; fix model_parallel_size or restore the shards")
        self.files = [checkpoint_io.checkpoint_file(ckpt_dir, r) for r in range(self.mp_size)]
        self._shards: Dict[int, dict] = {}
        self.consumed = set()

    def shard(self, index: int) -> dict:
        """The state dict of shard file `index` (memory-mapped), checked against the shards opened before."""
        if index not in self._shards:
            state = checkpoint_io.load_state_dict_file(self.files[index])
            if self._shards:
                first = min(self._shards)
                if set(state) != set(self._shards[first]):
                    raise CheckpointError(f"{self.files[index]} holds other tensors than {self.files[first]}; "
                                          "the shards do not belong to one checkpoint")
            self._shards[index] = state
        return self._shards[index]

    def open_for(self, rank: int, world_size: int) -> None:
        """Open the shard files that rank `rank` of `world_size` reads (all of them unless the split matches)."""
        for index in ([rank] if world_size == self.mp_size else range(self.mp_size)):
            self.shard(index)

    @property
    def keys(self) -> List[str]:
        return list(self.shard(min(self._shards, default=0)))

    @property
    def has_lora(self) -> bool:
        return any(".matrix_A." in k for k in self.keys)

    def _lora_parts(self, prefix: str) -> Tuple[List[str], List[str]]:
        a_keys = sorted((k for k in self.keys if k.startswith(prefix + "matrix_A.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        return a_keys, [k.replace(".matrix_A.", ".matrix_B.") for k in a_keys]

    def has(self, key: str) -> bool:
        module, _, name = key.rpartition(".")
        state = self.shard(min(self._shards, default=0))
        return key in state or f"{module}.original.{name}" in state

    def stored(self, key: str, shard: int) -> torch.Tensor:
        """`key` as shard `shard` holds it; a LoRA-wrapped weight comes back with its LoRA folded in
        (W + scaling * concat_j(B_j @ A_j) along the output dim, computed as SAT's `merge_lora` does)."""
        state = self.shard(shard)
        if key in state:
            self.consumed.add(key)
            return state[key]
        module, _, name = key.rpartition(".")
        original_key = f"{module}.original.{name}"
        if original_key not in state:
            raise KeyError(key)
        self.consumed.add(original_key)
        original = state[original_key]
        a_keys, b_keys = self._lora_parts(module + ".")
        if name != "weight" or not a_keys:
            return original
        self.consumed.update(a_keys + b_keys)
        rank_r = state[a_keys[0]].shape[0]
        # SAT's LoraMixin (lora2) uses lora_alpha=1 unless the config says otherwise: scaling = alpha / r
        scaling = float(self.config.get("lora_alpha", 1.0)) / rank_r
        delta = torch.cat([state[b].float() @ state[a].float() * scaling for a, b in zip(a_keys, b_keys)], -2)
        return (original + delta).to(original.dtype)

    def tensor(self, key: str, split: Split, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s part of `key` in a `world_size`-way split (world_size 1: the full tensor)."""
        if world_size == self.mp_size:
            return self.stored(key, rank)
        full = merge_tensors([self.stored(key, s) for s in range(self.mp_size)], split, key)
        return split_tensor(full, split, rank, world_size, key)

    def unconsumed(self) -> List[str]:
        keys = self.keys
        return [k for k in keys if k not in self.consumed]


def _mismatch_error(source: str, missing: List[str], unexpected: List[str]) -> CheckpointError:
    parts = []
    if missing:
        parts.append(f"missing keys: {checkpoint_io._summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {checkpoint_io._summarise(unexpected)}")
    return CheckpointError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); check that "
                           "--from_pretrained points at a CogVLM checkpoint of this format")


@torch.no_grad()
def load_sharded(model: torch.nn.Module, reader: ShardedCheckpoint, rank: int, world_size: int) -> None:
    """Copy this rank's part of every tensor of `reader` into `model` (built for `world_size` ranks),
    one tensor at a time. Raises CheckpointError on missing, unexpected or misshapen tensors."""
    layout = parallel_layout(model)
    reader.open_for(rank, world_size)
    missing = []
    for key, target in model.state_dict(keep_vars=True).items():
        if not reader.has(key):
            missing.append(key)
            continue
        value = reader.tensor(key, layout[key], rank, world_size)
        if value.shape != target.shape:
            raise CheckpointError(f"{key} in {reader.dir} has shape {tuple(value.shape)} for rank {rank} of "
                                  f"{world_size}, the model expects {tuple(target.shape)}")
        target.copy_(value)
    unexpected = reader.unconsumed()
    if missing or unexpected:
        raise _mismatch_error(reader.dir, missing, unexpected)


def from_pretrained(model_cls, ckpt_dir: str, args, quant: Optional[int] = None):
    """Build `model_cls` for this process's share of a model-parallel group and load its weights.

    The model-parallel size is the torchrun world size (`args.world_size`); the checkpoint may be
    saved for any model-parallel size: an unsplit one is split on the fly, an N-way one read shard
    by shard. One process with an unsplit checkpoint takes the ordinary loader. `quant` (4 or 8)
    quantizes the weights (utils.quantization); on CPU one process quantizes an unsplit checkpoint
    layer by layer as it loads, so the float weights are never all in memory. Returns (model, args).
    """
    from models.quantization import quantize_model

    world_size = int(getattr(args, "world_size", 1))
    config = checkpoint_io.read_model_config(ckpt_dir)
    saved_mp = int(config.get("model_parallel_size", 1))
    if world_size == 1 and saved_mp == 1:
        on_load = bool(quant) and not str(getattr(args, "device", "cpu")).startswith("cuda")
        model, model_args = model_cls.from_pretrained(
            ckpt_dir, args=args,
            before_load=(lambda built: quantize_model(built, quant, weights_loaded=False)) if on_load else None)
        if quant and not on_load:
            model = quantize_model(model, quant)
        return model, model_args
    check_divisible(config, world_size)
    # an HF-format directory (unsplit tensors) offers the same reading interface
    reader = hf_format.HFStateReader(ckpt_dir) if hf_format.is_hf_checkpoint(ckpt_dir) else ShardedCheckpoint(ckpt_dir)
    overwrite = {"model_parallel_size": world_size, **(LORA_FLAGS_OFF if reader.has_lora else {})}
    model, model_args = model_cls.from_pretrained_base(ckpt_dir, args=args, build_only=True, overwrite_args=overwrite)
    rank = mpu.get_model_parallel_rank()
    logger.info("loading %s (saved for %d model-parallel rank(s)) as rank %d of %d%s", ckpt_dir, saved_mp, rank,
                world_size, "; LoRA folded into the weights" if reader.has_lora else "")
    load_sharded(model, reader, rank, world_size)
    if quant:
        model = quantize_model(model, quant)
    # sampling draws from torch's RNG on every rank; the same seed keeps all ranks on the same tokens
    torch.manual_seed(getattr(model_args, "seed", 1234))
    return model.eval(), model_args


# Writing ---------------------------------------------------------------------------------------

def _write_config(out_dir: str, config: dict) -> None:
    os.makedirs(os.path.join(out_dir, "1"), exist_ok=True)
    with open(os.path.join(out_dir, "model_config.json"), "w") as f:
        json.dump(config, f, indent=4)
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write("1")


def _owned(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A tensor with its own storage (torch.save would write the whole storage of a view)."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def reshard_checkpoint(ckpt_dir: str, out_dir: str, layout: Dict[str, Split], model_parallel_size: int = 1,
                       dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write the checkpoint in `ckpt_dir` to `out_dir` split `model_parallel_size` ways (1: merged),
    with any LoRA folded into the base weights. Returns the files written.

    layout: the `parallel_layout` of the target model (unsplit, without LoRA layers); its keys are
    the keys written. Memory: one output shard (the whole model when merging) plus one tensor; the
    input shards are memory-mapped and read tensor by tensor.
    dtype: cast floating-point tensors (e.g. torch.bfloat16), or None to keep the stored dtype.
    """
    reader = ShardedCheckpoint(ckpt_dir)
    missing = [k for k in layout if not reader.has(k)]
    if missing:
        raise _mismatch_error(ckpt_dir, missing, [])
    check_divisible(reader.config, model_parallel_size)
    config = dict(reader.config, model_parallel_size=model_parallel_size)
    if reader.has_lora:
        config.update(LORA_FLAGS_OFF)
    _write_config(out_dir, config)
    written = []
    for rank in range(model_parallel_size):
        shard = {}
        for key in tqdm(layout, desc=f"rank {rank} of {model_parallel_size}", disable=len(layout) < 200):
            shard[key] = _owned(reader.tensor(key, layout[key], rank, model_parallel_size), dtype)
        unexpected = reader.unconsumed()
        if unexpected:
            raise _mismatch_error(ckpt_dir, [], unexpected)
        path = os.path.join(out_dir, "1", f"mp_rank_{rank:02d}_model_states.pt")
        torch.save({"module": shard}, path)
        del shard
        written.append(path)
        logger.info("wrote %s", path)
    return written


def model_class_for(config: dict):
    """The class a checkpoint's model_config.json asks for: finetuned checkpoints carry their mixins."""
    from models.cogvlm_model import CogVLMModel, FineTuneTestCogVLMModel

    return FineTuneTestCogVLMModel if config.get("model_class", "").startswith("FineTune") else CogVLMModel


def unsplit_layout(ckpt_dir: str) -> Dict[str, Split]:
    """The `parallel_layout` of the unsplit, LoRA-free model that `ckpt_dir` describes.

    The model is built without initialising (or touching) its weights and dropped again: only the
    module types matter (bf16 halves the address space it reserves meanwhile). Needs torch.distributed
    initialised with model-parallel size 1.
    """
    import argparse

    config = checkpoint_io.read_model_config(ckpt_dir)
    args = argparse.Namespace(deepspeed=None, local_rank=0, rank=0, world_size=1, model_parallel_size=1,
                              mode="inference", skip_init=True, use_gpu_initialization=False, device="cpu",
                              fp16=False, bf16=True)
    model, _ = model_class_for(config).from_pretrained_base(
        ckpt_dir, args=args, build_only=True, overwrite_args={"model_parallel_size": 1, **LORA_FLAGS_OFF})
    layout = parallel_layout(model)
    del model
    return layout
