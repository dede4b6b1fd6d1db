"""Request and response bodies of the OpenAI chat-completions API, as far as CogVLM serves it, and the
OpenAPI document that says what the server enforces.

Field names and shapes follow OpenAI's API reference (chat completions, vision message format,
streaming chunks, error objects). Non-standard sampling fields (`top_k`, `repetition_penalty`)
are accepted too; the official client sends them through `extra_body`. Requests are validated strictly
(no "1.5" for a number, no 1 for a boolean): what the schema calls invalid gets a 400.
"""
import time
import uuid
from typing import Any, List, Literal, Optional, Union

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from utils.generation_config import MAX_SEED

STRICT = ConfigDict(strict=True)
# what a client without the API key may ask for (method, exact path): a health check for load balancers
PUBLIC_ROUTES = frozenset({("GET", "/health")})
ROLES = ["user", "assistant"]  # the schema's roles; others (system, tool) get a 400 that names the fix
IMAGE_URL_PATTERN = "^(data:|https?://)"
# every message and every content part costs at least one token, and no CogVLM has more than 4096 positions:
# longer lists cannot fit, and are refused before they cost their validation
MAX_ITEMS = 4096


def _integral(value):
    """JSON Schema's integer: 3.0 is one (strict pydantic would refuse the float), 3.5 and true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """An integer field type (JSON Schema's sense) with pydantic bounds (ge=, le=)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def valid_unicode(text: Optional[str], what: str) -> Optional[str]:
    """`text` unless it holds a lone UTF-16 surrogate (JSON allows "\\ud800"; no tokenizer or reply can)."""
    try:
        if text is not None:
            text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", f"{what} is not valid Unicode (it holds a lone surrogate "
                                  "such as \\ud800); send UTF-8 text") from None
    return text


# Requests --------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = STRICT
    url: str = Field(json_schema_extra={"pattern": IMAGE_URL_PATTERN})  # data:image/...;base64,... or http(s)://
    detail: Optional[str] = None  # accepted and ignored: the model has one input resolution


class ImagePart(BaseModel):
    model_config = STRICT
    type: Literal["image_url"]
    image_url: Union[ImageURL, Annotated[str, WithJsonSchema({"type": "string", "pattern": IMAGE_URL_PATTERN})]]


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str = Field(json_schema_extra={"enum": ROLES})  # checked when the conversation is built, to name the problem
    content: Union[str, List[ContentPart], None] = None  # None: a 400 saying so (the schema requires it)
    name: Optional[str] = None

    @field_validator("role", "name")
    @classmethod
    def _text_field(cls, value, info):
        return valid_unicode(value, info.field_name)

    @field_validator("content", mode="before")
    @classmethod
    def _part_count(cls, value):
        if isinstance(value, list) and len(value) > MAX_ITEMS:
            raise PydanticCustomError("too_long", f"content has {len(value)} parts, more than any context holds "
                                      f"(at most {MAX_ITEMS}); send fewer parts")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        if isinstance(value, str):
            return valid_unicode(value, "the text")
        for index, part in enumerate(value or []):
            if isinstance(part, TextPart):
                valid_unicode(part.text, f"text part {index}")
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                valid_unicode(url, f"the image_url of part {index}")
        return value


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


UNSUPPORTED = {"type": "null", "description": "not supported by this server: leave it out"}


class ChatCompletionRequest(BaseModel):
    model_config = STRICT
    model: str
    messages: List[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[integer(ge=0)] = None  # at most the vocabulary size (checked, and in the served schema)
    max_tokens: Optional[integer(ge=1)] = None
    max_completion_tokens: Optional[integer(ge=1)] = None  # the newer name of max_tokens
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[integer(ge=0, le=MAX_SEED)] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: integer(ge=1, le=1) = 1
    # OpenAI parameters this server does not implement: rejected when set, never silently ignored
    stop: Optional[Any] = Field(None, json_schema_extra=UNSUPPORTED)
    tools: Optional[Any] = Field(None, json_schema_extra=UNSUPPORTED)
    functions: Optional[Any] = Field(None, json_schema_extra=UNSUPPORTED)
    logprobs: Optional[bool] = Field(None, json_schema_extra={"enum": [False, None]})
    response_format: Optional[Any] = Field(None, json_schema_extra=UNSUPPORTED)

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return valid_unicode(value, "model")


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


# The OpenAPI document ------------------------------------------------------------------------

ERROR_STATUSES = {400: "Bad request: `error.param` names the field, `error.message` the fix",
                  401: "Missing or wrong API key", 404: "No such model", 413: "Request body over the size limit",
                  429: "Server busy (queue full, or too many image downloads): retry later",
                  503: "The request waited longer than the server's --request_timeout"}


# with `stream: true`: each server-sent event's data is a ChatCompletionChunk, or an error object, as JSON,
# and the last one is [DONE]
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"oneOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": "#/components/schemas/ChatCompletionChunk"}, {"$ref": "#/components/schemas/ErrorBody"}]}}]}}}


def _non_null(prop: dict) -> dict:
    """The non-null branch of an Optional field's schema (the field itself when it has none)."""
    return next((branch for branch in prop.get("anyOf", []) if branch.get("type") != "null"), prop)


def _declare_errors(operation: dict, statuses) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # validation errors are answered 400 (OpenAI's status), never 422
    for status in statuses:
        responses[str(status)] = {"description": ERROR_STATUSES[status],
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def openapi_document(app: FastAPI, model_name: str, vocab_size: int, max_length: int, secured: bool) -> dict:
    """The app's OpenAPI document with what the server enforces beyond the pydantic models: the served model
    name, top_k up to the vocabulary, max_tokens up to the context, roles, content required, the API key,
    and every error status a route answers (with the OpenAI error body; never 422)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, ChatCompletionChunk):  # the error responses' and the event stream's bodies
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in model_schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas.setdefault(model.__name__, model_schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    request = schemas["ChatCompletionRequest"]["properties"]
    request["model"]["enum"] = [model_name]
    _non_null(request["seed"]).update(minimum=0, maximum=MAX_SEED)  # FastAPI writes bounds as floats: 2**63 here
    _non_null(request["top_k"])["maximum"] = vocab_size
    for name in ("max_tokens", "max_completion_tokens"):
        _non_null(request[name])["maximum"] = max_length
    message = schemas["ChatMessage"]
    message["required"] = sorted(set(message.get("required", [])) | {"content"})
    content = message["properties"]["content"]
    content["anyOf"] = [branch for branch in content["anyOf"] if branch.get("type") != "null"]
    for branch in content["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = MAX_ITEMS
    content.pop("default", None)
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            statuses = [400] if operation.get("parameters") or operation.get("requestBody") else []
            if secured and (method.upper(), path) not in PUBLIC_ROUTES:
                operation["security"] = [{"bearer": []}]
                statuses.append(401)
            if "{model_id}" in path:
                statuses.append(404)
            if method == "post":
                statuses += [413, 429, 503]
                operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            _declare_errors(operation, statuses)
    return doc


def install_openapi(app: FastAPI, **facts) -> None:
    """Serve `openapi_document(app, **facts)` at /openapi.json (built once, on the first request)."""
    cache = {}

    def document() -> dict:
        if "doc" not in cache:
            cache["doc"] = openapi_document(app, **facts)
        return cache["doc"]

    app.openapi = document
