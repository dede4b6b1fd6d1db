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
"""
import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Deque, Dict, List, Optional

import torch

from models.config import EOS_ID
from models.errors import CogVLMError, PromptError
from models.kv_cache import SlotKVCache
from models.quantization import has_low_bit_weights
from utils.generation import GenerationConfig, Sampler, collate, ensure_kv_cache, new_generator

logger = logging.getLogger(__name__)

_END = object()  # the last item of a request's token queue


class QueueFull(Exception):
    """The engine's waiting queue is full (max_waiting): retry later."""


class EngineError(RuntimeError):
    """Generation failed inside the engine (the server log has the traceback)."""


class Request:
    """One submitted request: its settings, its generated tokens as they come, and how it ended.

    Iterate (blocking) or `await get()` (asyncio) for the token ids, end token included. `cancel()` is safe
    from any thread: the engine drops the request at its next step boundary. After the end: `token_ids`,
    `finish_reason` ("stop": an end token, "length": max_new_tokens or max_length, "cancelled", "timeout":
    the deadline passed, "error": see `error`); `submit_time`, `first_token_time`, `finish_time`
    (time.monotonic()).
    """

    def __init__(self, inputs: Dict[str, torch.Tensor], config: GenerationConfig, generator, deadline,
                 end_tokens, budget: int):
        self.inputs, self.config, self.generator, self.deadline = inputs, config, generator, deadline
        self.end_tokens, self.budget = set(end_tokens), budget
        self.prompt_length = inputs["input_ids"].shape[1]
        self.submit_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None
        self.token_ids: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.next_position = int(inputs["position_ids"][0, -1]) + 1  # DESIGN.md §3: answers continue the count
        self._cancelled = False
        self._items: "queue.SimpleQueue" = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # the asyncio consumer, woken on new items
        self._ready: Optional[asyncio.Event] = None
        self._ended = False  # the consumer has taken the end item

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self):
        while True:
            item = self._next(block=True)
            if item is None:
                return
            yield item

    async def get(self, timeout: Optional[float] = None) -> Optional[int]:
        """The next token id, or None after the last one. Raises TimeoutError when none comes within `timeout`
        seconds (the request runs on), EngineError when generation failed."""
        if self._loop is None:
            self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        while True:
            item = self._next(block=False)
            if item is not _END:
                return item
            self._ready.clear()
            if self._items.empty():  # an item pushed after this check sets the event again
                await asyncio.wait_for(self._ready.wait(), timeout)

    def _next(self, block: bool):
        """A token id, None at the end, or _END when nothing is there yet (block=False)."""
        if self._ended:
            return None
        try:
            item = self._items.get(block=block)
        except queue.Empty:
            return _END
        if item is _END:
            self._ended = True
            if self.error is not None:
                raise EngineError(f"generation failed: {self.error}") from self.error
            return None
        return item

    # called by the engine thread
    def _push(self, item) -> None:
        self._items.put(item)
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the consumer's loop has closed: nobody is waiting
                pass

    def _add_token(self, token: int) -> bool:
        """Record a generated token; True when the request is finished with it."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.append(token)
        self.next_position += 1
        self._push(token)
        if token in self.end_tokens:
            return self._finish("stop")
        if len(self.token_ids) >= self.budget:
            return self._finish("length")
        return False

    def _finish(self, reason: str, error: Optional[BaseException] = None) -> bool:
        if self.finish_reason is None:
            self.finish_reason, self.error, self.finish_time = reason, error, time.monotonic()
            self._push(_END)
        return True

    def _expired(self, now: float) -> Optional[str]:
        if self._cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None


class Engine:
    """Continuous batching on `model` (a CogVLMModel) by one scheduling thread, started here.

    max_length: positions per KV row (prompt + answer; requests are capped to it); max_batch_size: KV rows,
    i.e. requests generating at once; max_waiting: requests that may wait for a row (more: QueueFull);
    max_prefill_batch: prompts prefilled in one forward (default max_batch_size).
    """

    def __init__(self, model, max_length: int, max_batch_size: int = 8, max_waiting: int = 64,
                 eos_token_id: int = EOS_ID, pad_token_id: int = 0, max_prefill_batch: Optional[int] = None):
        _check_sizes(max_batch_size, max_waiting)
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
                    self.cache.nbytes() / 1e9)
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
        length = inputs["input_ids"].shape[1]
        max_length = min(config.max_length, self.max_length)
        budget = min(max_length - length, config.max_new_tokens or max_length)
        if budget < 1:
            raise PromptError(f"prompt is {length} tokens; with max_length {max_length} that leaves no room to "
                              "answer: shorten the prompt or raise --max_length")
        if generator is None and not config.greedy:
            generator = new_generator(config.seed)
        deadline = None if timeout is None else time.monotonic() + timeout
        return Request(inputs, config, generator, deadline, config.end_tokens(self.eos_token_id), budget)

    def close(self, timeout: float = 30) -> None:
        """Stop the loop after its current step; unfinished requests end as cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

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
        batch = collate([request.inputs for request in group], self.pad_token_id)
        padded_length = batch["input_ids"].shape[1]
        cache = self.cache.prefill(first_row, [request.prompt_length for request in group], padded_length)
        kwargs = {"vision_expert_mask": batch["vision_expert_mask"].to(self.device),
                  "image_embed_mask": batch["image_embed_mask"].to(self.device)}
        if "images" in batch:
            kwargs["images"] = batch["images"].to(device=self.device, dtype=self.dtype)
        logits = self.model(input_ids=batch["input_ids"].to(self.device),
                            position_ids=batch["position_ids"].to(self.device),
                            attention_mask=batch["attention_mask"].to(device=self.device, dtype=self.dtype),
                            kv_cache=cache, last_logits_only=True, **kwargs)[0]
        cache.commit()
        self._sample_and_deliver(first_row, logits[:, -1])

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

    def _remove_rows(self, rows: List[int]) -> None:
        """Free the KV rows of finished requests, moving the last running rows into the gaps."""
        for row in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if row != last:
                self.cache.move_row(last, row)
                self._rows[row] = self._rows[last]
            self.cache.release(last)
            self._rows.pop()

    def _fail_all(self, error: BaseException) -> None:
        for request in self._rows:
            request._finish("error", error)
        self._remove_rows(list(range(len(self._rows))))


