"""SAT checkpoint directories: `model_config.json`, `latest`, `<iteration>/mp_rank_XX_model_states.pt`.

`SATReader` reads the state dict of the M model-parallel shard files lazily from memory-mapped files, for any
rank of any split (M -> N: merged, then re-split by the split rules of models.checkpoint.layout), with LoRA
folded into `X.weight` when asked. `write_sat_checkpoint` writes one atomically. `resumable_iteration` finds
the newest complete iteration of a training run (whose `latest` may name an incomplete one).
"""
import json
import logging
import os
import zipfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from models.checkpoint.atomic import atomic_output_dir
from models.checkpoint.layout import (LORA_A, LORA_B, LORA_ORIGINAL, is_finetune_parameter, is_lora_matrix,
                                      merge_tensors, mismatch_error, shape_error, split_rules, split_shape,
                                      split_tensor, tensor_table, unwrapped_key)
from models.config import CogVLMConfig
from models.errors import CheckpointError, ConfigError
from models.sat_compat import SAVE_COMPLETE, load_tensors

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
LATEST_FILE = "latest"
ITERATION = "1"  # what our writers name the iteration folder


def shard_file_name(rank: int) -> str:
    """The file of model-parallel rank `rank` inside the iteration folder."""
    return f"mp_rank_{rank:02d}_model_states.pt"


def is_sat_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_sat_config(ckpt_dir: str) -> CogVLMConfig:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no {CONFIG_FILE}; is this a SAT checkpoint directory?")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    return CogVLMConfig.from_sat_dict(data, source=path)


