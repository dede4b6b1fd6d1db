"""One chat turn on the generation core, streamed, and the upstream `chat()` function.

    turn = ChatStream(model, processor, conversation, "What is in the image?", config)
    for delta in turn:          # text as it is generated
        print(delta, end="")
    turn.response, turn.token_ids, turn.finish_reason   # conversation now holds the turn too

    turn = ChatStream(..., engine=engine).submit(timeout=30)   # on the serving engine, batched with others
    while (delta := await turn.next_delta()) is not None:      # asyncio (the API server)
        ...
    turn.finish()
"""
from contextlib import closing
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from PIL import Image

from utils.conversation import Conversation, History
from utils.generation import generate_stream
from utils.engine_request import Request
from utils.generation_config import GenerationConfig, answer_budget
from utils.processor import CogVLMProcessor, TextDeltas
from models.errors import ImageError
from utils.vision import load_image


class ChatStream:
    """One turn of `conversation`: iterate for text deltas. Afterwards `response`, `token_ids` (end token
    included) and `finish_reason` ("stop": an end token; "length": the length budget) hold the result, and
    the turn is appended to the conversation.

    Input errors (prompt length, settings) raise in the constructor, before any compute. generator: the
    random generator of sampled tokens (None: one seeded by config.seed, else by torch's global generator).
    engine: a utils.engine.Engine to generate on (batched with other requests); None: generate here.

    On an engine the turn owns its engine request: `submit()` queues it (iteration does so when nobody has),
    then iterate, or `await next_delta()` (asyncio) / `wait()` and then `finish()`; `cancel()` frees its row.
    """

    def __init__(self, model, processor: CogVLMProcessor, conversation: Conversation, query: str,
                 config: Optional[GenerationConfig] = None, generator: Optional[torch.Generator] = None,
                 engine=None):
        self.model, self.processor, self.conversation = model, processor, conversation
        self.query = query
        self.config = (config or GenerationConfig()).validate(len(processor.tokenizer))
        self.inputs = processor(conversation, query)
        self.end_token_ids = self.config.end_tokens(processor.eos_token_id)
        self.generator = generator
        self.engine = engine
        self.request: Optional[Request] = None  # the engine request, once submitted
        self.token_ids: List[int] = []
        self.response: Optional[str] = None
        self._deltas = TextDeltas(processor, self.end_token_ids)

    @property
    def prompt_length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    @property
    def answer_room(self) -> int:
        """The most tokens the answer could have: the room the prompt leaves under max_length, the turn's or
        the processor's (max_new_tokens aside; at least 1, the constructor checks)."""
        return answer_budget(self.prompt_length, min(self.config.max_length, self.processor.max_length))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.token_ids and self.token_ids[-1] in self.end_token_ids else "length"

    @property
    def timed_out(self) -> bool:
        """Whether the engine dropped the turn at its deadline (submit's timeout)."""
        return self.request is not None and self.request.finish_reason == "timeout"

    @property
    def generation_config(self) -> GenerationConfig:
        """The turn's settings with its end tokens spelled out."""
        return self.config.replace(end_token_ids=self.end_token_ids)

    def submit(self, timeout: Optional[float] = None) -> "ChatStream":
        """Queue the turn on its engine; after `timeout` seconds the engine drops it, waiting or running.
        Raises utils.engine_request.QueueFull when the engine's waiting queue is full."""
        if self.engine is None:
            raise ValueError("this turn has no engine to submit to; pass engine= to ChatStream / pipeline.chat")
        if self.request is not None:
            raise ValueError("this turn is already submitted")
        self.request = self.engine.submit(self.inputs, self.generation_config, self.generator, timeout)
        return self

    def cancel(self) -> None:
        """Stop generating (from any thread): the engine frees the turn's row at its next step."""
        if self.request is not None:
            self.request.cancel()

    def __iter__(self) -> Iterator[str]:
        with closing(self._tokens()) as tokens:  # closed at once when the consumer stops early
            for token in tokens:
                delta = self._add_token(token)
                if delta:
                    yield delta
        self.finish()

    def _tokens(self) -> Iterator[int]:
        if self.engine is None:
            yield from generate_stream(self.model, self.inputs, self.generation_config, self.generator)
            return
        if self.request is None:
            self.submit()
        try:
            yield from self.request
        finally:  # the consumer stopped early: free the engine's row
            self.request.cancel()

    async def next_delta(self, timeout: Optional[float] = None) -> Optional[str]:
        """The text the next generated token adds ("" for a token that completes no character yet), or None
        after the last one (then `finish()` the turn). Raises TimeoutError when no token comes within
        `timeout` seconds (the turn runs on), utils.engine_request.EngineError when generation failed."""
        if self.request is None:
            self.submit()
        token = await self.request.get(timeout)
        return None if token is None else self._add_token(token)

    def wait(self) -> "ChatStream":
        """Block until the engine has generated the whole answer; records its tokens without decoding text
        (the caller then calls `finish()`, e.g. under its tokenizer lock)."""
        if self.request is None:
            self.submit()
        self.token_ids.extend(self.request)
        return self

    def _add_token(self, token: int) -> str:
        self.token_ids.append(token)
        return self._deltas.feed(token)

    def finish(self) -> str:
        """End the turn: the answer text, also appended to the conversation."""
        self.response = self.processor.answer(self.token_ids, self.end_token_ids)
        self.conversation.add_turn(self.query, self.response)
        return self.response


