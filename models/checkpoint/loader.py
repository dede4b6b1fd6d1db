"""`load_model`: build a CogVLM for this process and load its weights from any checkpoint. Every front end,
finetuning, merging, conversion checks and the bench come through here.

One process with a checkpoint saved for one reads it as stored (a LoRA checkpoint loads into a model with
its LoRA layers). Under torchrun each of the `world_size` processes builds its model-parallel share and
reads only that from the memory-mapped files, whatever split the checkpoint was saved with (LoRA is then
folded into the weights: SAT's LoRA layers are not correct under model parallelism). Nothing is
communicated. We do not use SAT's `from_pretrained(overwrite_args={'model_parallel_size': N})`: it moves
every shard with `.cuda()` (no CPU / gloo), has rank 0 hold the full model next to its shard, cannot load an
N-way checkpoint on another number of ranks, and ignores LoRA.

Tensors reach `model.load_state_dict` in groups of at most LOAD_GROUP_BYTES, so that layers with their own
loading rules (SAT's LoRA wrappers, int8 layers that quantize what they are handed) apply, and memory holds
the model plus one group: after each group, the group's file pages and the heap's free memory are given
back (memory.py).
"""
import argparse
import logging
from typing import Optional, Sequence, Tuple, Union

import torch

from sat import mpu
from sat.model.base_model import get_model

from models.checkpoint.directory import Checkpoint, open_checkpoint
from models.checkpoint.layout import (check_divisible, is_finetune_parameter, mismatch_error, shape_error,
                                      split_shape, tensor_table)
from models.checkpoint.memory import release_consumed
from models.cogvlm_model import INFERENCE_CLASSES, CogVLMModel
from models.config import CogVLMConfig, dtype_of, runtime_args
from models.errors import CheckpointError
from models.kernels.packed import pack_linears
from models.kernels.quantization import quantize_model

logger = logging.getLogger(__name__)

LOAD_GROUP_BYTES = 1 << 30


def model_class_for(config: CogVLMConfig):
    """The class that loads `config`'s checkpoint for inference (its `model_class`, finetuned or not)."""
    if config.model_class not in INFERENCE_CLASSES:
        raise CheckpointError(f"model_class {config.model_class!r} is not one this toolkit builds "
                              f"({', '.join(INFERENCE_CLASSES)})")
    return INFERENCE_CLASSES[config.model_class]


@torch.no_grad()
def load_weights(model: torch.nn.Module, checkpoint: Checkpoint, rank: int = 0, world_size: int = 1,
                 finetune_may_be_missing: bool = False) -> None:
    """Copy this rank's part of every tensor of `checkpoint` into `model` (built for `world_size` ranks).

    Raises CheckpointError naming the tensors on missing, unexpected or misshapen ones.
    finetune_may_be_missing: the model's LoRA / P-tuning parameters may be absent from the checkpoint (a
    finetuning run starting from a base model keeps their initialisation).
    """
    reader = checkpoint.reader()
    reader.check_against_config()
    fold_lora = world_size > 1
    expected = {spec.sat_key: split_shape(spec.shape, spec.split, world_size) for spec in tensor_table(checkpoint.config)}
    missing: Optional[set] = None
    unexpected = []

    def load_group(group):
        nonlocal missing
        try:
            result = model.load_state_dict(group, strict=False)
        except RuntimeError as e:  # size mismatches of tensors outside the table (e.g. LoRA matrices)
            raise CheckpointError(f"checkpoint {checkpoint.path} does not fit the model: "
                                  f"{str(e).splitlines()[-1].strip()}") from None
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        unexpected.extend(result.unexpected_keys)
        release_consumed(group.values())  # copied or quantized: their file pages and scratch memory can go

    group, group_bytes = {}, 0
    for key, tensor in reader.items(rank, world_size, fold_lora=fold_lora):
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise shape_error(checkpoint.path, key, tensor.shape, expected[key])
        group[key] = tensor
        group_bytes += tensor.numel() * tensor.element_size()
        if group_bytes >= LOAD_GROUP_BYTES:
            load_group(group)
            group, group_bytes = {}, 0
    if group or missing is None:
        load_group(group)
    missing = [k for k in missing if not (finetune_may_be_missing and is_finetune_parameter(k))]
    unexpected += reader.unconsumed() if fold_lora else []
    if missing or unexpected:
        raise mismatch_error(checkpoint.path, missing, unexpected)
    logger.info("loaded %s (%s format, saved for %d rank(s)) as rank %d of %d%s", checkpoint.path, checkpoint.format,
                checkpoint.config.model_parallel_size, rank, world_size,
                "; LoRA folded into the weights" if fold_lora and reader.has_lora else "")


