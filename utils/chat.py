"""The one chat/generation core behind the CLI, the web demo and the API server.

`generate_stream` does KV-cached decoding: one full forward over the prompt (image included),
then one token per step through SAT's `CachedAutoregressiveMixin` cache, with SAT's
`BaseStrategy` choosing tokens (temperature, top-k, top-p, repetition penalty, end tokens).
Masks and positions are built once for the prompt; each step only appends one position.

We drive the steps ourselves rather than through SAT's `filling_sequence`, because that one
materialises a (max_length x max_length) mask up front and cannot hand tokens out as they come.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from sat.generation.autoregressive_sampling import update_mems
from sat.generation.sampling_strategies import BaseStrategy
from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin

from utils.language import history_to_prompt
from utils.vision import load_image

logger = logging.getLogger(__name__)

History = List[Tuple[str, str]]


@dataclass
class GenerationConfig:
    """Decoding settings. max_length is the total sequence length (prompt + answer), as upstream."""
    max_length: int = 2048
    top_p: float = 0.4
    top_k: int = 1
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    invalid_slices: Sequence[slice] = field(default_factory=list)
    end_token_ids: Optional[Sequence[int]] = None  # None: the tokenizer's eos

    def strategy(self, end_tokens: Sequence[int]) -> BaseStrategy:
        return BaseStrategy(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, invalid_slices=list(self.invalid_slices),
                            end_tokens=list(end_tokens))


def ensure_kv_cache(model) -> None:
    """Add SAT's KV-cache mixin once (upstream scripts added it by hand after loading)."""
    if "auto-regressive" not in model.mixins:
        model.add_mixin("auto-regressive", CachedAutoregressiveMixin())


def _param(model):
    return next(model.parameters())


def vision_inputs_from(image_tensors: Optional[Dict[str, torch.Tensor]], model) -> Dict[str, torch.Tensor]:
    """{'image': ..., ...} from the image processor -> {'vision_image': ...} on the model's device/dtype."""
    if not image_tensors:
        return {}
    param = _param(model)
    out = {}
    for key, value in image_tensors.items():
        if value is None:
            continue
        value = value.to(param.device)
        if value.is_floating_point():
            value = value.to(param.dtype)
        out["vision_" + key] = value
    return out


