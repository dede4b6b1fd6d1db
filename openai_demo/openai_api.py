"""An OpenAI-compatible API server for CogVLM (chat completions in OpenAI's vision format).

    python openai_demo/openai_api.py --from_pretrained cogvlm-chat-v1.1 --version chat --bf16 --port 8000

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (`stream: true` sends
server-sent events ending with `data: [DONE]`), and `GET /health` (the one route without the API key).
Answers come from the shared chat core (utils/chat.py); the model runs one request at a time and the
others wait in arrival order. Bad requests get a 4xx with an OpenAI-style error body.
Upstream's environment variables still work: MODEL_PATH (checkpoint), TOKENIZER_PATH (tokenizer).
"""
import argparse
import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import sys
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Tuple

# `python openai_demo/openai_api.py` puts openai_demo/ on sys.path, not the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import anyio  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from openai_demo.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk,  # noqa: E402
                                 ChatCompletionRequest, ChatMessage, Choice, ChunkChoice, Delta, ErrorBody,
                                 ErrorDetail, ImagePart, ModelCard, ModelList, TextPart, Usage, completion_id, now)
from models.errors import CogVLMError, ImageError, PromptError, SamplingError  # noqa: E402
from utils.chat import ChatStream  # noqa: E402
from utils.generation import GenerationConfig  # noqa: E402
from utils.pipeline import InferencePipeline, add_inference_args, load_pipeline  # noqa: E402
from utils.vision import MAX_IMAGE_BYTES, image_from_bytes, load_image  # noqa: E402

logger = logging.getLogger("openai_api")

API_KEY_ENV = "COGVLM_API_KEY"
PUBLIC_PATHS = ("/health",)


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


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


# Images -------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