def load_model(source: Union[str, Checkpoint], *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               quant: Optional[int] = None, rank: Optional[int] = None, world_size: int = 1,
               args: Optional[argparse.Namespace] = None, model_class=None, build_only: bool = False,
               overwrite: Optional[dict] = None, pack: bool = False) -> Tuple[CogVLMModel, argparse.Namespace]:
    """Build the model of checkpoint `source` (a directory, a released name, or an opened Checkpoint) for rank
    `rank` of a `world_size`-way model-parallel group (rank None: this process's, which SAT's model-parallel
    setup knows once the model is built), and load its weights.

    dtype: parameter dtype. quant: 4 or 8 bits (models.kernels.quantization): on CPU the layers quantize while the
    checkpoint streams in, so the float weights are never all in memory; on CUDA after loading. pack (CPU
    inference without quant, one process): the float linear weights are stored in oneDNN's layout as they
    load (models.kernels.packed: faster products, no float `weight` in the state dict; what the
    front ends run). args: SAT args to build on instead of `runtime_args(device, dtype, ...)` (a finetuning
    run passes its own).
    model_class: the class to build (default: the checkpoint's, for inference). overwrite: config fields to
    change (e.g. finetuning flags). Returns (model, SAT args); `model.config` is its CogVLMConfig.
    """
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    config = checkpoint.config.replace(model_parallel_size=world_size)
    if overwrite:
        finetune = {k: v for k, v in overwrite.items() if k not in config.__dataclass_fields__}
        known = {k: v for k, v in overwrite.items() if k in config.__dataclass_fields__}
        config = config.replace(**known, finetune={**config.finetune, **finetune})
    if world_size > 1:
        check_divisible(config, world_size)
        config = config.without_lora()
    runtime = args if args is not None else runtime_args(device, dtype, rank=rank or 0, world_size=world_size)
    sat_args = config.sat_args(runtime)
    model = get_model(sat_args, model_class or model_class_for(config))
    model.config = config
    if rank is None:
        rank = mpu.get_model_parallel_rank() if world_size > 1 else 0
    on_cuda = str(sat_args.device).startswith("cuda")
    mode = getattr(sat_args, "mode", "inference")
    if quant and not on_cuda and not build_only:
        quantize_model(model, quant, weights_loaded=False)
    elif pack and not on_cuda and not build_only and mode == "inference":  # one process only (pack_linears)
        pack_linears(model, weights_loaded=False)
    if not build_only:
        load_weights(model, checkpoint, rank, world_size,
                     finetune_may_be_missing=mode != "inference")
        if mode == "inference":
            model.eval()
    if quant and on_cuda:
        model = quantize_model(model, quant)
    return model, sat_args


def from_pretrained(cls, name, args=None, *, home_path=None, url=None, prefix="", build_only=False,
                    use_node_group=True, overwrite_args=None, **kwargs):
    """`CogVLMModel.from_pretrained(name, args, overwrite_args=...)` with SAT's signature: `args` carries the
    runtime (device, fp16 / bf16, mode, distribution); returns (model, args with the checkpoint's config in it).

    name: a checkpoint directory, or a name under `home_path` (default $SAT_HOME; a released name is
    downloaded there when missing). overwrite_args: config fields to change; its `model_parallel_size` is the
    split to build (each rank reads its share from the files, so SAT's `use_node_group` rank-0 broadcast has
    nothing to choose). SAT's other arguments have no meaning for these checkpoints and are refused
    (CheckpointError naming them): a download `url` (released names come from the hub repo; HF_ENDPOINT
    sets a mirror), a key `prefix`, constructor keywords.
    """
    refused = [f"{key}=" for key in kwargs]
    if url is not None:
        refused.append("url= (released names download from the hub; set HF_ENDPOINT for a mirror)")
    if prefix:
        refused.append("prefix= (CogVLM checkpoints load whole)")
    if not use_node_group:
        refused.append("use_node_group=False (every rank reads its own share; nothing is broadcast)")
    if refused:
        raise CheckpointError(f"from_pretrained does not use {'; '.join(refused)}; leave them out")
    args = runtime_args() if args is None else argparse.Namespace(**vars(args))
    overwrite = dict(overwrite_args or {})
    world_size = int(getattr(args, "model_parallel_size", 1) or 1)
    if "model_parallel_size" in overwrite:
        split = int(overwrite.pop("model_parallel_size"))
        if hasattr(args, "model_parallel_size") and int(args.model_parallel_size or 1) not in (1, split):
            raise CheckpointError(f"args.model_parallel_size is {args.model_parallel_size} but overwrite_args asks "
                                  f"for {split}; give one split (the number of processes)")
        world_size = args.model_parallel_size = split
    source = open_checkpoint(name, home=home_path) if home_path is not None else name
    return load_model(source, dtype=dtype_of(args), args=args, model_class=cls, world_size=world_size,
                      build_only=build_only, overwrite=overwrite)


def install_upstream_api() -> None:
    """Give the network classes the upstream `from_pretrained`, implemented here (see CogVLMModel)."""
    CogVLMModel.checkpoint_loader = classmethod(from_pretrained)
