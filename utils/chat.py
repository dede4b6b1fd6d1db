"""The one chat/generation core behind the CLI, the web demo and the API server.

`generate_batch_stream` does KV-cached decoding of a batch: one forward over the (left-padded)
prompts, images included, then one token per row per step, with SAT's `BaseStrategy` choosing
tokens (temperature, top-k, top-p, repetition penalty). Keys/values go into a preallocated cache
(models/kv_cache.py); masks and positions are built once for the prompt and each step only appends
one column/position. We drive the steps ourselves rather than through SAT's `filling_sequence`:
that one materialises a (max_length x max_length) mask, copies the whole cache at every step,
handles one sequence at a time and cannot hand tokens out as they come.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from sat.generation.sampling_strategies import BaseStrategy

from models.kv_cache import KVCache, ensure_kv_cache_mixin
from utils.language import history_to_prompt
from utils.vision import load_image

logger = logging.getLogger(__name__)

History = List[Tuple[str, str]]
PROMPT_KEYS = ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask")


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

    @property
    def greedy(self) -> bool:
        """top_k == 1 without a repetition penalty or banned tokens: the next token is the argmax."""
        return self.top_k == 1 and self.repetition_penalty == 1.0 and not self.invalid_slices

    def strategy(self, end_tokens: Sequence[int]) -> BaseStrategy:
        return BaseStrategy(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, invalid_slices=list(self.invalid_slices),
                            end_tokens=list(end_tokens))


def pick_next_tokens(config: GenerationConfig, strategy: BaseStrategy, step_logits: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """Append each row's next token: step_logits (B, vocab) fp32, tokens (B, T) -> (B, T + 1).

    Greedy settings take the argmax directly: SAT's strategy would still softmax, sort for top-p and
    sample, ~6 ms per step for 8 rows x 32000 on CPU, to pick the same token.
    """
    if config.greedy:
        return torch.cat([tokens, step_logits.argmax(-1, keepdim=True)], dim=1)
    return strategy.forward(step_logits, tokens, None)[0]


def ensure_kv_cache(model) -> None:
    """Prepare `model` for cached decoding (idempotent)."""
    ensure_kv_cache_mixin(model)


def _param(model):
    return next(model.parameters())


def vision_inputs_from(image_tensors: Optional[Dict[str, torch.Tensor]], model) -> Dict[str, torch.Tensor]:
    """{'image': ..., ...} from the image processor -> {'vision_image': ...} on the model's device/dtype."""
    if not image_tensors:
        return {}
    param = _param(model)
    return {"images": image_tensors["image"].to(device=param.device, dtype=param.dtype)}


