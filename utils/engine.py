"""The serving engine: continuous batching of independent requests on one model.

    engine = Engine(model, max_length=2048, max_batch_size=8, max_waiting=64)
    request = engine.submit(processor(conversation, query), config)   # processor output, image included
    for token in request:           # or, in asyncio: `while (token := await request.get()) is not None`
        ...
    request.finish_reason           # "stop", "length", "cancelled", "timeout" or "error"

One thread (the scheduling loop) owns the model. Between two model steps it drops the requests that were
cancelled or passed their deadline, prefills the waiting requests that fit into free rows of the KV memory
(all that fit, in arrival order, in one batched forward), then decodes one token for every running row.
So a new request waits for at most one decode step before its prefill, and the running rows wait for at
most one prefill group between two of their tokens. A row leaves when it emits an end token or reaches its
token budget, or at the next step boundary after a cancel or its deadline; its row is reused by the next
prefill. Every request keeps its own GenerationConfig and random generator (utils.generation.Sampler), so
a seeded request draws the same tokens whatever else runs beside it.

KV memory: a fixed budget of max_batch_size rows x max_length positions (models.kv_cache.SlotKVCache);
a request waits while every row is taken; at most max_waiting requests wait, more are refused (QueueFull).
The running rows stay packed in rows 0..n-1 (a leaving row's place is filled by moving the last row), so
a decode step attends over plain views of the cache.

Prefix reuse (utils.prefix_cache): the keys and values a request computed (its prompt after the prefill, then
prompt and answer when it leaves) are kept, up to `prefix_cache_gb`, in a radix tree keyed by content (token
ids, positions, the image's pixel hash). A new request whose prompt starts with a kept sequence (a chat's
earlier turns, another question about the same image) gets that prefix copied into its row and prefills only
the rest, at least its last token (whose logits give the first answer token). The ViT + adapter output of
recent images is kept too (an eighth of the budget), so an image whose keys were evicted is not encoded again.
Every prefill attends over the keys and values as the cache holds them (bf16 for int8 / int4 models on CPU,
models.kv_cache.cache_dtype), as decoding does, so a prompt whose prefix is reused gets the answer it gets
afresh (tests/test_prefix_cache.py).
"""
import collections
import functools
import logging
import threading
import time
from typing import Deque, Dict, List, Optional

import torch

from models.config import EOS_ID
from models.kv_cache import SlotKVCache
from models.kernels.quantization import has_low_bit_weights
from utils.engine_args import DEFAULT_PREFIX_CACHE_SHARE, EngineArgs
from utils.engine_request import EngineError, QueueFull, Request
from utils.generation import PROMPT_KEYS, Sampler, collate, ensure_kv_cache, new_generator
from utils.generation_config import GenerationConfig
from utils.prefix_cache import ImageEmbeddingCache, PrefixCache, PromptKey

__all__ = ["Engine", "EngineError", "QueueFull", "Request", "engine_for"]

logger = logging.getLogger(__name__)

IMAGE_CACHE_SHARE = 1 / 8  # of the prefix cache's budget: the image embeddings (the rest holds keys/values)
GB = 1e9


