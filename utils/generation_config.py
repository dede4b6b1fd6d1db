"""`GenerationConfig`: the decoding settings of one request, validated once with the same rules for the CLI,
web demo, API and batch script. Light (no torch, no model code), so that the flags can show its defaults
before the model code loads (utils/cli.py)."""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from models.errors import PromptError, SamplingError

MAX_SEED = 2**63 - 1


def answer_budget(prompt_length: int, max_length: int, max_new_tokens: Optional[int] = None) -> int:
    """The tokens an answer may have after a `prompt_length`-token prompt (image block included) under a total
    of `max_length` positions, capped by `max_new_tokens`. The one rule of whether a prompt fits: raises
    PromptError when it leaves no room to answer."""
    room = max_length - prompt_length
    if room < 1:
        raise PromptError(f"prompt is {prompt_length} tokens (image included) but --max_length is {max_length}, "
                          "which leaves no room to answer; raise --max_length or shorten the prompt, or clear "
                          "the conversation history")
    return min(room, max_new_tokens or room)


@dataclass
class GenerationConfig:
    """Decoding settings of one request. max_length is the total sequence length (prompt + answer), as
    upstream; max_new_tokens (optional) caps the answer too.

    temperature 0 or top_k 1: greedy (the argmax, after the repetition penalty). top_k 0: no top-k cut.
    end_token_ids None: the tokenizer's eos. seed: the request's own random generator (None: the caller's).
    """
    max_length: int = 2048
    top_p: float = 0.4
    top_k: int = 1
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    invalid_slices: Sequence[slice] = field(default_factory=list)
    end_token_ids: Optional[Sequence[int]] = None
    max_new_tokens: Optional[int] = None
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    def answer_budget(self, prompt_length: int, max_length: Optional[int] = None) -> int:
        """`answer_budget` under these settings, max_length capped to `max_length` (an engine's rows)."""
        limit = self.max_length if max_length is None else min(self.max_length, max_length)
        return answer_budget(prompt_length, limit, self.max_new_tokens)

    def end_tokens(self, eos_token_id: int) -> List[int]:
        """The ids that end an answer: end_token_ids, or the tokenizer's `eos_token_id`."""
        return [eos_token_id] if self.end_token_ids is None else list(self.end_token_ids)

    def validate(self, vocab_size: Optional[int] = None) -> "GenerationConfig":
        """Raise SamplingError naming the first bad setting (the same rules for the CLI, web demo and API)."""
        def bad(name, value, rule):
            raise SamplingError(f"{name} must be {rule}, got {value!r}", param=name)

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "a finite number")
            return value

        if number("temperature") < 0:
            bad("temperature", self.temperature, ">= 0 (0 = greedy)")
        if not 0 < number("top_p") <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0 (1 = no penalty)")
        top_k = self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0 or (vocab_size and top_k > vocab_size):
            bad("top_k", top_k, f"an integer from 0 to the vocabulary size{f' {vocab_size}' if vocab_size else ''} "
                                "(0 = no top-k cut, 1 = greedy)")
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                bad(name, value, "a positive integer")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            bad("seed", seed, f"an integer from 0 to {MAX_SEED}")
        return self