def read_latest(ckpt_dir: str) -> str:
    """The iteration folder that `latest` names."""
    latest = os.path.join(ckpt_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no '{LATEST_FILE}' file (it names the iteration folder "
                              "to load); is this a complete SAT checkpoint directory?")
    with open(latest, errors="replace") as f:
        iteration = f.read().strip()
    if not iteration:
        raise CheckpointError(f"'{latest}' is empty: it should hold the iteration folder name, e.g. 1")
    if not is_plain_name(iteration):
        raise CheckpointError(f"'{latest}' names '{iteration[:80]}', which is not a folder inside {ckpt_dir}; it "
                              "must hold the iteration folder's name, e.g. 1 (paths are refused)")
    return iteration


def is_plain_name(name: str) -> bool:
    """Whether `name` names an entry of the directory it is joined to (no separator, '..', absolute path or
    NUL), so that a file inside a checkpoint cannot send a reader outside it."""
    separators = {os.sep, "/", "\\"} | ({os.altsep} if os.altsep else set())
    return name not in ("", ".", "..") and "\0" not in name and not any(s in name for s in separators)


def load_shard(path: str) -> Dict[str, torch.Tensor]:
    """A SAT `{'module': state_dict}` file's state dict on the CPU, memory-mapped (no copy in RAM)."""
    try:
        checkpoint = load_tensors(path, map_location="cpu", mmap=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch raises many types for a corrupt/truncated file
        raise CheckpointError(f"cannot read checkpoint file {path} ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is corrupt or incomplete, download it again") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT checkpoint (expected a dict with key 'module')")
    return checkpoint["module"]


class SATReader:
    """The tensors of a SAT checkpoint directory, read lazily from its memory-mapped shard files.

    A shard file is opened when first needed, so a rank of an N-way checkpoint loaded on N ranks only opens
    its own. `tensor(key, rank, world_size)` is any rank's part of any tensor for any split.
    """

    def __init__(self, ckpt_dir: str, config: CogVLMConfig):
        self.dir, self.config = ckpt_dir, config
        self.mp_size = config.model_parallel_size
        folder = os.path.join(ckpt_dir, read_latest(ckpt_dir))
        found = sorted(f for f in os.listdir(folder) if f.startswith("mp_rank_")) if os.path.isdir(folder) else []
        expected = [shard_file_name(r) for r in range(self.mp_size)]
        if found and found != expected:
            raise CheckpointError(f"{ckpt_dir}: {CONFIG_FILE} says model_parallel_size={self.mp_size} but {folder} "
                                  f"holds {', '.join(found)}; fix model_parallel_size or restore the shards")
        self.files = [os.path.join(folder, name) for name in expected]
        for path in self.files:
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint file {path} is missing ('{LATEST_FILE}' names "
                                      f"{os.path.basename(folder)}); the download may be incomplete")
        self.rules = split_rules(config.without_lora())
        self._shards: Dict[int, dict] = {}
        self.consumed = set()

    def shard(self, index: int) -> dict:
        """Shard file `index`'s state dict, checked to hold the same tensors as the shards opened before."""
        if index not in self._shards:
            state = load_shard(self.files[index])
            if self._shards:
                first = min(self._shards)
                if set(state) != set(self._shards[first]):
                    raise CheckpointError(f"{self.files[index]} holds other tensors than {self.files[first]}; "
                                          "the shards do not belong to one checkpoint")
            self._shards[index] = state
        return self._shards[index]

    @property
    def stored_keys(self) -> List[str]:
        """The keys as stored (LoRA-wrapped layers as `X.original.weight`, `X.matrix_A.k`, ...)."""
        return list(self.shard(min(self._shards, default=0)))

    @property
    def has_lora(self) -> bool:
        return any(LORA_A in k for k in self.stored_keys)

    def folded_keys(self) -> List[str]:
        """The keys with every LoRA-wrapped layer read as its plain (folded) weight and bias."""
        return [unwrapped_key(key) for key in self.stored_keys if not is_lora_matrix(key)]

    def _lora_parts(self, prefix: str) -> Tuple[List[str], List[str]]:
        a_keys = sorted((k for k in self.stored_keys if k.startswith(prefix + LORA_A[1:])),
                        key=lambda k: int(k.rsplit(".", 1)[1]))
        return a_keys, [k.replace(LORA_A, LORA_B) for k in a_keys]

    def stored(self, key: str, shard: int) -> torch.Tensor:
        """`key` as shard `shard` holds it; a LoRA-wrapped weight comes back with its LoRA folded in
        (W + scaling * concat_j(B_j @ A_j) along the output dim, as SAT's `merge_lora` computes it)."""
        state = self.shard(shard)
        if key in state:
            self.consumed.add(key)
            return state[key]
        module, _, name = key.rpartition(".")
        original_key = f"{module}{LORA_ORIGINAL}{name}"
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
        scaling = float(self.config.extra.get("lora_alpha", 1.0)) / rank_r
        delta = torch.cat([state[b].float() @ state[a].float() * scaling for a, b in zip(a_keys, b_keys)], -2)
        return (original + delta).to(original.dtype)

    def split_of(self, key: str):
        if key in self.rules:
            return self.rules[key]
        raise CheckpointError(f"{self.dir}: tensor {key} has no model-parallel split rule "
                              "(models/checkpoint/layout.py); merge the checkpoint with its own code first")

    def tensor(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s part of `key` in a `world_size`-way split (world_size 1: the full tensor)."""
        if world_size == self.mp_size:
            return self.stored(key, rank)
        split = self.split_of(key)
        full = merge_tensors([self.stored(key, s) for s in range(self.mp_size)], split, key)
        return split_tensor(full, split, rank, world_size, key)

    def items(self, rank: int = 0, world_size: int = 1, fold_lora: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, this rank's tensor) for every tensor; `fold_lora` reads LoRA-wrapped layers as plain ones."""
        for index in ([rank] if world_size == self.mp_size else range(self.mp_size)):
            self.shard(index)
        for key in (self.folded_keys() if fold_lora else self.stored_keys):
            yield key, self.tensor(key, rank, world_size)

    def unconsumed(self) -> List[str]:
        return [k for k in self.stored_keys if k not in self.consumed]

    def check_against_config(self) -> None:
        """Every tensor of the config's table is present with its shape (per shard), and every stored tensor
        is one of them or finetuning state (LoRA matrices, P-tuning prefixes)."""
        state = self.shard(0)
        stored = {unwrapped_key(key): tuple(value.shape) for key, value in state.items()}
        table = tensor_table(self.config)
        missing = [spec.sat_key for spec in table if spec.sat_key not in stored]
        known = {spec.sat_key for spec in table}
        unknown = [key for key in stored if key not in known and not is_finetune_parameter(key)]
        if missing or unknown:
            raise mismatch_error(self.dir, missing, unknown)
        for spec in table:
            expected = split_shape(spec.shape, spec.split, self.mp_size)
            if stored[spec.sat_key] != expected:
                raise shape_error(self.files[0], spec.sat_key, stored[spec.sat_key], expected)


def write_sat_checkpoint(out_dir: str, config: CogVLMConfig, shards: Iterable[Dict[str, torch.Tensor]],
                         dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write a SAT checkpoint directory atomically: each state dict of `shards` (one per model-parallel rank
    of `config.model_parallel_size`) as `1/mp_rank_XX_model_states.pt`, then model_config.json, `latest` last.
    dtype: cast floating-point tensors (None keeps them). Returns the shard paths (under `out_dir`)."""
    written = []
    with atomic_output_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, ITERATION))
        for rank, state_dict in enumerate(shards):
            state_dict = {key: _owned(tensor, dtype) for key, tensor in state_dict.items()}
            torch.save({"module": state_dict}, os.path.join(tmp, ITERATION, shard_file_name(rank)))
            del state_dict
            written.append(os.path.join(out_dir, ITERATION, shard_file_name(rank)))
            logger.info("wrote %s", written[-1])
        if len(written) != config.model_parallel_size:
            raise ValueError(f"{len(written)} shards for model_parallel_size {config.model_parallel_size}")
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config.to_sat_dict(), f, indent=4)
        with open(os.path.join(tmp, LATEST_FILE), "w") as f:
            f.write(ITERATION)
    return written


def _owned(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A tensor with its own storage (torch.save would write the whole storage of a view)."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


# Training runs: which iteration to resume ---------------------------------------------------

def _mp_size_of_run(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            size = json.load(f).get("model_parallel_size", 1)
        return size if isinstance(size, int) and size >= 1 else 1
    except (OSError, ValueError, AttributeError):
        return 1


def iteration_problem(folder: str, mp_size: int = 1, needs_marker: bool = False) -> Optional[str]:
    """Why the iteration folder `folder` is not a complete checkpoint, or None when it is: every model-parallel
    shard present, every .pt file a whole archive (torch.save's zip format ends with its directory, so a
    truncated file has none), and, when `needs_marker`, the SAVE_COMPLETE marker of a finished save."""
    if not os.path.isdir(folder):
        return "the folder does not exist"
    missing = [shard_file_name(r) for r in range(mp_size) if not os.path.isfile(os.path.join(folder, shard_file_name(r)))]
    if missing:
        return f"{missing[0]} is missing"
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".pt") and not zipfile.is_zipfile(path):
            return f"{name} is truncated or corrupt ({os.path.getsize(path)} bytes, not a complete archive)"
    if needs_marker and not os.path.isfile(os.path.join(folder, SAVE_COMPLETE)):
        return f"its save did not finish (no '{SAVE_COMPLETE}' marker)"
    return None


def resumable_iteration(run_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest iteration folder of a SAT training run `run_dir` that holds a complete checkpoint (None if
    none does), and what was passed over on the way, newest first: [(folder or 'latest', why), ...].

    `latest` is not trusted: SAT writes it in place (a kill can leave it empty) and, with ZeRO, before the
    optimizer files. Once any folder of the run carries the SAVE_COMPLETE marker, folders without it count as
    unfinished saves."""
    if not os.path.isdir(run_dir):
        return None, []
    folders = sorted((name for name in os.listdir(run_dir)
                      if name.isdigit() and os.path.isdir(os.path.join(run_dir, name))), key=int, reverse=True)
    skipped = []
    latest = os.path.join(run_dir, LATEST_FILE)
    if folders and not os.path.isfile(latest):
        skipped.append((LATEST_FILE, "the file is missing"))
    elif folders:
        with open(latest, errors="replace") as f:
            named = f.read().strip()
        if not named:
            skipped.append((LATEST_FILE, "the file is empty"))
        elif named not in folders:
            skipped.append((LATEST_FILE, f"it names '{named[:40]}', which is not an iteration folder here"))
    mp_size = _mp_size_of_run(run_dir)
    needs_marker = any(os.path.isfile(os.path.join(run_dir, name, SAVE_COMPLETE)) for name in folders)
    for name in folders:
        problem = iteration_problem(os.path.join(run_dir, name), mp_size, needs_marker)
        if problem is None:
            return name, skipped
        skipped.append((name, problem))
    return None, skipped
