"""Tokenizer and the text processor that lays out CogVLM's inputs (the prompt templates: models.templates).

Token layout of an image prompt (image_length = L patches):

    [bos] [boi] [patch x L] [eoi] [text ...]
      0     1     2 .. 2      3    4, 5, ...     <- position_ids: all patches share one position

`image_embed_mask` marks boi + patches + eoi (their embeddings come from the image),
`vision_expert_mask` marks boi + patches (they use the visual-expert weights), and
`image_rope_mask` marks the patches. Text-only prompts are [bos] [text ...] with zero masks.
"""
import logging
import os
import socket
import urllib.parse
from typing import Dict, List, Sequence, Tuple

import torch

from models.checkpoint.download import hub_endpoint, is_offline
from models.inputs import rope_position_ids
from models.errors import PromptError, TokenizerError
from models.releases import RELEASED_TOKENIZER
from models.templates import DEFAULT_TEMPLATE, IMAGE_MARKER, get_template, render
from utils.generation_config import answer_budget

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = RELEASED_TOKENIZER  # when neither the flags nor the checkpoint give one


# Tokenizer ---------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub ($HF_ENDPOINT, default https://huggingface.co) accepts a connection."""
    endpoint = urllib.parse.urlsplit(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def llama2_tokenizer(tokenizer_path: str = DEFAULT_TOKENIZER, signal_type: str = "base",
                     local_files_only: bool = False):
    """Load the Vicuna/LLaMA tokenizer from a local directory or a hub name; `signal_type` (upstream's name)
    is the prompt template, kept on the tokenizer as `tokenizer.signal_type`.

    A hub name is looked up in the local HF cache first; when it is not cached and the hub cannot be
    reached (or `local_files_only` / HF_HUB_OFFLINE forbid asking it), a TokenizerError says to pass
    --local_tokenizer (instead of minutes of retries).
    """
    from transformers import LlamaTokenizer

    get_template(signal_type)
    if os.path.isdir(tokenizer_path):
        try:
            tokenizer = LlamaTokenizer.from_pretrained(tokenizer_path)
        except Exception as e:
            raise TokenizerError(f"cannot load a LLaMA tokenizer from {tokenizer_path} ({type(e).__name__}: "
                                 f"{str(e)[:150]}); pass --local_tokenizer a directory with tokenizer.model") from None
    else:
        try:
            tokenizer = LlamaTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            if len(tokenizer) <= 3:
                raise FileNotFoundError(tokenizer_path)
        except Exception:
            offline = is_offline(local_files_only)
            if offline or not _hub_reachable():
                raise TokenizerError(f"tokenizer '{tokenizer_path}' is not a local directory, not in the HF cache, and "
                                     f"the hub is {'not to be asked (offline)' if offline else 'unreachable'}; pass --local_tokenizer "
                                     "/path/to/vicuna-7b-v1.5") from None
            try:
                tokenizer = LlamaTokenizer.from_pretrained(tokenizer_path)
            except Exception as e:
                raise TokenizerError(f"cannot load tokenizer '{tokenizer_path}' ({type(e).__name__}); "
                                     "pass --local_tokenizer /path/to/vicuna-7b-v1.5") from None
    # transformers 5 returns an empty tokenizer (3 special tokens) when it finds no vocabulary files
    if len(tokenizer) <= 3 or not tokenizer.encode("hello", add_special_tokens=False):
        raise TokenizerError(f"no tokenizer vocabulary found at '{tokenizer_path}' (expected tokenizer.model or "
                             "tokenizer.json); pass --local_tokenizer /path/to/vicuna-7b-v1.5")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.unk_token_id
    tokenizer.signal_type = signal_type
    return tokenizer


# Inputs ------------------------------------------------------------------------------------

class llama2_text_processor_inference:  # noqa: N801 (upstream name, kept for ported scripts)
    """Turns a prompt string into model inputs (each (1, L), attention_mask (1, 1, L, L)), with upstream's
    methods and attributes (`history_to_prompt(history, query)`, `sep`, `invalid_slices`, `get_func`,
    `process_response`). A prompt with the image marker `<EOI>` gets the image block there; one without it
    is text only (upstream supported image prompts only).

    max_target_length (upstream's name) is the total sequence budget (prompt + generated tokens), `--max_length`.
    `template` is the prompt template (models.templates), the tokenizer's `signal_type`; `signal_type` is
    upstream's name for it.
    """

    def __init__(self, tokenizer, max_target_length: int = 2048, image_length: int = 256):
        self.tokenizer = tokenizer
        self.max_target_length = max_target_length
        self.image_length = image_length
        self.template = getattr(tokenizer, "signal_type", DEFAULT_TEMPLATE)
        self.invalid_slices: List[slice] = []  # token ranges never sampled: none for these vocabularies

    @property
    def signal_type(self) -> str:
        return self.template

    @signal_type.setter
    def signal_type(self, template: str) -> None:
        self.template = template

    @property
    def sep(self) -> str:
        """What the answer follows in a decoded prompt + answer ('<unk>' for the base template, as upstream)."""
        return get_template(self.template).answer_separator or "<unk>"

    def history_to_prompt(self, history: Sequence[Tuple[str, str]], query: str) -> str:
        """Upstream's argument order: earlier (question, answer) turns first, then the new question."""
        if isinstance(history, str):
            raise PromptError("history_to_prompt takes (history, query), in upstream's order; the history "
                              "is a list of (question, answer) pairs")
        return render(self.template, query, history, with_image=True)

    def get_func(self, inputs=None, **kwargs):
        """For SAT's filling_sequence (`get_masks_and_position_ids=`): a function of the whole sequence (n,)
        -> (tokens (1, n), causal attention_mask (1, 1, n, n), position_ids (1, n)); the prompt's positions
        come from `image_rope_mask` (1, L) in kwargs, generated tokens continue the count."""
        if "image_rope_mask" not in kwargs:
            raise PromptError("get_func needs image_rope_mask=, as the processor returns it: "
                              "text_processor.get_func(input_ids, **inputs)")
        prompt_positions = rope_position_ids(kwargs["image_rope_mask"])[0]

        def masks_and_positions(seq: torch.Tensor):
            length = seq.shape[0]
            generated = prompt_positions[-1] + torch.arange(1, max(length - len(prompt_positions), 0) + 1)
            positions = torch.cat([prompt_positions, generated])[:length].to(seq.device)
            mask = torch.ones(1, 1, length, length, device=seq.device).tril()
            return seq.unsqueeze(0), mask, positions.unsqueeze(0)
        return masks_and_positions

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def __call__(self, prompt: str = "") -> Dict[str, torch.Tensor]:
        with_image = IMAGE_MARKER in prompt
        before, _, after = prompt.partition(IMAGE_MARKER) if with_image else ("", "", prompt)
        bos = [self.tokenizer.bos_token_id]
        prefix = bos + self.encode(before)
        image_block = [0] * (self.image_length + 2) if with_image else []
        input_ids = prefix + image_block + self.encode(after)
        answer_budget(len(input_ids), self.max_target_length)  # raises when the prompt does not fit
        length = len(input_ids)
        image_embed_mask = torch.zeros(1, length, dtype=torch.long)
        vision_expert_mask = torch.zeros(1, length, dtype=torch.long)
        image_rope_mask = torch.zeros(1, length, dtype=torch.long)
        if with_image:
            start = len(prefix)  # boi
            image_embed_mask[0, start:start + self.image_length + 2] = 1
            vision_expert_mask[0, start:start + self.image_length + 1] = 1
            image_rope_mask[0, start + 1:start + self.image_length + 1] = 1
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": rope_position_ids(image_rope_mask),
            "attention_mask": torch.ones(1, 1, length, length).tril(),
            "image_embed_mask": image_embed_mask,
            "vision_expert_mask": vision_expert_mask,
            "image_rope_mask": image_rope_mask,
        }

    def process_response(self, response: str) -> str:
        """The answer as shown: without `</s>`, stripped."""
        return response.replace("</s>", "").strip()
