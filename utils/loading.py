"""Flags and loading shared by every inference front end (CLI, web demo, API server).

`add_inference_args` declares the upstream flags once; `load_for_inference` turns them into a
model on the right device/dtype plus the text and image processors, under torchrun too.
"""
import argparse
import logging
import os
from dataclasses import dataclass

import torch

from models.checkpoint import load_model, open_checkpoint
from models.config import dtype_of
from utils.chat import GenerationConfig, ensure_kv_cache
from models.errors import CogVLMError
from utils.language import DEFAULT_TOKENIZER, PROMPT_TEMPLATES, llama2_text_processor_inference, llama2_tokenizer
from utils.vision import get_image_processor

logger = logging.getLogger(__name__)


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--max_length", type=int, default=2048, help="max length of the total sequence")
    parser.add_argument("--top_p", type=float, default=0.4, help="top p for nucleus sampling")
    parser.add_argument("--top_k", type=int, default=1, help="top k for top k sampling")
    parser.add_argument("--temperature", type=float, default=0.8, help="temperature for sampling")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="divide logits of repeated tokens")
    parser.add_argument("--english", action="store_true", help="only output English (the default)")
    parser.add_argument("--chinese", action="store_true", help="Chinese prompts in the interface")
    parser.add_argument("--version", type=str, default="chat", help="prompt template: " + ", ".join(PROMPT_TEMPLATES))
    parser.add_argument("--from_pretrained", type=str, default="cogvlm-chat-v1.1",
                        help="checkpoint directory (SAT or HF format) or name under $SAT_HOME")
    parser.add_argument("--local_tokenizer", type=str, default=DEFAULT_TOKENIZER,
                        help="tokenizer directory (vicuna-7b-v1.5) or hub name")
    parser.add_argument("--no_prompt", action="store_true", help="send the image with an empty query")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--quant", type=int, choices=[4, 8], default=None,
                        help="quantize weights: 8 = int8 on CPU (quantized while loading), 4/8 with SAT's kernels on CUDA")
    return parser


@dataclass
class InferenceBundle:
    model: torch.nn.Module
    model_args: argparse.Namespace
    text_processor: llama2_text_processor_inference
    image_processor: object
    rank: int
    world_size: int

    @property
    def tokenizer(self):
        return self.text_processor.tokenizer


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_length=args.max_length, top_p=args.top_p, top_k=args.top_k,
                            temperature=args.temperature, repetition_penalty=args.repetition_penalty)


def _device(args, local_rank: int) -> str:
    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CogVLMError(f"--device {args.device} asked for, but no CUDA GPU is available; use --device cpu")
        return args.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def load_for_inference(args) -> InferenceBundle:
    """Load the checkpoint, tokenizer and image processor named by the parsed flags."""
    if args.version not in PROMPT_TEMPLATES:
        raise CogVLMError(f"unknown --version '{args.version}'; choose one of {', '.join(PROMPT_TEMPLATES)}")
    if args.fp16 and args.bf16:
        raise CogVLMError("--fp16 and --bf16 are exclusive; pick one")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(args, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if args.fp16 and device == "cpu":
        logger.warning("--fp16 on CPU is slow and loses precision; --bf16 or fp32 (no flag) is better there")

    checkpoint = open_checkpoint(args.from_pretrained)
    # under torchrun each process loads its model-parallel share, from a checkpoint saved for any split
    model, model_args = load_model(checkpoint, device=device, dtype=dtype_of(args), quant=getattr(args, "quant", None),
                                   rank=rank, world_size=world_size)
    ensure_kv_cache(model)

    tokenizer = llama2_tokenizer(args.local_tokenizer, signal_type=args.version)
    if len(tokenizer) > model_args.vocab_size:
        raise CogVLMError(f"tokenizer {args.local_tokenizer} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"is {model_args.vocab_size}; pass the tokenizer that belongs to this checkpoint")
    text_processor = llama2_text_processor_inference(tokenizer, args.max_length, model.image_length)
    image_processor = get_image_processor(model_args.eva_args["image_size"][0])
    return InferenceBundle(model, model_args, text_processor, image_processor, rank, world_size)
