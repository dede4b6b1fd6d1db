"""What every front end shares: one loaded model with its processor and defaults (the flags: utils/cli.py).

    parser = add_inference_args(argparse.ArgumentParser())      # utils.cli
    pipeline = load_pipeline(parser.parse_args())
    conversation = pipeline.conversation(image)
    for delta in pipeline.chat(conversation, "What is in the image?"):
        ...

The CLI, web demo, API server, evaluation, batch inference and the bench use it. Under torchrun each
process holds its model-parallel share (models.checkpoint.load_model); sampling stays in step across ranks
because every rank draws from a generator seeded alike.
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from models.checkpoint import Checkpoint, load_model, open_checkpoint
from models.errors import CogVLMError
from models.templates import DEFAULT_TEMPLATE, get_template
from utils.chat import ChatStream
from utils.cli import resolve_max_length
from utils.conversation import Conversation
from utils.generation import ensure_kv_cache
from utils.generation_config import MAX_SEED, GenerationConfig
from utils.language import DEFAULT_TOKENIZER, llama2_tokenizer
from utils.processor import CogVLMProcessor

logger = logging.getLogger(__name__)
DEFAULTS = GenerationConfig()


def dtype_from_args(args) -> torch.dtype:
    if args.fp16 and args.bf16:
        raise CogVLMError("--fp16 and --bf16 are exclusive; pick one")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def generation_config(args, **overrides) -> GenerationConfig:
    """The flags' decoding settings (validated: a bad flag is a one-line error)."""
    max_length = DEFAULTS.max_length if args.max_length is None else args.max_length  # 0 is an error, not a default
    config = GenerationConfig(max_length=max_length, top_p=args.top_p,
                              top_k=args.top_k, temperature=args.temperature,
                              repetition_penalty=args.repetition_penalty)
    return config.replace(**overrides).validate()


@dataclass
class InferencePipeline:
    """A loaded checkpoint ready to answer: model, processor, template, decoding defaults, and this process's
    place under torchrun (rank, world_size). `generator` draws sampled tokens unless a request brings a seed."""
    model: torch.nn.Module
    checkpoint: Checkpoint
    processor: CogVLMProcessor
    template: str
    defaults: GenerationConfig
    rank: int = 0
    world_size: int = 1
    generator: Optional[torch.Generator] = None
    no_prompt: bool = False

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def grounding(self) -> bool:
        return self.checkpoint.grounding

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def conversation(self, image: Optional[Image.Image] = None) -> Conversation:
        return Conversation(self.template, image, no_prompt=self.no_prompt)

    def chat(self, conversation: Conversation, query: str, config: Optional[GenerationConfig] = None,
             engine=None) -> ChatStream:
        """A turn of `conversation` (default settings: the flags'), generated on `engine` (a utils.engine.Engine)
        when given. Bad input raises CogVLMError here."""
        config = config or self.defaults
        generator = None if config.seed is not None else self.generator
        return ChatStream(self.model, self.processor, conversation, query, config, generator, engine)


def _device(requested: Optional[str], local_rank: int) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CogVLMError(f"--device {requested} asked for, but no CUDA GPU is available; use --device cpu")
        return requested
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _shared_seed(world_size: int) -> int:
    """A seed drawn by rank 0 and known to every rank (all ranks must sample the same tokens)."""
    seed = [int(torch.randint(0, MAX_SEED, (1,)).item())]
    if world_size > 1:
        torch.distributed.broadcast_object_list(seed, src=0)  # any backend (NCCL needs no CPU tensor)
    return seed[0]


def load_pipeline(args) -> InferencePipeline:
    """Load the checkpoint, tokenizer and processor the parsed flags name (the checkpoint's own tokenizer and
    template when the flags leave them out)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = _device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = dtype_from_args(args)
    if dtype == torch.float16 and device == "cpu":
        logger.warning("--fp16 on CPU is slow and loses precision; --bf16 or fp32 (no flag) is better there")
    defaults = generation_config(args)  # bad flags fail before the model loads
    if args.version is not None:
        get_template(args.version)
    checkpoint = open_checkpoint(args.from_pretrained, local_files_only=args.local_files_only)
    max_length = resolve_max_length(args.max_length, checkpoint.config.max_sequence_length)
    # top_k is checked against the vocabulary now that it is known
    defaults = defaults.replace(max_length=max_length).validate(checkpoint.config.vocab_size)
    template = args.version or checkpoint.template or DEFAULT_TEMPLATE
    tokenizer_path = args.local_tokenizer or checkpoint.tokenizer_dir or DEFAULT_TOKENIZER
    tokenizer = llama2_tokenizer(tokenizer_path, signal_type=template, local_files_only=args.local_files_only)
    vocab_size = checkpoint.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise CogVLMError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"is {vocab_size}; pass the tokenizer that belongs to this checkpoint")
    # under torchrun each process loads its model-parallel share, from a checkpoint saved for any split
    model, _ = load_model(checkpoint, device=device, dtype=dtype, quant=args.quant, rank=rank, world_size=world_size,
                          pack=True)
    ensure_kv_cache(model)
    vision = checkpoint.config.vision
    processor = CogVLMProcessor(tokenizer, vision.image_size, checkpoint.config.image_length, defaults.max_length)
    generator = torch.Generator().manual_seed(_shared_seed(world_size))
    logger.info("serving %s: template %s, tokenizer %s, max_length %d", checkpoint.path, template, tokenizer_path,
                defaults.max_length)
    return InferencePipeline(model, checkpoint, processor, template, defaults, rank, world_size, generator,
                             no_prompt=args.no_prompt)

