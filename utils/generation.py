"""Decoding settings, their validation, per-row sampling, and KV-cached batch generation.

`GenerationConfig` is the only home of the sampling defaults (the front ends' flags read them). A batch may
mix rows with different settings: `Sampler` picks every row's next token with that row's temperature /
top-k / top-p / repetition penalty and its own random generator, so a seeded row gives the same tokens
whatever else runs beside it. `generate_batch_stream` decodes a (left-padded) batch: one forward over the
prompts, images included, then one token per row per step into a preallocated cache (models/kv_cache.py).
We drive the steps ourselves rather than through SAT's `filling_sequence`: that one materialises a
(max_length x max_length) mask, copies the whole cache at every step, handles one sequence at a time and
cannot hand tokens out as they come.
"""
import logging
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from sat import mpu

from models.config import EOS_ID
from models.kv_cache import KVCache, ensure_kv_cache_mixin
from models.kernels.quantization import has_low_bit_weights
from utils.generation_config import MAX_SEED, GenerationConfig

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask")


def new_generator(seed: Optional[int] = None) -> torch.Generator:
    """A CPU random generator, seeded by `seed` or, for None, from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(0, MAX_SEED, (1,)).item())
    return torch.Generator().manual_seed(seed)


class Sampler:
    """Each row's next token under that row's settings: `next_tokens(logits (B, V), generated)` -> (B,).

    Sampling math runs in float64 with the maximum subtracted before the temperature, so extreme settings
    (a temperature of 1e-40, a penalty of 1e-300) stay finite instead of turning into NaN.
    """

    def __init__(self, configs: Sequence[GenerationConfig], generators: Sequence[Optional[torch.Generator]]):
        self.configs = list(configs)
        self.generators = [g if g is not None or c.greedy else new_generator(c.seed) for c, g in zip(configs, generators)]

    def next_tokens(self, logits: torch.Tensor, generated: Sequence[Sequence[int]]) -> torch.Tensor:
        """logits (B, vocab), float; generated: each row's tokens so far (for the repetition penalty) -> (B,)."""
        if all(c.greedy and c.repetition_penalty == 1.0 and not c.invalid_slices for c in self.configs):
            return logits.argmax(-1)  # the common case, without a per-row loop
        return torch.stack([self._pick(row, logits[row], generated[row]) for row in range(logits.shape[0])])

    def _pick(self, row: int, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        config = self.configs[row]
        scores = logits.to(torch.float64)
        if config.repetition_penalty != 1.0 and len(generated):
            seen = torch.tensor(sorted(set(generated)), device=scores.device)
            previous = scores[seen]
            penalty = config.repetition_penalty
            scores[seen] = torch.where(previous > 0, previous / penalty, previous * penalty).clamp(-1e300, 1e300)
        for invalid in config.invalid_slices:
            scores[invalid] = -math.inf
        if config.greedy:
            return scores.argmax()
        scores = (scores - scores.max()) / config.temperature
        if 0 < config.top_k < scores.shape[0]:
            cut = torch.topk(scores, config.top_k).values[-1]
            scores = scores.masked_fill(scores < cut, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        if config.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            beyond = sorted_probs.cumsum(0) - sorted_probs >= config.top_p  # keep the smallest set reaching top_p
            probs = probs.index_put((order[beyond],), torch.zeros((), dtype=probs.dtype, device=probs.device))
        return torch.multinomial(probs.cpu(), 1, generator=self.generators[row]).to(logits.device)[0]


def _same_on_every_rank(tokens: torch.Tensor) -> torch.Tensor:
    """Under model parallelism every rank must feed the same tokens: rank 0's choice wins (as SAT's sampler
    does). The ranks' logits and generators agree already; this keeps them in step whatever happens."""
    if torch.distributed.is_initialized() and mpu.model_parallel_is_initialized() \
            and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, mpu.get_model_parallel_src_rank(), group=mpu.get_model_parallel_group())
    return tokens


def ensure_kv_cache(model) -> None:
    """Prepare `model` for cached decoding (idempotent)."""
    ensure_kv_cache_mixin(model)


def collate(prompts: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Left-pad processor outputs (each (1, L_i)) into one batch.

    Returns input_ids, position_ids, image_embed_mask, vision_expert_mask (B, L), `valid` (B, L) bool (False on
    padding), attention_mask (B, 1, L, L) causal and blind to padding, and `images` (N, 3, S, S) of the rows
    that carry one, in row order. Left padding puts every row's last token in the last column, so decoding
    appends in lockstep.
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
    images = [p["images"] for p in prompts if p.get("images") is not None]
    if images:
        batch["images"] = torch.cat(images)
    return batch


def _check_images(batch: Dict[str, torch.Tensor]) -> None:
    rows_with_image = int(batch["image_embed_mask"].any(dim=1).sum())
    given = 0 if batch.get("images") is None else batch["images"].shape[0]
    if rows_with_image != given:
        raise ValueError(f"{rows_with_image} prompt(s) have an image block but {given} image(s) were given: every "
                         "prompt with an image needs its image")


@torch.no_grad()
def generate_batch_stream(model, batch: Dict[str, torch.Tensor], configs, generators=None,
                          eos_token_id: int = EOS_ID, pad_token_id: int = 0
                          ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """KV-cached decoding of a batch. Yields (tokens (B,), active (B,) bool) per step.

    batch: `collate` output (or one processor output, a batch of one), with `images` for the rows that have
    an image block. configs: one GenerationConfig for all rows or one per row; generators: per row (None:
    seeded from the config's seed, else from torch's global generator). A row stops after one of its end
    tokens (yielded, active), at its max_new_tokens, or when its own length reaches its max_length; later
    steps give it `pad_token_id` with active False. The loop ends when every row has stopped.
    """
    ensure_kv_cache(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    input_ids = batch["input_ids"].to(device)
    batch_size, prompt_length = input_ids.shape
    configs = list(configs) if isinstance(configs, (list, tuple)) else [configs] * batch_size
    sampler = Sampler(configs, list(generators) if generators is not None else [None] * batch_size)
    valid = batch.get("valid", torch.ones(batch_size, prompt_length, dtype=torch.bool)).to(device)
    row_lengths = valid.sum(1).tolist()
    budgets = [config.answer_budget(length) for config, length in zip(configs, row_lengths)]
    end_tokens = [set(c.end_tokens(eos_token_id)) for c in configs]
    padded = not bool(valid.all())

    first_layer = model.transformer.layers[0].attention
    cache = KVCache(len(model.transformer.layers), batch_size, first_layer.num_attention_heads_per_partition,
                    prompt_length + max(budgets), first_layer.hidden_size_per_attention_head, dtype, device,
                    low_bit_weights=has_low_bit_weights(model))
    prompt_kwargs = {"vision_expert_mask": batch["vision_expert_mask"].to(device),
                     "image_embed_mask": batch["image_embed_mask"].to(device)}
    if bool(batch["image_embed_mask"].any()):
        _check_images(batch)
        prompt_kwargs["images"] = batch["images"].to(device=device, dtype=dtype)
    logits = model(input_ids=input_ids, position_ids=batch["position_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device=device, dtype=dtype), kv_cache=cache,
                   last_logits_only=True, **prompt_kwargs)[0]
    cache.length = prompt_length

    next_position = batch["position_ids"][:, -1:].to(device) + 1
    active = [True] * batch_size
    generated: List[List[int]] = [[] for _ in range(batch_size)]
    while True:
        picked = _same_on_every_rank(sampler.next_tokens(logits[:, -1].float(), generated)).tolist()
        new = [token if alive else pad_token_id for token, alive in zip(picked, active)]
        for row in range(batch_size):
            if active[row]:
                generated[row].append(new[row])
        yield torch.tensor(new), torch.tensor(active)
        active = [alive and token not in ends and len(done) < budget
                  for alive, token, ends, done, budget in zip(active, new, end_tokens, generated, budgets)]
        if not any(active):
            break
        if padded:
            valid = torch.cat([valid, torch.ones(batch_size, 1, dtype=torch.bool, device=device)], dim=1)
            step_mask = valid[:, None, None, :].to(dtype)
        else:  # all ones: SAT's attention takes the fused SDPA path
            step_mask = torch.ones(1, 1, 1, cache.length + 1, device=device, dtype=dtype)
        logits = model(input_ids=torch.tensor(new, device=device)[:, None], position_ids=next_position,
                       attention_mask=step_mask, kv_cache=cache)[0]
        cache.length += 1
        next_position = next_position + 1


def generate_stream(model, inputs: Dict[str, torch.Tensor], config: GenerationConfig,
                    generator: Optional[torch.Generator] = None, eos_token_id: int = EOS_ID) -> Iterator[int]:
    """Yield the generated token ids of one prompt (a processor output, `images` included) one by one."""
    for tokens, _ in generate_batch_stream(model, inputs, config, [generator], eos_token_id):
        yield int(tokens[0])


def generate_batch(model, prompts: Sequence[Dict[str, torch.Tensor]], config, images=None,
                   eos_token_id: int = EOS_ID, pad_token_id: int = 0) -> List[List[int]]:
    """Generate for several prompts at once; returns each row's token ids (end token included).

    prompts: processor outputs (with their `images`), or text-processor outputs with `images` given apart:
    per prompt the image processor's output or None. config: one for all rows or one per row. Greedy
    results equal one-by-one runs.
    """
    if images is not None:
        prompts = [dict(p, images=img["image"]) if img is not None else p for p, img in zip(prompts, images)]
    outputs: List[List[int]] = [[] for _ in prompts]
    for tokens, active in generate_batch_stream(model, collate(prompts, pad_token_id), config,
                                                eos_token_id=eos_token_id, pad_token_id=pad_token_id):
        for row in torch.nonzero(active).flatten().tolist():
            outputs[row].append(int(tokens[row]))
    return outputs
