"""Every query about each image, answered on the serving engine (utils/engine.py): the one place both
batch modes (this process, a Ray worker) generate.

    with Captioner(pipeline, ["Describe the image."], config, batch_size=8, key_name="file") as captioner:
        for row in captioner.answer(items):    # utils.batch.inputs.Item -> result rows, in order
            ...
"""
import collections
import threading
import time
from typing import Iterable, Iterator, Optional, Sequence

from PIL import Image

from models.errors import ImageError, PromptError
from utils.batch.inputs import Item
from utils.batch.outputs import result_row
from utils.chat import ChatStream
from utils.engine import QueueFull, engine_for
from utils.engine_args import EngineArgs

QUEUE_FULL_WAIT_S = 0.01


class Captioner:
    """Every query about each item, answered on one serving engine (utils/engine.py) over `pipeline`'s model.

    batch_size: rows decoded together. callers: threads calling `answer` at once (a Ray worker runs two, so
    that one batch's last answers overlap the next batch's first). Prompts are built and answers decoded
    under a lock: the tokenizer is not safe to call from two threads.
    """

    def __init__(self, pipeline, queries: Sequence[str], config, batch_size: int, key_name: str, callers: int = 1):
        self.pipeline, self.queries, self.config, self.key_name = pipeline, list(queries), config, key_name
        self.window = 2 * batch_size  # requests queued per caller, so a freed row never waits for decoding
        self.engine = engine_for(pipeline, EngineArgs(max_batch_size=batch_size, max_waiting=callers * self.window))
        self._tokenizer_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.engine.close()

    def answer(self, items: Iterable[Item]) -> Iterator[dict]:
        """Result rows of `items` x queries, in that order, each as soon as it and those before it are done."""
        in_flight = collections.deque()  # (key, query, submitted chat turn or None, error or None)
        several = len(self.queries) > 1
        try:
            for item in items:
                try:
                    image, image_error = item.image(), None
                except ImageError as e:
                    image, image_error = None, str(e)
                for query in self.queries:
                    job, error = None, image_error
                    if error is None:
                        turn, error = self._prompt(image, query)
                        while error is None and job is None:
                            try:
                                job = turn.submit()
                            except QueueFull:  # other callers' requests fill the queue: finish ours first
                                if in_flight:
                                    yield self._result(*in_flight.popleft())
                                else:
                                    time.sleep(QUEUE_FULL_WAIT_S)
                    in_flight.append((item.key, query if several else None, job, error))
                    while len(in_flight) > self.window:
                        yield self._result(*in_flight.popleft())
            while in_flight:
                yield self._result(*in_flight.popleft())
        finally:  # stopped early (an interrupt): free the engine's rows
            for _, _, job, _ in in_flight:
                if job is not None:
                    job.cancel()

    def _prompt(self, image: Image.Image, query: str):
        """(the chat turn, None), or (None, why the prompt does not fit)."""
        try:
            with self._tokenizer_lock:
                return self.pipeline.chat(self.pipeline.conversation(image), query, self.config, self.engine), None
        except PromptError as e:
            return None, str(e)

    def _result(self, key: str, query: Optional[str], turn: Optional[ChatStream], error: Optional[str]) -> dict:
        if turn is None:
            return result_row(self.key_name, key, query, error=error)
        turn.wait()
        with self._tokenizer_lock:
            turn.finish()
        return result_row(self.key_name, key, query, answer=turn.response, tokens=len(turn.token_ids),
                          finish_reason=turn.finish_reason)
