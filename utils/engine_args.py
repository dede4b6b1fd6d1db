"""`EngineArgs`: how the serving engine (utils/engine.py) is sized, in one typed place with its defaults, its
checks and its flags (vLLM's EngineArgs). Light (no torch, no model code), so that a front end parses and
checks its flags before the model code loads.

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    engine_args = EngineArgs.from_cli_args(parser.parse_args())   # CogVLMError on a bad value
    engine = Engine(model, max_length, **engine_args.engine_kwargs())
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from models.errors import CogVLMError

# the prefix cache's default budget, as a share of the engine's KV memory (max_batch_size x max_length)
DEFAULT_PREFIX_CACHE_SHARE = 0.25


@dataclass(frozen=True)
class EngineArgs:
    """max_batch_size: KV rows, i.e. requests generating at once; max_waiting: requests that may wait for a
    row (more are refused); prefix_cache_gb: memory for kept prefixes and image embeddings (None: the default
    share of the KV memory; 0: off); request_timeout: seconds a request may take from arrival (None: no limit).
    """
    max_batch_size: int = 8
    max_waiting: int = 64
    prefix_cache_gb: Optional[float] = None
    request_timeout: Optional[float] = None

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise CogVLMError(f"--max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_waiting < 0:
            raise CogVLMError(f"--max_waiting must be 0 or more, got {self.max_waiting}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise CogVLMError(f"--request_timeout must be a positive number of seconds, got {self.request_timeout}")
        if self.prefix_cache_gb is not None and not (self.prefix_cache_gb >= 0 and math.isfinite(self.prefix_cache_gb)):
            raise CogVLMError(f"--prefix_cache_gb must be 0 (off) or a positive number of GB, "
                              f"got {self.prefix_cache_gb}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, timeout: bool = True, batching: bool = True):
        """--max_batch_size, --max_waiting, --prefix_cache_gb and, with `timeout`, --request_timeout. batching
        False (one conversation at a time: the CLI): --prefix_cache_gb only."""
        if batching:
            parser.add_argument("--max_batch_size", type=int, default=EngineArgs.max_batch_size,
                                help="requests generated at once (KV memory for this many x --max_length positions)")
            parser.add_argument("--max_waiting", type=int, default=EngineArgs.max_waiting,
                                help="requests that may wait for a free batch row; more are refused (HTTP 429)")
        parser.add_argument("--prefix_cache_gb", type=float, default=None,
                            help="memory for the keys/values of finished requests, reused by requests that start "
                                 "alike (a chat's history, the same image), and recent image embeddings (default: "
                                 f"{DEFAULT_PREFIX_CACHE_SHARE * 100:.0f}%% of the KV memory, at least one "
                                 "--max_length row; 0: off)")
        if timeout:
            parser.add_argument("--request_timeout", type=float, default=None,
                                help="seconds a request may take from arrival, waiting included (default: no limit)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The flags `add_cli_args` declared (without the batching ones: one row, nothing waiting), checked."""
        return cls(max_batch_size=getattr(args, "max_batch_size", 1), max_waiting=getattr(args, "max_waiting", 0),
                   prefix_cache_gb=args.prefix_cache_gb, request_timeout=getattr(args, "request_timeout", None))

    def engine_kwargs(self) -> dict:
        """The Engine's sizing keywords (the timeout is the caller's, per request)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "request_timeout"}
