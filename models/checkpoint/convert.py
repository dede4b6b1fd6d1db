"""Checkpoint conversions: SAT <-> HF (`cogvlm-chat-hf`), and SAT model-parallel resharding (merge N -> 1 with
LoRA folded, or split 1 -> N). Lossless: tensors keep their dtype and bits unless a dtype is asked for.

Memory: tensors stream one at a time from memory-mapped SAT files or per-tensor safetensors reads; a SAT
output holds one shard's state dict (torch.save writes a whole dict), an HF output one safetensors shard.
Config and weights are checked against each other before anything is written; outputs appear atomically.
"""
import logging
import re
from typing import List, Optional, Union

import torch
from tqdm import tqdm

from models.checkpoint.atomic import check_new_output_dir
from models.checkpoint.directory import Checkpoint, open_checkpoint
from models.checkpoint.hf_format import DEFAULT_MAX_SHARD_BYTES, write_hf_checkpoint
from models.checkpoint.layout import LORA_MARKERS, PTUNING_PREFIX, ROTARY_KEY, check_divisible, summarise, tensor_table
from models.checkpoint.sat_format import write_sat_checkpoint
from models.config import TEMPLATE_VERSIONS
from models.errors import CheckpointError

logger = logging.getLogger(__name__)


def parse_size(text) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise CheckpointError(f"cannot read the size '{text}'; write it like 5GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def _opened(source: Union[str, Checkpoint]) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source)


def _refuse_finetuning_state(keys, source: str) -> None:
    """The HF layout has no place for unmerged LoRA or P-tuning prefixes."""
    lora = [k for k in keys if any(m in k for m in LORA_MARKERS)]
    if lora:
        raise CheckpointError(f"{source} holds unmerged LoRA weights ({summarise(lora, 2)}); merge them into the base "
                              "weights first (merge_model.py) and convert the merged checkpoint")
    ptuning = [k for k in keys if k.startswith(PTUNING_PREFIX)]
    if ptuning:
        raise CheckpointError(f"{source} holds P-tuning prefixes ({summarise(ptuning, 2)}), which the HF layout "
                              "cannot hold; finetune with LoRA (and merge it) to export to HF")


def convert_sat_to_hf(source: Union[str, Checkpoint], out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      template_version: Optional[str] = None, extra_files=None) -> List[str]:
    """SAT checkpoint (any model-parallel size, LoRA merged) -> new HF-format directory. Returns the weight files.

    template_version: config.json's (default: the checkpoint's, else chat). extra_files(dir): adds files
    (modeling code, tokenizer) before the output appears."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "sat":
        raise CheckpointError(f"{checkpoint.path} is already in HF format")
    if template_version is not None and template_version not in TEMPLATE_VERSIONS:
        raise CheckpointError(f"unknown template version '{template_version}'; choose one of "
                              f"{', '.join(TEMPLATE_VERSIONS)}")
    reader = checkpoint.reader()
    _refuse_finetuning_state(reader.stored_keys, f"checkpoint {checkpoint.path}")
    reader.check_against_config()
    unknown = set(reader.stored_keys) - {spec.sat_key for spec in tensor_table(checkpoint.config)}
    if unknown:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds tensors CogVLM does not have ({summarise(unknown)})")
    specs = tensor_table(checkpoint.config)
    dtypes = set()

    def hf_tensors():
        for spec in tqdm(specs, desc="SAT -> HF", unit="tensor"):
            tensor = reader.tensor(spec.sat_key)
            if spec.sat_key != ROTARY_KEY:  # the fixed fp32 rotary buffer does not say what the weights are
                dtypes.add(tensor.dtype)
            for hf_key in spec.hf_keys:
                yield hf_key, tensor

    def config_json():
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return checkpoint.config.to_hf_dict(dtype, template_version)

    files = write_hf_checkpoint(out_dir, config_json, hf_tensors(), max_shard_bytes, extra_files=extra_files)
    logger.info("wrote %s (%d weight file(s)) from %s", out_dir, len(files), checkpoint.path)
    return files


def convert_hf_to_sat(source: Union[str, Checkpoint], out_dir: str) -> str:
    """HF-format directory -> new SAT checkpoint (model-parallel size 1). Returns the written .pt file."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "hf":
        raise CheckpointError(f"{checkpoint.path} is already in SAT format")
    reader = checkpoint.reader()
    state_dict = dict(tqdm(reader.items(), total=len(reader.stored_keys), desc="HF -> SAT", unit="tensor"))
    path = write_sat_checkpoint(out_dir, checkpoint.config.replace(model_parallel_size=1), [state_dict])[0]
    logger.info("wrote %s from %s", path, checkpoint.path)
    return path


def reshard_checkpoint(source: Union[str, Checkpoint], out_dir: str, model_parallel_size: int = 1,
                       dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write the SAT checkpoint `source` to `out_dir` split `model_parallel_size` ways (1: merged), with any LoRA
    folded into the base weights. dtype: cast floating-point tensors (None keeps them). Returns the files."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "sat":
        raise CheckpointError(f"{checkpoint.path} is an HF-format checkpoint; convert it to SAT first "
                              "(scripts/convert_checkpoint.py) or load it directly")
    if model_parallel_size < 1:
        raise CheckpointError(f"model_parallel_size must be >= 1, got {model_parallel_size}")
    config = checkpoint.config
    check_divisible(config, model_parallel_size)
    reader = checkpoint.reader()
    reader.check_against_config()
    keys = reader.folded_keys()
    for key in keys:  # every tensor has a split rule, before anything is written
        if model_parallel_size != reader.mp_size:
            reader.split_of(key)
    out_config = config.replace(model_parallel_size=model_parallel_size)
    if reader.has_lora:
        out_config = out_config.without_lora()

    def shards():
        for rank in range(model_parallel_size):
            yield {key: reader.tensor(key, rank, model_parallel_size)
                   for key in tqdm(keys, desc=f"rank {rank} of {model_parallel_size}", disable=len(keys) < 200)}

    return write_sat_checkpoint(out_dir, out_config, shards(), dtype=dtype)