def add_engine_args(parser, timeout: bool = True):
    """--max_batch_size, --max_waiting (and --request_timeout, with `timeout`): the serving engine's flags."""
    parser.add_argument("--max_batch_size", type=int, default=8,
                        help="requests generated at once (KV memory for this many x --max_length positions)")
    parser.add_argument("--max_waiting", type=int, default=64,
                        help="requests that may wait for a free batch row; more are refused (HTTP 429)")
    if timeout:
        parser.add_argument("--request_timeout", type=float, default=None,
                            help="seconds a request may take from arrival, waiting included (default: no limit)")
    return parser


def _check_sizes(max_batch_size: int, max_waiting: int, timeout: Optional[float] = None) -> None:
    if max_batch_size < 1:
        raise CogVLMError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if max_waiting < 0:
        raise CogVLMError(f"--max_waiting must be 0 or more, got {max_waiting}")
    if timeout is not None and not timeout > 0:
        raise CogVLMError(f"--request_timeout must be a positive number of seconds, got {timeout}")


def check_engine_args(args) -> None:
    """Fail on bad engine flags with one CogVLMError line (before any model loads)."""
    _check_sizes(args.max_batch_size, args.max_waiting, getattr(args, "request_timeout", None))


def engine_for(pipeline, args) -> Engine:
    """The engine over a loaded utils.pipeline.InferencePipeline, sized by add_engine_args' flags."""
    return Engine(pipeline.model, pipeline.defaults.max_length, max_batch_size=args.max_batch_size,
                  max_waiting=args.max_waiting, eos_token_id=pipeline.processor.eos_token_id)