def collate(prompts: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Left-pad text-processor outputs (each (1, L_i)) into one batch.

    Returns input_ids, position_ids, image_embed_mask, vision_expert_mask (B, L), `valid` (B, L)
    bool (False on padding) and attention_mask (B, 1, L, L): causal and blind to padding. Left
    padding puts every row's last token in the last column, so decoding appends in lockstep.
    """
    length = max(p["input_ids"].shape[1] for p in prompts)
    batch = {key: torch.zeros(len(prompts), length, dtype=torch.long) for key in PROMPT_KEYS}
    batch["input_ids"].fill_(pad_token_id)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = prompt["input_ids"].shape[1]
        for key in PROMPT_KEYS:
            batch[key][row, length - n:] = prompt[key][0]
        valid[row, length - n:] = True
    causal = torch.ones(length, length).tril().bool()
    # padding positions attend to themselves only, so that no attention row is empty (NaN-free)
    attend = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
    batch["attention_mask"] = attend[:, None].float()
    batch["valid"] = valid
    return batch


@torch.no_grad()
def generate_batch_stream(model, batch: Dict[str, torch.Tensor], config: GenerationConfig,
                          vision_inputs: Optional[Dict[str, torch.Tensor]] = None,
                          end_token_ids: Sequence[int] = (), pad_token_id: int = 0
                          ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """KV-cached decoding of a batch. Yields (tokens (B,), active (B,) bool) per step.

    batch: `collate` output (or one text-processor output, which is a batch of one). vision_inputs:
    `vision_image` (N, 3, S, S) for the N rows that have an image, in row order. A row stops after an
    end token (yielded, active) or when its own length reaches config.max_length; later steps give
    it `pad_token_id` with active False. The loop ends when every row has stopped.
    """
    ensure_kv_cache(model)
    param = _param(model)
    device, dtype = param.device, param.dtype
    input_ids = batch["input_ids"].to(device)
    batch_size, prompt_length = input_ids.shape
    valid = batch.get("valid", torch.ones(batch_size, prompt_length, dtype=torch.bool)).to(device)
    row_lengths = valid.sum(1)
    if int(row_lengths.min()) >= config.max_length:
        raise ValueError(f"prompt of {int(row_lengths.min())} tokens leaves no room under max_length {config.max_length}")
    max_new_tokens = config.max_length - int(row_lengths.min())
    attention = batch["attention_mask"]
    padded = not bool(valid.all())

    first_layer = model.transformer.layers[0].attention
    cache = KVCache(len(model.transformer.layers), batch_size, first_layer.num_attention_heads_per_partition,
                    prompt_length + max_new_tokens, first_layer.hidden_size_per_attention_head, dtype, device)
    prompt_kwargs = {"vision_expert_mask": batch["vision_expert_mask"].to(device),
                     "image_embed_mask": batch["image_embed_mask"].to(device)}
    if vision_inputs and bool(batch["image_embed_mask"].any()):
        prompt_kwargs.update(vision_inputs)
    logits = model(input_ids=input_ids, position_ids=batch["position_ids"].to(device),
                   attention_mask=attention.to(device=device, dtype=dtype), kv_cache=cache,
                   last_logits_only=True, **prompt_kwargs)[0]
    cache.length = prompt_length

    strategy = config.strategy(end_token_ids)
    end_tokens = torch.tensor(list(end_token_ids) or [-1], device=device)
    next_position = batch["position_ids"][:, -1:].to(device) + 1
    tokens = input_ids
    active = torch.ones(batch_size, dtype=torch.bool, device=device)
    generated = torch.zeros(batch_size, dtype=torch.long, device=device)
    while True:
        tokens = pick_next_tokens(config, strategy, logits[:, -1].float(), tokens)
        new = torch.where(active, tokens[:, -1], torch.full_like(tokens[:, -1], pad_token_id))
        tokens[:, -1] = new
        generated += active.long()
        yield new.cpu(), active.cpu()
        active = active & ~torch.isin(new, end_tokens) & (row_lengths + generated < config.max_length)
        if not bool(active.any()):
            break
        if padded:
            valid = torch.cat([valid, torch.ones(batch_size, 1, dtype=torch.bool, device=device)], dim=1)
            step_mask = valid[:, None, None, :].to(dtype)
        else:  # all ones: SAT's attention takes the fused SDPA path
            step_mask = torch.ones(1, 1, 1, cache.length + 1, device=device, dtype=dtype)
        logits = model(input_ids=new[:, None].to(device), position_ids=next_position, attention_mask=step_mask,
                       kv_cache=cache)[0]
        cache.length += 1
        next_position = next_position + 1
    strategy.finalize(tokens, None)


def generate_stream(model, inputs: Dict[str, torch.Tensor], config: GenerationConfig,
                    vision_inputs: Optional[Dict[str, torch.Tensor]] = None,
                    end_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield the generated token ids of one prompt (a text-processor output) one by one."""
    for tokens, _ in generate_batch_stream(model, inputs, config, vision_inputs, end_token_ids):
        yield int(tokens[0])


def generate_batch(model, prompts: Sequence[Dict[str, torch.Tensor]], config: GenerationConfig,
                   images: Optional[Sequence[Optional[Dict[str, torch.Tensor]]]] = None,
                   end_token_ids: Sequence[int] = (), pad_token_id: int = 0) -> List[List[int]]:
    """Generate for several prompts at once; returns each row's token ids (end token included).

    prompts: text-processor outputs; images: per prompt the image processor's output or None (a
    prompt with an image block needs its image). Greedy results equal one-by-one runs.
    """
    images = list(images) if images is not None else [None] * len(prompts)
    with_image = [img for img, p in zip(images, prompts) if bool(p["image_embed_mask"].any())]
    if len(with_image) != sum(bool(p["image_embed_mask"].any()) for p in prompts) or any(i is None for i in with_image):
        raise ValueError("every prompt with an image block needs its image")
    vision = {}
    if with_image:
        vision = vision_inputs_from({"image": torch.cat([img["image"] for img in with_image])}, model)
    outputs: List[List[int]] = [[] for _ in prompts]
    for tokens, active in generate_batch_stream(model, collate(prompts, pad_token_id), config, vision,
                                                end_token_ids, pad_token_id):
        for row in torch.nonzero(active).flatten().tolist():
            outputs[row].append(int(tokens[row]))
    return outputs


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