@torch.no_grad()
def generate_stream(model, inputs: Dict[str, torch.Tensor], config: GenerationConfig,
                    vision_inputs: Optional[Dict[str, torch.Tensor]] = None,
                    end_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids one by one (batch of one).

    inputs: the text processor's output: input_ids, position_ids, image_embed_mask,
    vision_expert_mask (1, L) and attention_mask (1, 1, L, L). Stops after an end token (which
    is yielded) or when the sequence reaches config.max_length.
    """
    ensure_kv_cache(model)
    param = _param(model)
    device = param.device
    tokens = inputs["input_ids"].to(device)
    position_ids = inputs["position_ids"].to(device)
    prompt_kwargs = {"vision_expert_mask": inputs["vision_expert_mask"].to(device),
                     "image_embed_mask": inputs["image_embed_mask"].to(device)}
    if vision_inputs and bool(inputs["image_embed_mask"].any()):
        prompt_kwargs.update(vision_inputs)
    strategy = config.strategy(end_token_ids)

    logits, *layer_outputs = model(input_ids=tokens, position_ids=position_ids,
                                   attention_mask=inputs["attention_mask"].to(device=device, dtype=param.dtype),
                                   mems=None, **prompt_kwargs)
    mems = None
    next_position = position_ids[:, -1:] + 1
    while True:
        mems = update_mems([out["mem_kv"] for out in layer_outputs], mems, max_memory_length=10**9)
        tokens, mems = strategy.forward(logits[:, -1], tokens, mems)
        yield int(tokens[0, -1])
        if strategy.is_done or tokens.shape[1] >= config.max_length:
            break
        # one new token attends to everything cached: a (1, 1, 1, n) all-ones mask
        logits, *layer_outputs = model(input_ids=tokens[:, -1:], position_ids=next_position,
                                       attention_mask=torch.ones(1, 1, 1, tokens.shape[1], device=device,
                                                                 dtype=param.dtype),
                                       mems=mems)
        next_position = next_position + 1
    strategy.finalize(tokens, mems)


def prepare_image(image_path: Optional[str], img_processor, image=None):
    """Resolve the image of a turn: a cached (tensors, PIL) pair, or one loaded from path/URL.

    Returns (image_tensors or None, pil_image or None).
    """
    if image is not None:
        return image
    if image_path:
        pil_image = load_image(image_path)
        return img_processor(pil_image), pil_image
    return None, None


class ChatStream:
    """One chat turn, streamed. Iterate for text deltas; afterwards `response`, `history`,
    `image` (the (tensors, PIL) pair to pass to the next turn) and `token_ids` hold the result.

    Input errors (image, prompt length) raise in the constructor, before any compute.
    """

    def __init__(self, image_path, model, text_processor, img_processor, query: str,
                 history: Optional[History] = None, image=None, config: Optional[GenerationConfig] = None,
                 no_prompt: bool = False):
        self.model = model
        self.text_processor = text_processor
        self.tokenizer = text_processor.tokenizer
        self.config = config or GenerationConfig()
        self.query = "" if no_prompt else query
        self.previous_history = list(history or [])
        image_tensors, pil_image = prepare_image(image_path, img_processor, image)
        self.image = (image_tensors, pil_image)
        prompt = history_to_prompt(text_processor.signal_type, self.query, self.previous_history,
                                   with_image=image_tensors is not None)
        self.inputs = text_processor(prompt)
        self.vision_inputs = vision_inputs_from(image_tensors, model)
        end_ids = self.config.end_token_ids
        self.end_token_ids = [self.tokenizer.eos_token_id] if end_ids is None else list(end_ids)
        self.token_ids: List[int] = []
        self.response: Optional[str] = None
        self.history: Optional[History] = None

    @property
    def prompt_length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def _answer_ids(self) -> List[int]:
        return [t for t in self.token_ids if t not in self.end_token_ids]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __iter__(self) -> Iterator[str]:
        # Incremental detokenisation: decode a short window before and after the new token, so
        # that SentencePiece's leading-space handling and multi-byte characters come out right.
        prefix_offset = read_offset = 0
        for token in generate_stream(self.model, self.inputs, self.config, self.vision_inputs, self.end_token_ids):
            self.token_ids.append(token)
            ids = self._answer_ids()
            prefix_text = self._decode(ids[prefix_offset:read_offset])
            new_text = self._decode(ids[prefix_offset:])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                yield new_text[len(prefix_text):]
                prefix_offset, read_offset = read_offset, len(ids)
        self.response = self.text_processor.process_response(self._decode(self._answer_ids()))
        self.history = self.previous_history + [(self.query, self.response)]


def chat(image_path, model, text_processor, img_processor, query: str, history: Optional[History] = None,
         image=None, max_length: int = 2048, top_p: float = 0.4, top_k: int = 1, temperature: float = 0.8,
         repetition_penalty: float = 1.0, invalid_slices: Sequence[slice] = (), no_prompt: bool = False,
         args=None, end_token_ids: Optional[Sequence[int]] = None,
         on_text: Optional[Callable[[str], None]] = None):
    """Answer `query` about the image at `image_path` (or the cached `image`), given `history`.

    The upstream API: returns (response, history + [(query, response)], (image_tensors, pil_image)).
    `on_text` receives the answer's text as it is generated.
    """
    config = GenerationConfig(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                              repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices or ()),
                              end_token_ids=end_token_ids)
    stream = ChatStream(image_path, model, text_processor, img_processor, query, history=history, image=image,
                        config=config, no_prompt=no_prompt)
    for delta in stream:
        if on_text is not None:
            on_text(delta)
    return stream.response, stream.history, stream.image
