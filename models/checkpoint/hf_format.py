"""HF-format (`cogvlm-chat-hf`) directories: `config.json` plus safetensors weights, one file or shards named by
`model.safetensors.index.json`.

Both layouts store the same tensors as SAT with the same values and shapes (no transposes, fused QKV rows in
the same q | k | v order); only the names differ (models.checkpoint.layout's table), plus the rotary
`inv_freq` buffer, which SAT keeps once and HF once per decoder layer. Tensors are read one at a time.
"""
import json
import logging
import os
from typing import Callable, Dict, Iterable, Iterator, List, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint.atomic import atomic_output_dir
from models.checkpoint.layout import (ROTARY_KEY, mismatch_error, shape_error, split_tensor, summarise,
                                      tensor_table)
from models.checkpoint.sat_format import is_plain_name
from models.config import ROTARY_BASE, CogVLMConfig
from models.errors import CheckpointError, ConfigError
from models.mixin import RotaryEmbedding

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what `transformers` writes by default


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_hf_config(hf_dir: str) -> Tuple[dict, CogVLMConfig]:
    """(the raw config.json, its CogVLMConfig)."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"'{hf_dir}' has no {CONFIG_FILE}; an HF-format CogVLM directory needs config.json "
                              "next to its safetensors files")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    return data, CogVLMConfig.from_hf_dict(data, source=path)


class HFFiles:
    """The safetensors files of an HF directory, opened for reading one tensor at a time.

    Checks up front that every shard the index names exists and holds the tensors the index places in it.
    `shape()` reads only file headers. A shard is unmapped once each of its tensors has been read (and
    mapped again if one is asked for later): the pages of a mapped file count in the process's resident
    memory, and a 35 GB checkpoint read through 18 mappings held open would count them all.
    """

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index_path, single_path = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, WEIGHTS_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index_path} is not a safetensors index (needs a 'weight_map'; {e})") from None
        elif os.path.isfile(single_path):
            weight_map = None
        else:
            found = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".safetensors")))
            hint = (f" (found {', '.join(found[:3])}: only safetensors weights are supported; re-save them with "
                    "safetensors)" if found else "")
            raise CheckpointError(f"'{hf_dir}' has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
        names = [WEIGHTS_FILE] if weight_map is None else sorted(set(map(str, weight_map.values())))
        outside = [name for name in names if not is_plain_name(name)]
        if outside:
            raise CheckpointError(f"{INDEX_FILE} in '{hf_dir}' names the shard '{outside[0][:80]}', which is not a "
                                  "file of that directory (paths are refused); restore the index from the download")
        missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
        if missing:
            raise CheckpointError(f"'{hf_dir}' is missing shard(s) {', '.join(missing)} named in {INDEX_FILE}; "
                                  "the download is incomplete, fetch the missing files")
        self._files = {}
        for name in names:
            path = os.path.join(hf_dir, name)
            try:
                self._files[name] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file is "
                                      "corrupt or incomplete, download it again") from None
        if weight_map is None:
            weight_map = {key: WEIGHTS_FILE for key in self._files[WEIGHTS_FILE].keys()}
        else:
            for name, handle in self._files.items():
                absent = {k for k, f in weight_map.items() if f == name} - set(handle.keys())
                if absent:
                    raise CheckpointError(f"{INDEX_FILE} in '{hf_dir}' places {summarise(absent)} in {name}, which "
                                          "does not hold them; the index and the shards do not belong together")
        self.weight_map: Dict[str, str] = weight_map
        self._unread = {name: set() for name in names}
        for key, name in weight_map.items():
            self._unread[name].add(key)

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._files[self.weight_map[key]].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        if name not in self._files:
            self._files[name] = safe_open(os.path.join(self.dir, name), framework="pt")
        tensor = self._files[name].get_tensor(key)
        self._unread[name].discard(key)
        if not self._unread[name]:
            del self._files[name]
        return tensor


def rotary_inv_freq(config: CogVLMConfig) -> torch.Tensor:
    """The rotary frequency table, for checkpoints that leave it out (it is fixed by the head size)."""
    return RotaryEmbedding(config.head_dim, base=ROTARY_BASE).inv_freq


class HFReader:
    """An HF-format directory read as SAT-layout tensors (same interface as sat_format.SATReader).

    All keys and shapes are checked against the config on opening. The rotary buffer comes from the first
    layer that stores it (all must agree) or is recomputed.
    """
    mp_size = 1
    has_lora = False

    def __init__(self, hf_dir: str, config: CogVLMConfig):
        self.dir, self.config = hf_dir, config
        self.files = HFFiles(hf_dir)
        self.specs = {spec.sat_key: spec for spec in tensor_table(config)}
        self._check_tensors()
        self._hf_key = {}  # SAT key -> HF key (None: the recomputed rotary buffer)
        for spec in self.specs.values():
            stored = [k for k in spec.hf_keys if k in self.files.weight_map]
            self._hf_key[spec.sat_key] = stored[0] if stored else None
            for other in stored[1:]:
                if not torch.equal(self.files.tensor(other), self.files.tensor(stored[0])):
                    raise CheckpointError(f"HF checkpoint '{hf_dir}': {other} differs from {stored[0]}; CogVLM uses "
                                          "one rotary frequency table for all layers")
        self.consumed = set()

    def _check_tensors(self) -> None:
        expected = {hf: spec for spec in self.specs.values() for hf in spec.hf_keys}
        present = set(self.files.keys())
        unknown = present - set(expected)
        missing = {k for k in set(expected) - present if expected[k].sat_key != ROTARY_KEY}
        if unknown or missing:
            raise mismatch_error(f"'{self.dir}'", sorted(missing), sorted(unknown))
        for key in (k for k in expected if k in present):  # table order: the same first error every run
            if self.files.shape(key) != expected[key].shape:
                raise shape_error(f"HF checkpoint '{self.dir}'", key, self.files.shape(key), expected[key].shape)

    @property
    def stored_keys(self) -> List[str]:
        return list(self._hf_key)

    def check_against_config(self) -> None:
        """Done on opening (the HF layout has no finetuning extras)."""

    def tensor(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s part of SAT key `key` split `world_size` ways."""
        self.consumed.add(key)
        hf_key = self._hf_key[key]
        full = rotary_inv_freq(self.config) if hf_key is None else self.files.tensor(hf_key)
        return split_tensor(full, self.specs[key].split, rank, world_size, key)

    def items(self, rank: int = 0, world_size: int = 1, fold_lora: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """(SAT key, this rank's tensor) for every tensor, in table order."""
        for key in self._hf_key:
            yield key, self.tensor(key, rank, world_size)

    def unconsumed(self) -> List[str]:
        return [k for k in self._hf_key if k not in self.consumed]


def write_hf_checkpoint(out_dir: str, config_json: Union[dict, Callable[[], dict]], tensors: Iterable[Tuple[str, torch.Tensor]],
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_files=None) -> List[str]:
    """Write (HF key, tensor) pairs as safetensors shards plus `config_json` into a new directory, atomically.

    One shard is held in memory at a time. A single shard is named model.safetensors; several are named
    model-0000k-of-0000n.safetensors and listed in model.safetensors.index.json. `config_json` may be a
    function, called once the tensors are written (their dtype is known then). `extra_files(tmp_dir)`, if
    given, adds files (e.g. modeling code, a tokenizer) before the directory is renamed into place.
    Returns the weight file names.
    """
    with atomic_output_dir(out_dir) as tmp:
        shard, shard_bytes, written, weight_map, total_bytes = {}, 0, [], {}, 0

        def flush():
            nonlocal shard, shard_bytes
            name = f"shard-{len(written):05d}.tmp"  # final names need the shard count, known only at the end
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
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
            final = {written[0]: WEIGHTS_FILE}
        else:
            final = {name: f"model-{k + 1:05d}-of-{len(written):05d}.safetensors" for k, name in enumerate(written)}
        umask = os.umask(0)
        os.umask(umask)
        for tmp_name, name in final.items():
            os.replace(os.path.join(tmp, tmp_name), os.path.join(tmp, name))
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)  # safetensors creates its files owner-only
        if len(written) > 1:
            index = {"metadata": {"total_size": total_bytes},
                     "weight_map": {key: final[name] for key, name in sorted(weight_map.items())}}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config_json() if callable(config_json) else config_json, f, indent=2, sort_keys=True)
            f.write("\n")
        if extra_files is not None:
            extra_files(tmp)
    return list(final.values())
