"""One chat turn on the generation core, streamed, and the upstream `chat()` function.

    turn = ChatStream(model, processor, conversation, "What is in the image?", config)
    for delta in turn:          # text as it is generated
        print(delta, end="")
    turn.response, turn.token_ids, turn.finish_reason   # conversation now holds the turn too
"""
from contextlib import closing
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from PIL import Image

from utils.conversation import Conversation, History
from utils.generation import GenerationConfig, generate_stream
from utils.processor import CogVLMProcessor, TextDeltas
from utils.vision import load_image


class ChatStream:
    """One turn of `conversation`: iterate for text deltas. Afterwards `response`, `token_ids` (end token
    included) and `finish_reason` ("stop": an end token; "length": the length budget) hold the result, and
    the turn is appended to the conversation.

    Input errors (prompt length, settings) raise in the constructor, before any compute. generator: the
    random generator of sampled tokens (None: one seeded by config.seed, else by torch's global generator).
    engine: a utils.engine.Engine to generate on (batched with other requests); None: generate here.
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
        self.token_ids: List[int] = []
        self.response: Optional[str] = None
        self._deltas = TextDeltas(processor, self.end_token_ids)

    @property
    def prompt_length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    @property
    def finish_reason(self) -> str:
        return "stop" if self.token_ids and self.token_ids[-1] in self.end_token_ids else "length"

    @property
    def generation_config(self) -> GenerationConfig:
        """The turn's settings with its end tokens spelled out."""
        return self.config.replace(end_token_ids=self.end_token_ids)

    def __iter__(self) -> Iterator[str]:
        with closing(self._tokens()) as tokens:  # closed at once when the consumer stops early
            for token in tokens:
                delta = self.add_token(token)
                if delta:
                    yield delta
        self.finish()

    def _tokens(self) -> Iterator[int]:
        if self.engine is None:
            yield from generate_stream(self.model, self.inputs, self.generation_config, self.generator)
            return
        request = self.engine.submit(self.inputs, self.generation_config, self.generator)
        try:
            yield from request
        finally:  # the consumer stopped early: free the engine's row
            request.cancel()

    def add_token(self, token: int) -> str:
        """Record one generated token (for callers that generate elsewhere); returns the text it adds."""
        self.token_ids.append(token)
        return self._deltas.feed(token)

    def finish(self) -> str:
        """End the turn: the answer text, also appended to the conversation."""
        self.response = self.processor.answer(self.token_ids, self.end_token_ids)
        self.conversation.add_turn(self.query, self.response)
        return self.response


def chat(image_path, model, text_processor, img_processor, query: str, history: Optional[History] = None,
         image=None, max_length: int = 2048, top_p: float = 0.4, top_k: int = 1, temperature: float = 0.8,
         repetition_penalty: float = 1.0, invalid_slices: Sequence[slice] = (), no_prompt: bool = False,
         end_token_ids: Optional[Sequence[int]] = None, on_text: Optional[Callable[[str], None]] = None):
    """The upstream API: answer `query` about the image at `image_path` (or the cached `image`), given
    `history`. Returns (response, history + [(query, response)], (image_tensors, pil_image)).

    text_processor: utils.language.llama2_text_processor_inference (its tokenizer's `signal_type` is the
    template); img_processor: utils.vision.get_image_processor(size). `on_text` receives the answer's text
    as it is generated. no_prompt: send the image with an empty query.
    """
    pil_image: Optional[Image.Image] = image[1] if image is not None else None
    if pil_image is None and image_path:
        pil_image = load_image(image_path)
    processor = CogVLMProcessor(text_processor.tokenizer, img_processor.image_size, text_processor.image_length,
                                text_processor.max_target_length)
    conversation = Conversation(text_processor.signal_type, pil_image, list(history or []))
    config = GenerationConfig(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                              repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices or ()),
                              end_token_ids=end_token_ids)
    turn = ChatStream(model, processor, conversation, "" if no_prompt else query, config)
    for delta in turn:
        if on_text is not None:
            on_text(delta)
    image_pair = (img_processor(pil_image), pil_image) if pil_image is not None else (None, None)
    return turn.response, conversation.history, image_pair
