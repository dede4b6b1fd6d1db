"""OpenAI chat-completion requests in the chat core's terms, and the chat core's answers in OpenAI's.

The messages become a query, a history and the conversation's one image; the sampling fields go over the
server's flags into a validated GenerationConfig; text deltas are trimmed so that a stream adds up to the
non-streamed answer. Refusals are APIError (an HTTP status, a message naming the field and the fix).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from openai_demo.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart, Usage
from utils.chat import ChatStream
from utils.generation_config import GenerationConfig


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


# Messages -> (query, history, image) -------------------------------------------------------

@dataclass
class ParsedMessages:
    """OpenAI messages in the chat core's terms."""
    query: str
    history: List[Tuple[str, str]]
    image_url: Optional[str]  # the conversation's one image (CogVLM places it before all turns)


def _message_text(message: ChatMessage, index: int) -> Tuple[str, List[str]]:
    """The text of a message (text parts joined by newlines) and the URLs of its image parts."""
    if message.content is None:
        raise APIError(400, f"messages[{index}] has no content; give a string or a list of parts",
                       param=f"messages.{index}.content")
    if isinstance(message.content, str):
        return message.content, []
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    urls = [part.image_url if isinstance(part.image_url, str) else part.image_url.url
            for part in message.content if isinstance(part, ImagePart)]
    return "\n".join(texts), urls


def parse_messages(messages: List[ChatMessage]) -> ParsedMessages:
    """Check the turn structure (user, assistant, user, ..., user) and split it into history and query."""
    expected = ["user", "assistant"]
    texts, image_urls = [], []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            raise APIError(400, f"messages[{index}] has role '{message.role}', but CogVLM has no system prompt; "
                           "put the instruction into the first user message", param=f"messages.{index}.role",
                           code="invalid_role")
        want = expected[index % 2]
        if message.role != want:
            raise APIError(400, f"messages[{index}] has role '{message.role}' where '{want}' was expected; "
                           "messages must alternate user, assistant, user, ... and end with a user message",
                           param=f"messages.{index}.role", code="invalid_role")
        text, urls = _message_text(message, index)
        if urls and message.role != "user":
            raise APIError(400, f"messages[{index}] is an assistant message with an image; only user messages "
                           "can carry images", param=f"messages.{index}.content")
        texts.append(text)
        image_urls.extend(urls)
    if len(messages) % 2 == 0:
        raise APIError(400, "the last message must come from the user (the one to answer)", param="messages",
                       code="invalid_role")
    if len(image_urls) > 1:
        raise APIError(400, f"the conversation has {len(image_urls)} images but CogVLM takes one; "
                       "send a single image_url part", param="messages", code="too_many_images")
    history = list(zip(texts[:-1:2], texts[1::2]))
    return ParsedMessages(query=texts[-1], history=history, image_url=image_urls[0] if image_urls else None)


# Sampling -----------------------------------------------------------------------------------

def sampling_config(body: ChatCompletionRequest, defaults: GenerationConfig, vocab_size: int) -> GenerationConfig:
    """The request's sampling settings over the server's flags (each omitted field keeps its flag value).

    temperature 0 means greedy. A request that sets temperature or top_p without top_k samples from the
    whole vocabulary (the flag's default top_k of 1 would make it greedy). Bad values raise SamplingError.
    """
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_p = defaults.top_p if body.top_p is None else body.top_p
    if body.top_k is not None:
        top_k = body.top_k
    elif body.temperature is not None or body.top_p is not None:
        top_k = 0
    else:
        top_k = defaults.top_k
    penalty = defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
    return defaults.replace(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                            seed=body.seed).validate(vocab_size)


def check_supported(body: ChatCompletionRequest, model_name: str) -> None:
    if body.model != model_name:
        raise APIError(400, f"model '{body.model}' is not served here; use '{model_name}' (see GET /v1/models)",
                       param="model", code="model_not_found")
    if body.n != 1:
        raise APIError(400, "n must be 1: this server returns one choice per request", param="n")
    for name in ("stop", "tools", "functions", "response_format"):
        if getattr(body, name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server; leave it out", param=name)
    if body.logprobs:
        raise APIError(400, "'logprobs' is not supported by this server; leave it out", param="logprobs")


class StrippedDeltas:
    """Text deltas whose concatenation is the stripped answer (what a non-streamed reply holds):
    leading whitespace is dropped, trailing whitespace is held back until more text follows."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def feed(self, delta: str) -> str:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self.started = True
        text = self.pending + delta
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept


def usage_of(turn: ChatStream) -> Usage:
    completion = len(turn.token_ids)
    return Usage(prompt_tokens=turn.prompt_length, completion_tokens=completion,
                 total_tokens=turn.prompt_length + completion)