class Engine:
    """Continuous batching on `model` (a CogVLMModel) by one scheduling thread, started here.

    max_length: positions per KV row (prompt + answer; requests are capped to it); max_batch_size: KV rows,
    i.e. requests generating at once; max_waiting: requests that may wait for a row (more: QueueFull);
    max_prefill_batch: prompts prefilled in one forward (default max_batch_size). prefix_cache_gb: memory for
    the kept prefixes and image embeddings (see the module doc; None: DEFAULT_PREFIX_CACHE_SHARE of the KV
    memory, at least one row's: a whole conversation; 0: nothing is kept).
    """

    def __init__(self, model, max_length: int, max_batch_size: int = EngineArgs.max_batch_size,
                 max_waiting: int = EngineArgs.max_waiting, eos_token_id: int = EOS_ID, pad_token_id: int = 0,
                 max_prefill_batch: Optional[int] = None, prefix_cache_gb: Optional[float] = None):
        EngineArgs(max_batch_size, max_waiting, prefix_cache_gb)  # refuses bad sizes
        ensure_kv_cache(model)
        self.model, self.max_length, self.max_batch_size, self.max_waiting = model, max_length, max_batch_size, max_waiting
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.max_prefill_batch = max_prefill_batch or max_batch_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        attention = model.transformer.layers[0].attention
        self.cache = SlotKVCache(len(model.transformer.layers), max_batch_size,
                                 attention.num_attention_heads_per_partition, max_length,
                                 attention.hidden_size_per_attention_head, self.dtype, self.device,
                                 low_bit_weights=has_low_bit_weights(model))
        logger.info("engine: %d rows x %d positions of KV memory (%.2f GB)", max_batch_size, max_length,
                    self.cache.nbytes() / GB)
        row_bytes = self.cache.nbytes() // max_batch_size
        budget = (max(self.cache.nbytes() * DEFAULT_PREFIX_CACHE_SHARE, row_bytes) if prefix_cache_gb is None
                  else prefix_cache_gb * GB)
        self.prefix_cache: Optional[PrefixCache] = None
        self.image_cache: Optional[ImageEmbeddingCache] = None
        if budget > 0:
            self.prefix_cache = PrefixCache(budget * (1 - IMAGE_CACHE_SHARE), self.cache.position_bytes())
            self.image_cache = ImageEmbeddingCache(budget * IMAGE_CACHE_SHARE)
            logger.info("engine: prefix cache of %.2f GB (%d positions), image embeddings %.2f GB", budget / GB,
                        self.prefix_cache.capacity_bytes // self.cache.position_bytes(), budget * IMAGE_CACHE_SHARE / GB)
        self._waiting: Deque[Request] = collections.deque()
        self._rows: List[Request] = []  # the running requests; request i holds KV row i
        self._lock = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps so far
        self._thread = threading.Thread(target=self._run, name="cogvlm-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_full(self) -> bool:
        """Whether a new request would be refused: max_waiting requests wait beyond the free rows (those
        are taken at the next step)."""
        return len(self._waiting) + 1 - (self.max_batch_size - len(self._rows)) > self.max_waiting

    def submit(self, inputs: Dict[str, torch.Tensor], config: GenerationConfig,
               generator: Optional[torch.Generator] = None, timeout: Optional[float] = None) -> Request:
        """Queue a processor output (`images` included when it has an image block) for generation.

        config: its settings (end_token_ids None: eos; max_length is capped to the engine's). generator: the
        sampled tokens' random generator (None: one seeded by config.seed, else a fresh random one).
        timeout: seconds from now after which it is dropped, waiting or running. Raises QueueFull when
        max_waiting requests wait already, PromptError when the prompt leaves no room to answer.
        """
        return self.submit_many([(inputs, config, generator)], timeout)[0]

    def submit_many(self, items, timeout: Optional[float] = None) -> List[Request]:
        """Queue several (inputs, config, generator) at once: all or none (QueueFull); those that fit into
        free rows are prefilled together."""
        requests = [self._request(inputs, config, generator, timeout) for inputs, config, generator in items]
        with self._lock:
            if self._closed:
                raise EngineError("the engine has stopped")
            free_rows = self.max_batch_size - len(self._rows)  # taken at the next step: not waiting
            if len(self._waiting) + len(requests) - free_rows > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model; retry later")
            self._waiting.extend(requests)
            self._lock.notify()
        return requests

    def _request(self, inputs, config: GenerationConfig, generator, timeout) -> Request:
        if bool(inputs["image_embed_mask"].any()) != (inputs.get("images") is not None):
            raise ValueError("a prompt with an image block needs its `images` (and one without, none)")
        budget = config.answer_budget(inputs["input_ids"].shape[1], self.max_length)
        if generator is None and not config.greedy:
            generator = new_generator(config.seed)
        deadline = None if timeout is None else time.monotonic() + timeout
        key = PromptKey.of(inputs) if self.prefix_cache is not None else None  # here, not in the engine's thread
        return Request(inputs, config, generator, deadline, config.end_tokens(self.eos_token_id), budget, key)

    def close(self, timeout: float = 30) -> None:
        """Stop the loop after its current step; unfinished requests end as cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)
        cache = self.prefix_cache
        if cache is not None and cache.queries:
            logger.info("prefix cache: %d of %d prompts reused a prefix, %d of %d prompt positions (%.0f%%)", cache.hits,
                        cache.queries, cache.hit_positions, cache.query_positions,
                        100 * cache.hit_positions / max(1, cache.query_positions))

    # the scheduling loop ------------------------------------------------------------------------

    def _run(self) -> None:
        if self.device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(self.device)
        with torch.no_grad():  # grad mode is per thread too
            while self._wait_for_work():
                self._drop_expired()
                try:
                    self._prefill()
                    if self._rows:
                        self._decode()
                except Exception as error:  # noqa: BLE001 - the loop must survive one failed step
                    logger.exception("engine step failed; its requests end with an error")
                    self._fail_all(error)
        with self._lock:
            pending = list(self._waiting) + self._rows
            self._waiting.clear()
        self._rows = []
        for request in pending:
            request._finish("cancelled")

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._waiting or self._rows or self._closed):
                self._lock.wait()
            return not self._closed

    def _drop_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._waiting = collections.deque(r for r in self._waiting if not self._ended_early(r, now))
        self._remove_rows([row for row, request in enumerate(self._rows) if self._ended_early(request, now)])

    @staticmethod
    def _ended_early(request: Request, now: float) -> bool:
        """Finish `request` if it was cancelled or passed its deadline; whether it was."""
        reason = request._expired(now)
        return reason is not None and request._finish(reason)

    def _prefill(self) -> None:
        """Prefill the waiting requests that fit into free rows, as one left-padded batch."""
        with self._lock:
            count = min(self.max_batch_size - len(self._rows), self.max_prefill_batch, len(self._waiting))
            group = [self._waiting.popleft() for _ in range(count)]
        if not group:
            return
        first_row = len(self._rows)
        self._rows.extend(group)
        if self.prefix_cache is None:
            logits = self._prefill_fresh(first_row, group)
        else:
            logits = self._prefill_continuing(first_row, group)
        self._sample_and_deliver(first_row, logits[:, -1])

    def _prefill_fresh(self, first_row: int, group: List[Request]) -> torch.Tensor:
        batch = collate([request.inputs for request in group], self.pad_token_id)
        padded_length = batch["input_ids"].shape[1]
        cache = self.cache.prefill(first_row, [request.prompt_length for request in group], padded_length)
        kwargs = {}
        if "images" in batch:
            kwargs["images"] = batch["images"].to(device=self.device, dtype=self.dtype)
        logits = self._prompt_forward(batch, batch["attention_mask"], cache, kwargs)
        cache.commit()
        return logits

    def _prefill_continuing(self, first_row: int, group: List[Request]) -> torch.Tensor:
        """The prefill with prefix reuse: each row gets its longest kept prefix (all but its last prompt token at
        most) and the forward computes the rest, then the rows' prompts are kept."""
        for row, request in enumerate(group, first_row):
            cached, chunks = self.prefix_cache.match(request.key, request.prompt_length - 1)
            request.cached_positions = self.cache.write(row, chunks) if cached else 0
        suffixes = [{key: request.inputs[key][:, request.cached_positions:] for key in PROMPT_KEYS}
                    for request in group]
        batch = collate(suffixes, self.pad_token_id)
        cache = self.cache.prefill(first_row, [s["input_ids"].shape[1] for s in suffixes], batch["input_ids"].shape[1],
                                   cached=[request.cached_positions for request in group])
        with_image = [request for request, s in zip(group, suffixes) if bool(s["image_embed_mask"].any())]
        kwargs = {"image_embeds": self._image_embeddings(with_image)} if with_image else {}
        mask = cache.mask if cache.continues else batch["attention_mask"]
        logger.debug("prefill of %d prompts: %d of %d positions reused", len(group), sum(cache.cached),
                     sum(request.prompt_length for request in group))
        logits = self._prompt_forward(batch, mask, cache, kwargs)
        cache.commit()
        for row, request in enumerate(group, first_row):
            self.prefix_cache.insert(request.key, functools.partial(self.cache.read, row))
        return logits

    def _prompt_forward(self, batch, attention_mask, cache, image_kwargs) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"].to(self.device),
                          position_ids=batch["position_ids"].to(self.device),
                          attention_mask=attention_mask.to(device=self.device, dtype=self.dtype),
                          vision_expert_mask=batch["vision_expert_mask"].to(self.device),
                          image_embed_mask=batch["image_embed_mask"].to(self.device),
                          kv_cache=cache, last_logits_only=True, **image_kwargs)[0]

    def _image_embeddings(self, requests: List[Request]) -> torch.Tensor:
        """The image embeddings (N, image_length, hidden) of the requests' images, from the image cache or the
        ViT (once per distinct image)."""
        found = {request.key.image_digest: self.image_cache.get(request.key.image_digest) for request in requests}
        missing = {digest: request.inputs["images"] for request in requests
                   for digest in [request.key.image_digest] if found[digest] is None}
        if missing:
            pixels = torch.cat(list(missing.values())).to(device=self.device, dtype=self.dtype)
            encoded = self.model.get_mixin("eva").encode_image(pixels)
            for digest, embeddings in zip(missing, encoded):
                if len(missing) > 1:  # its own memory: a view would keep the whole batch alive in the cache
                    embeddings = embeddings.clone()
                found[digest] = embeddings
                self.image_cache.put(digest, embeddings)
        return torch.stack([found[request.key.image_digest] for request in requests])

    def _decode(self) -> None:
        """One token for every running row."""
        rows = self._rows
        cache = self.cache.decode(len(rows))
        input_ids = torch.tensor([[request.token_ids[-1]] for request in rows], device=self.device)
        position_ids = torch.tensor([[request.next_position - 1] for request in rows], device=self.device)
        # the mask is all ones when every row has the same length: SAT's attention then takes SDPA's
        # unmasked path, as a lone request's decoding does
        mask = torch.ones(1, 1, 1, cache.span) if cache.same_length else cache.mask
        logits = self.model(input_ids=input_ids, position_ids=position_ids, kv_cache=cache,
                            attention_mask=mask.to(device=self.device, dtype=self.dtype))[0]
        cache.commit()
        self.steps += 1
        self._sample_and_deliver(0, logits[:, -1])

    def _sample_and_deliver(self, first_row: int, logits: torch.Tensor) -> None:
        """Pick the next token of rows first_row.. (logits (n, vocab)), hand them out, free finished rows."""
        rows = self._rows[first_row:]
        sampler = Sampler([request.config for request in rows], [request.generator for request in rows])
        tokens = sampler.next_tokens(logits.float(), [request.token_ids for request in rows]).tolist()
        finished = [first_row + i for i, (request, token) in enumerate(zip(rows, tokens)) if request._add_token(token)]
        self._remove_rows(finished)

    def _remove_rows(self, rows: List[int], keep: bool = True) -> None:
        """Free the KV rows of finished requests, moving the last running rows into the gaps; with `keep` (and
        a prefix cache) their sequences are kept first."""
        for row in sorted(rows, reverse=True):
            if keep and self.prefix_cache is not None:
                self._keep_sequence(row)
            last = len(self._rows) - 1
            if row != last:
                self.cache.move_row(last, row)
                self._rows[row] = self._rows[last]
            self.cache.release(last)
            self._rows.pop()

    def _keep_sequence(self, row: int) -> None:
        """Keep what row `row` computed: its prompt and every answer token but the last (never fed back)."""
        request, computed = self._rows[row], self.cache.lengths[row]
        if computed <= request.prompt_length:
            return  # the prompt was kept after the prefill
        key = request.key.extended(request.token_ids[:computed - request.prompt_length],
                                   int(request.inputs["position_ids"][0, -1]) + 1)
        self.prefix_cache.insert(key, functools.partial(self.cache.read, row), computed)

    def _fail_all(self, error: BaseException) -> None:
        for request in self._rows:
            request._finish("error", error)
        self._remove_rows(list(range(len(self._rows))), keep=False)


def engine_for(pipeline, engine_args: EngineArgs) -> Engine:
    """The engine over a loaded utils.pipeline.InferencePipeline, sized by `engine_args`."""
    return Engine(pipeline.model, pipeline.defaults.max_length, eos_token_id=pipeline.processor.eos_token_id,
                  **engine_args.engine_kwargs())
