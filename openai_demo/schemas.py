"""Request and response bodies of the OpenAI chat-completions API, as far as CogVLM serves it.

Field names and shapes follow OpenAI's API reference (chat completions, vision message format,
streaming chunks, error objects). Non-standard sampling fields (`top_k`, `repetition_penalty`)
are accepted too; the official client sends them through `extra_body`.
"""
import time
import uuid
from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, Field
from typing_extensions import Annotated


# Requests --------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str  # data:image/...;base64,...  or  http(s)://...
    detail: Optional[str] = None  # accepted and ignored: the model has one input resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: str  # checked when the conversation is built, to name the problem precisely
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    # OpenAI parameters this server does not implement: rejected when set, never silently ignored
    stop: Optional[Any] = None
    tools: Optional[Any] = None
    functions: Optional[Any] = None
    logprobs: Optional[bool] = None
    response_format: Optional[Any] = None


# Responses -------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int  # the prompt as the model sees it: bos, image block (patches + 2), text
    completion_tokens: int  # every generated token, the end-of-sequence token included
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cogvlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail
