"""Text + image -> model inputs, and generated ids -> answer text, for one CogVLM checkpoint.

    processor = CogVLMProcessor(tokenizer, image_size=490, image_length=1225, max_length=2048)
    inputs = processor(conversation, "What is in the image?")
    # {'input_ids', 'position_ids', 'image_embed_mask', 'vision_expert_mask', 'image_rope_mask': (1, L),
    #  'attention_mask': (1, 1, L, L), 'images': (1, 3, S, S) when the conversation has an image}

The token layout, masks and positions are `utils.language.llama2_text_processor_inference`'s (the upstream
text processor, kept as the one implementation of the prompt layout); the pixels come from utils.vision.
"""
from typing import Dict, Sequence

import torch

from models.errors import PromptError
from utils.conversation import Conversation
from utils.language import llama2_text_processor_inference
from utils.vision import get_image_processor


class CogVLMProcessor:
    """tokenizer: the checkpoint's (utils.language.llama2_tokenizer). max_length: the total token budget
    (prompt, image included, plus answer), as `--max_length`."""

    def __init__(self, tokenizer, image_size: int, image_length: int, max_length: int):
        self.tokenizer = tokenizer
        self.text = llama2_text_processor_inference(tokenizer, max_length, image_length)
        self.image = get_image_processor(image_size)
        # no token is longer than the longest piece: a longer prompt cannot fit, and is refused before the
        # tokenizer spends seconds and gigabytes on it
        self.max_prompt_chars = max_length * max(len(piece) for piece in tokenizer.get_vocab())

    @property
    def max_length(self) -> int:
        return self.text.max_target_length

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def __call__(self, conversation: Conversation, query: str) -> Dict[str, torch.Tensor]:
        """Inputs of the next turn (raises PromptError when the prompt leaves no room to answer)."""
        prompt = conversation.prompt(query)
        if len(prompt) > self.max_prompt_chars:
            raise PromptError(f"prompt is {len(prompt)} characters, more than the {self.max_length} tokens of "
                              "--max_length can hold; shorten the question or the history")
        inputs = self.text(prompt)
        if conversation.image is not None:
            inputs["images"] = self.image(conversation.image)["image"]
        return inputs

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def answer(self, ids: Sequence[int], end_token_ids: Sequence[int] = ()) -> str:
        """The answer text of generated `ids` (end tokens dropped, stripped)."""
        return self.text.process_response(self.decode([t for t in ids if t not in end_token_ids]))


class TextDeltas:
    """Incremental detokenisation: feed generated ids one by one, get the text each adds.

    Decodes a short window before and after the new token, so that SentencePiece's leading-space handling
    and multi-byte characters come out right (no half characters are handed out).
    """

    def __init__(self, processor: CogVLMProcessor, end_token_ids: Sequence[int] = ()):
        self.processor, self.end_token_ids = processor, set(end_token_ids)
        self.ids = []
        self._prefix_offset = self._read_offset = 0

    def feed(self, token: int) -> str:
        if token in self.end_token_ids:
            return ""
        self.ids.append(token)
        prefix_text = self.processor.decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self.processor.decode(self.ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""
