"""What every entry script shares, light enough to run before the model code loads: the flags (declared once),
logging, the world-size guard, and one way to end: an `error: ...` line for bad input, a clean stop with exit
status 130 / 143 on Ctrl-C / SIGTERM.

    parser = argparse.ArgumentParser(description="...")
    add_inference_args(parser)
    args = parser.parse_args(argv)     # --help and flag errors: no SAT, no model code imported
    setup_logging(args.verbose)
    return run_main(lambda: serve(args))

An entry script imports the model layers (utils.pipeline, utils.engine, ...) inside its main, after parsing:
importing SAT and DeepSpeed takes seconds that `--help` should not cost.
"""
import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Callable, Optional

import models
from models.errors import CogVLMError
from models.releases import DEFAULT_CHECKPOINT, RELEASED_CHECKPOINTS, RELEASED_TOKENIZER
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_NAMES
from utils.generation_config import GenerationConfig

DEFAULTS = GenerationConfig()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Flags ---------------------------------------------------------------------------------------

def add_verbose_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' start-up lines (SAT, DeepSpeed) and debug messages")
    return parser


def add_precision_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--fp16 / --bf16 (exclusive, checked by utils.pipeline.dtype_from_args; neither: fp32)."""
    parser.add_argument("--fp16", action="store_true", help="float16 weights")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    return parser


def add_max_length_arg(parser: argparse.ArgumentParser,
                       what: str = "max length of the total sequence") -> argparse.ArgumentParser:
    """--max_length: tokens of a whole sequence, prompt (image included) plus answer; None until
    `resolve_max_length` knows the model's positions."""
    parser.add_argument("--max_length", type=int, default=None,
                        help=f"{what}, prompt (image included) plus answer (default {DEFAULTS.max_length}, or the "
                             "model's position count if smaller)")
    return parser


def resolve_max_length(max_length: Optional[int], positions: int) -> int:
    """--max_length for a model built for `positions` positions: its default when not given (capped to the
    positions); more than the positions is refused."""
    if max_length is not None and max_length > positions:
        raise CogVLMError(f"--max_length {max_length} exceeds the {positions} positions the model was built for; "
                          f"use at most {positions}")
    return min(DEFAULTS.max_length, positions) if max_length is None else max_length


def add_template_arg(parser: argparse.ArgumentParser, what: str = "prompt template", default: Optional[str] = None,
                     default_text: str = f"the checkpoint's, else {DEFAULT_TEMPLATE}") -> argparse.ArgumentParser:
    """--version (upstream's name of the prompt template). An unknown name is refused as the other bad inputs
    are, by models.templates.get_template once the script runs (one `error:` line)."""
    parser.add_argument("--version", type=str, default=default, metavar="{" + ",".join(TEMPLATE_NAMES) + "}",
                        help=f"{what}: {', '.join(TEMPLATE_NAMES)} (default: {default or default_text})")
    return parser


def add_checkpoint_arg(parser: argparse.ArgumentParser, default: str = DEFAULT_CHECKPOINT,
                       formats: str = "SAT or HF format") -> argparse.ArgumentParser:
    example = RELEASED_CHECKPOINTS[DEFAULT_CHECKPOINT].hf_repo
    hub = f", or hub repo id in HF format ({example})" if "HF" in formats else ""
    parser.add_argument("--from_pretrained", type=str, default=default,
                        help=f"checkpoint directory ({formats}) or name under $SAT_HOME (a released one is downloaded "
                             f"when missing){hub}; default %(default)s")
    return parser


