"""Merge a model-parallel and/or LoRA CogVLM checkpoint into one unsplit checkpoint, or split one.

    # after finetuning with MP_SIZE=4 (LoRA is folded into the base weights)
    torchrun --standalone --nnodes=1 --nproc-per-node=4 merge_model.py --version base --bf16 \
        --from_pretrained ./checkpoints/finetune-cogvlm-... --save ./checkpoints/merged_model
    # prepare shards for `torchrun --nproc-per-node=2 cli_demo.py ...` once
    python merge_model.py --from_pretrained cogvlm-chat-v1.1 --model_parallel_size 2 --save ./cogvlm-chat-mp2

This is a file conversion: one process streams the memory-mapped input shards tensor by tensor and
holds at most one output shard (the whole model when merging) plus one tensor. Started under
torchrun, rank 0 converts and the other ranks exit at once.
"""
import argparse
import logging
import os

from utils.cli import add_checkpoint_arg, add_precision_args, add_template_arg, add_verbose_arg, run_main, setup_logging

logger = logging.getLogger("merge_model")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Merge (or split) a model-parallel / LoRA CogVLM SAT checkpoint")
    add_checkpoint_arg(parser, default="checkpoints/merged_lora", formats="SAT format")
    parser.add_argument("--local_files_only", action="store_true",
                        help="never download the checkpoint: use only what is on disk and in the HF cache")
    parser.add_argument("--save", type=str, default="checkpoints/merged_model", help="output checkpoint directory")
    parser.add_argument("--model_parallel_size", type=int, default=1,
                        help="shards to write: 1 merges (default), N splits for N processes")
    add_precision_args(parser)  # here: the dtype float tensors are written in (neither: as stored)
    add_template_arg(parser, "the prompt template the merged model names as its default, which the front ends then "
                             "use", default_text="the source's")
    add_verbose_arg(parser)
    return parser.parse_args(argv)


def convert(args) -> list:
    # the checkpoint layer loads here, after the flags: it imports SAT, which takes seconds (utils/cli.py)
    from models.checkpoint import open_checkpoint, reshard_checkpoint
    from models.errors import CogVLMError
    from models.templates import get_template
    from utils.pipeline import dtype_from_args

    dtype = dtype_from_args(args) if args.fp16 or args.bf16 else None
    if args.model_parallel_size < 1:
        raise CogVLMError(f"--model_parallel_size must be >= 1, got {args.model_parallel_size}")
    if args.version is not None:
        get_template(args.version)
    checkpoint = open_checkpoint(args.from_pretrained, local_files_only=args.local_files_only)
    if os.path.abspath(args.save) == os.path.abspath(checkpoint.path):
        raise CogVLMError("--save must differ from --from_pretrained (the input is read while the output is written)")
    return reshard_checkpoint(checkpoint, args.save, args.model_parallel_size, dtype, template=args.version)


def merge(args) -> int:
    files = convert(args)
    print(f"saved {args.save} ({len(files)} model-parallel shard(s))")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        logger.info("rank %d: nothing to do, rank 0 converts the checkpoint", rank)
        return 0
    return run_main(lambda: merge(args))


if __name__ == "__main__":
    raise SystemExit(main())