def chat(image_path, model, text_processor, img_processor, query: str, history: Optional[History] = None,
         image=None, max_length: int = 1024, top_p: float = 0.7, top_k: int = 30, temperature: float = 0.95,
         repetition_penalty: float = 1.2, invalid_slices: Sequence[slice] = (), no_prompt: bool = False,
         force_pil_image: Optional[Image.Image] = None, *, end_token_ids: Optional[Sequence[int]] = None,
         on_text: Optional[Callable[[str], None]] = None):
    """The upstream API, with upstream's arguments and defaults: answer `query` about an image, given
    `history`. Returns (response, history + [(query, response)], (image_inputs, pil_image)).

    The image is `force_pil_image`, else `image` (a PIL image, or the third value an earlier call returned),
    else the file / URL `image_path`; none of them: a text-only chat. text_processor:
    utils.language.llama2_text_processor_inference (its tokenizer's `signal_type` is the template);
    img_processor: utils.vision.get_image_processor(size); image_inputs is its output for the image, in the
    model's dtype and on its device. no_prompt: send the image alone (no template, history or question).
    Ours besides upstream's: `end_token_ids` (default: the tokenizer's eos), `on_text` (receives the answer's
    text as it is generated).
    """
    image_inputs, pil_image = _chat_image(image_path, image, force_pil_image, img_processor)
    processor = CogVLMProcessor(text_processor.tokenizer, img_processor.image_size, text_processor.image_length,
                                text_processor.max_target_length)
    conversation = Conversation(text_processor.signal_type, pil_image, list(history or []), no_prompt=no_prompt)
    config = GenerationConfig(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                              repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices or ()),
                              end_token_ids=end_token_ids)
    turn = ChatStream(model, processor, conversation, query, config)
    for delta in turn:
        if on_text is not None:
            on_text(delta)
    if image_inputs is not None:
        parameter = next(model.parameters())
        image_inputs = {k: v.to(parameter.device, parameter.dtype if v.is_floating_point() else v.dtype)
                        if isinstance(v, torch.Tensor) else v for k, v in image_inputs.items()}
    return turn.response, conversation.history, (image_inputs, pil_image)


def _chat_image(image_path, image, force_pil_image, img_processor):
    """(image processor output or None, PIL image or None) of chat()'s three ways to give the image."""
    if force_pil_image is not None:
        return img_processor(force_pil_image), force_pil_image
    if isinstance(image, tuple):
        if len(image) != 2:
            raise ImageError(f"chat(image=...) got a tuple of {len(image)}; pass a PIL image or the "
                             "(image_inputs, pil_image) pair an earlier chat() call returned")
        image_inputs, pil_image = image
        if pil_image is not None:
            return image_inputs if image_inputs is not None else img_processor(pil_image), pil_image
        image = None
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        return img_processor(image), image
    if image is not None:
        raise ImageError(f"chat(image=...) got a {type(image).__name__}; pass a PIL image or the "
                         "(image_inputs, pil_image) pair an earlier chat() call returned")
    if image_path:
        pil_image = load_image(image_path)
        return img_processor(pil_image), pil_image
    return None, None
