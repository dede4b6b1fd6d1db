"""One request submitted to the serving engine (utils/engine.py): its settings, its tokens as the engine's thread
produces them (iterate, or `await get()` in asyncio), and how it ended."""
import asyncio
import queue
import time
from typing import Dict, List, Optional

import torch

from utils.generation_config import GenerationConfig
from utils.prefix_cache import PromptKey

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
                 end_tokens, budget: int, key: Optional[PromptKey] = None):
        self.inputs, self.config, self.generator, self.deadline = inputs, config, generator, deadline
        self.key = key  # the prompt's content (prefix reuse), None when the engine keeps no prefixes
        self.cached_positions = 0  # prompt positions taken from the prefix cache instead of prefilled
        self.end_tokens, self.budget = set(end_tokens), budget
        self.prompt_length = inputs["input_ids"].shape[1]
        self.submit_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None
        self.token_ids: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.next_position = int(inputs["position_ids"][0, -1]) + 1  # answers continue the prompt's count
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