def add_tokenizer_arg(parser: argparse.ArgumentParser, default: Optional[str] = None) -> argparse.ArgumentParser:
    parser.add_argument("--local_tokenizer", type=str, default=default,
                        help="tokenizer directory or hub name (default: " + (default or (
                            f"the checkpoint's own tokenizer/ folder, else {RELEASED_TOKENIZER}'s from the hub")) + ")")
    return parser


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The upstream inference flags, declared once for every front end (and --verbose)."""
    add_max_length_arg(parser)
    parser.add_argument("--top_p", type=float, default=DEFAULTS.top_p, help="top p for nucleus sampling, in (0, 1]")
    parser.add_argument("--top_k", type=int, default=DEFAULTS.top_k,
                        help="top k for top k sampling (1: greedy, 0: no cut)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help="temperature for sampling (0: greedy)")
    parser.add_argument("--repetition_penalty", type=float, default=DEFAULTS.repetition_penalty,
                        help="divide logits of repeated tokens (1: none)")
    language = parser.add_mutually_exclusive_group()
    language.add_argument("--english", dest="language", action="store_const", const="english",
                          help="English interface texts (the default)")
    language.add_argument("--chinese", dest="language", action="store_const", const="chinese",
                          help="Chinese interface texts")
    parser.set_defaults(language="english")
    add_template_arg(parser)
    add_checkpoint_arg(parser)
    parser.add_argument("--local_files_only", action="store_true",
                        help="never download: the checkpoint and a tokenizer given by hub name come only from disk "
                             "and the HF cache")
    add_tokenizer_arg(parser)
    parser.add_argument("--no_prompt", action="store_true",
                        help="send the image alone, without template, history or question (as upstream)")
    add_precision_args(parser)
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--quant", type=int, default=None,
                        help="quantize the weights while the checkpoint loads: 8 = int8 (a scale per output "
                             "channel), 4 = int4 weight-only (a scale per group of inputs); torch's kernels on CPU, "
                             "SAT's on CUDA")
    return add_verbose_arg(parser)


# Logging -------------------------------------------------------------------------------------

def process_rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", 0))


def setup_logging(verbose: bool = False) -> None:
    """INFO lines with time and logger on rank 0; other torchrun ranks log errors only (every rank runs the
    same steps: one voice is enough). SAT's start-up lines (models/__init__.py) show with `verbose`."""
    level = logging.DEBUG if verbose else logging.INFO
    if process_rank() != 0:
        level = logging.ERROR
        os.environ["SAT_LOGLEVEL"] = "ERROR"  # read when SAT is first imported
    logging.basicConfig(level=level, format=LOG_FORMAT)
    sat = logging.getLogger("sat")
    sat.propagate = False  # SAT logs through its own handler
    if process_rank() != 0:
        sat.setLevel(logging.ERROR)
    if verbose:
        sat.removeFilter(models.SAT_NOISE_FILTER)


# Ending: errors and signals ------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; exit_code is the shell's 128 + signal number (130, 143). A BaseException,
    as KeyboardInterrupt is, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_interrupted(signum, frame):
    for stop_signal in STOP_SIGNALS:  # a second signal while the work is flushed ends the process at once
        signal.signal(stop_signal, signal.SIG_DFL)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM raise Interrupted in the main thread for the block (the earlier handlers are put
    back after it); calling the yielded `install` again re-takes them from a library that set its own."""
    previous = {stop_signal: signal.getsignal(stop_signal) for stop_signal in STOP_SIGNALS}

    def install():
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, _raise_interrupted)

    install()
    try:
        yield install
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def run_main(body: Callable[[], int], on_interrupt: Optional[Callable[[Interrupted], str]] = None) -> int:
    """body() with the entry scripts' ending: its exit status; a CogVLMError is one `error: ...` line (naming
    the rank under torchrun) and status 1; SIGINT / SIGTERM stop it (body's `finally` blocks run, so that its
    engine and files close) with one line (on_interrupt's, else 'interrupted') and status 130 / 143."""
    try:
        with stop_on_signals():
            return body()
    except CogVLMError as e:
        rank = process_rank()
        print(f"error (rank {rank}): {e}" if rank else f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(on_interrupt(stop) if on_interrupt else f"interrupted ({stop})", file=sys.stderr)
        return stop.exit_code


def single_process(program: str, hint: str = "") -> None:
    """Refuse to run under torchrun (CogVLMError): `program` serves from one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise CogVLMError(f"{program} runs as one process; start it with python, not torchrun{hint}")