def decode_data_uri(uri: str, max_bytes: int = MAX_IMAGE_BYTES):
    """A `data:image/...;base64,...` URI -> RGB PIL image (same size cap and errors as files and URLs)."""
    match = _DATA_URI.fullmatch(uri.strip())
    if match is None:
        raise ImageError("image data URI is malformed; use data:image/png;base64,<base64 bytes>")
    mime = (match["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise ImageError(f"image data URI has media type '{mime or 'none'}'; send data:image/png;base64,... "
                         "(or jpeg/webp)")
    encoded = re.sub(r"\s+", "", match["data"])
    if len(encoded) * 3 // 4 > max_bytes:
        raise ImageError(f"image data is larger than {max_bytes // 2**20} MiB; send a smaller image")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URI is not valid base64; encode the file bytes with base64") from None
    # the same decoding and error messages as image files and URLs
    return image_from_bytes(data, "image data URI")


def load_request_image(url: str):
    """An image_url from a request -> RGB PIL image. Only data: and http(s): URLs; never server paths."""
    if url.startswith("data:"):
        return decode_data_uri(url)
    if url.startswith(("http://", "https://")):
        return load_image(url)  # with utils.vision's timeout and size cap
    raise ImageError(f"image URL '{url[:60]}' is neither a data: URI nor http(s); send the image as "
                     "data:image/png;base64,... or give an http(s) URL")


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


# Serving ------------------------------------------------------------------------------------

class ModelSlot:
    """The model is not re-entrant: one turn runs at a time, the others wait in arrival order."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting = 0
        self.busy = False
        self._lock = asyncio.Lock()  # FIFO: waiters are woken in the order they arrived

    def check_room(self) -> None:
        if self.waiting >= self.max_waiting:
            raise APIError(429, f"{self.waiting} requests are already waiting for the model; retry later",
                           type="server_busy", code="queue_full")

    @asynccontextmanager
    async def hold(self):
        self.check_room()
        self.waiting += 1
        try:
            await self._lock.acquire()  # a cancelled waiter leaves the queue without the lock
        finally:
            self.waiting -= 1
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            self._lock.release()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, so that a client who goes away
    mid-stream releases the model at once rather than whenever the generator is garbage-collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


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


class CogVLMServer:
    """The routes' logic over one loaded model."""

    def __init__(self, pipeline: InferencePipeline, model_name: str, defaults: GenerationConfig, max_waiting: int):
        self.pipeline = pipeline
        self.model_name = model_name
        self.defaults = defaults
        self.context_length = pipeline.processor.max_length
        self.slot = ModelSlot(max_waiting)
        self.created = now()

    def prepare(self, body: ChatCompletionRequest) -> ChatStream:
        """Validate the request and build its chat turn (loads the image; no model compute yet)."""
        check_supported(body, self.model_name)
        messages = parse_messages(body.messages)
        config = sampling_config(body, self.defaults, self.pipeline.vocab_size)
        image = load_request_image(messages.image_url) if messages.image_url is not None else None
        conversation = self.pipeline.conversation(image)
        conversation.history = messages.history
        max_new = body.max_completion_tokens or body.max_tokens
        try:
            turn = self.pipeline.chat(conversation, messages.query, config.replace(max_new_tokens=max_new))
        except PromptError:  # its message speaks to CLI users; say it in API terms
            raise APIError(400, f"the conversation (image included) fills the model's context of "
                           f"{self.context_length} tokens and leaves no room to answer; shorten the messages or "
                           "drop earlier turns", param="messages", code="context_length_exceeded") from None
        room = self.context_length - turn.prompt_length
        if max_new is not None and max_new > room:
            raise APIError(400, f"max_tokens is {max_new} but the prompt is {turn.prompt_length} tokens (image "
                           f"included) of a {self.context_length}-token context; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return turn

    async def run(self, turn: ChatStream, request: Request) -> AsyncIterator[str]:
        """Generate in the model slot, one step per worker-thread call; yields the text deltas.
        Stops early (freeing the slot) when the client has disconnected."""
        async with self.slot.hold():
            if await request.is_disconnected():
                return
            deltas = iter(turn)
            device = next(self.pipeline.model.parameters()).device

            def step() -> Optional[str]:
                if device.type == "cuda":  # the current CUDA device is per thread; steps run in pool threads
                    torch.cuda.set_device(device)
                return next(deltas, None)

            try:
                while True:
                    # not cancellable mid-step: a cancelled request gives the slot back after this step
                    delta = await anyio.to_thread.run_sync(step)
                    if delta is None:
                        return
                    yield delta
                    if await request.is_disconnected():
                        logger.info("client went away; generation stopped after %d tokens", len(turn.token_ids))
                        return
            finally:
                deltas.close()

    async def complete(self, body: ChatCompletionRequest, request: Request):
        self.slot.check_room()
        turn = await anyio.to_thread.run_sync(self.prepare, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return ClosingStreamingResponse(self.sse(turn, request, include_usage),
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with aclosing(self.run(turn, request)) as deltas:
            async for _ in deltas:
                pass
        if turn.response is None:  # the client disconnected: nobody reads this
            return JSONResponse({}, status_code=499)
        return ChatCompletion(id=completion_id(), created=now(), model=self.model_name, usage=usage_of(turn),
                              choices=[Choice(message=AssistantMessage(content=turn.response),
                                              finish_reason=turn.finish_reason)])

    async def sse(self, turn: ChatStream, request: Request, include_usage: bool) -> AsyncIterator[str]:
        cid, created = completion_id(), now()

        def chunk(delta: Delta, reason=None, choices=True, usage=None) -> str:
            body = ChatCompletionChunk(id=cid, created=created, model=self.model_name, usage=usage,
                                       choices=[ChunkChoice(delta=delta, finish_reason=reason)] if choices else [])
            data = body.model_dump()
            for choice in data["choices"]:  # OpenAI's deltas carry only the fields that change
                choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield chunk(Delta(role="assistant", content=""))
        text = StrippedDeltas()
        try:
            # aclosing: when this generator is closed mid-stream, the run gives the model slot back at once
            async with aclosing(self.run(turn, request)) as deltas:
                async for delta in deltas:
                    delta = text.feed(delta)
                    if delta:
                        yield chunk(Delta(content=delta))
        except Exception:
            # headers are sent: report in the stream (OpenAI's clients raise on an `error` event)
            logger.exception("generation failed")
            yield f"data: {ErrorBody(error=ErrorDetail(message='generation failed; see the server log', type='server_error')).model_dump_json()}\n\n"
            return
        if turn.response is None:
            return  # the client is gone
        yield chunk(Delta(), reason=turn.finish_reason)
        if include_usage:
            yield chunk(Delta(), choices=False, usage=usage_of(turn))
        yield "data: [DONE]\n\n"


class APIKeyMiddleware:
    """Checks `Authorization: Bearer <key>` on every route except PUBLIC_PATHS (a plain ASGI
    middleware: unlike BaseHTTPMiddleware it leaves streaming and disconnects untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key; send the header "
                                          "'Authorization: Bearer <key>' (the OpenAI client's api_key)",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(error: RequestValidationError) -> Tuple[str, Optional[str]]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else f"request body: {first.get('msg')}"), param


def create_app(pipeline: InferencePipeline, model_name: str, defaults: Optional[GenerationConfig] = None,
               api_key: Optional[str] = None, max_waiting: int = 64) -> FastAPI:
    """The FastAPI app serving `pipeline` under `model_name`."""
    server = CogVLMServer(pipeline, model_name, defaults or pipeline.defaults, max_waiting)
    app = FastAPI(title="CogVLM OpenAI-compatible API")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(SamplingError)
    async def _sampling_error(request, exc: SamplingError):
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(CogVLMError)
    async def _input_error(request, exc: CogVLMError):
        code = "invalid_image" if isinstance(exc, ImageError) else None
        return error_response(400, str(exc), param="messages", code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.error("request failed", exc_info=exc)
        return error_response(500, "internal server error; see the server log", type="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": server.slot.busy, "waiting": server.slot.waiting}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=model_name, created=server.created)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model '{model_id}' is not served here; use '{model_name}'", param="model",
                           code="model_not_found")
        return ModelCard(id=model_name, created=server.created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 429: {"model": ErrorBody}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.complete(body, request)

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


# Entry point ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CogVLM OpenAI-compatible API server")
    add_inference_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require this key as 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}; none: open)")
    parser.add_argument("--model_name", default=None,
                        help="the model id clients ask for (default: the checkpoint's directory name)")
    parser.add_argument("--max_waiting", type=int, default=64,
                        help="requests that may wait for the model; more get HTTP 429")
    # upstream's openai_api.py read these environment variables
    defaults = {}
    if os.environ.get("MODEL_PATH"):
        defaults["from_pretrained"] = os.environ["MODEL_PATH"]
    if os.environ.get("TOKENIZER_PATH"):
        defaults["local_tokenizer"] = os.environ["TOKENIZER_PATH"]
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sat").propagate = False  # SAT logs through its own handler already
    try:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise CogVLMError("the API server runs as one process; start it with python, not torchrun")
        pipeline = load_pipeline(args)
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model_name = args.model_name or os.path.basename(os.path.normpath(args.from_pretrained))
    app = create_app(pipeline, model_name, api_key=args.api_key,
                     max_waiting=args.max_waiting)
    logger.info("serving '%s' on http://%s:%d/v1%s", model_name, args.host, args.port,
                " (API key required)" if args.api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
