"""The OpenAI-compatible app: CogVLMServer (requests -> chat turns on the serving engine) and `create_app`
(the FastAPI routes, errors and API-key check). openai_demo/openai_api.py is its command line; see there for
the routes and flags."""

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import sys
from contextlib import aclosing
from typing import AsyncIterator, Optional, Tuple

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_demo.limits import BodySizeLimit, ImageGate, ServerBusy, error_json
from openai_demo.messages import (APIError, ParsedMessages, StrippedDeltas, check_supported, parse_messages,
                                  sampling_config, usage_of)
from openai_demo.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                 ChatCompletionRequest, Choice, ChunkChoice, Delta, ErrorBody, ErrorDetail,
                                 ModelCard, ModelList, PUBLIC_ROUTES, completion_id, install_openapi, now)
from models.errors import CogVLMError, ImageError, PromptError, SamplingError
from utils.chat import ChatStream
from utils.engine import Engine, QueueFull, engine_for
from utils.generation_config import GenerationConfig
from utils.engine_args import EngineArgs
from utils.pipeline import InferencePipeline
from utils.media import DEFAULT_MEDIA_POLICY, MediaPolicy

logger = logging.getLogger("openai_api")


# Serving ------------------------------------------------------------------------------------

class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, and cancels its chat turn, so that a client
    who goes away (even before the body started) frees its batch row at the next step."""

    def __init__(self, content, turn: ChatStream, **kwargs):
        super().__init__(content, **kwargs)
        self.turn = turn

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.cancel()
            await self.body_iterator.aclose()


DISCONNECT_POLL_S = 0.5  # how often a request that gets no token checks whether its client is still there


class CogVLMServer:
    """The routes' logic over one loaded model and its serving engine."""

    def __init__(self, pipeline: InferencePipeline, model_name: str, defaults: GenerationConfig, engine: Engine,
                 request_timeout: Optional[float] = None, media_policy: MediaPolicy = DEFAULT_MEDIA_POLICY):
        self.pipeline = pipeline
        self.model_name = model_name
        self.defaults = defaults
        self.max_length = pipeline.processor.max_length
        self.engine, self.request_timeout = engine, request_timeout
        self.images = ImageGate(media_policy)
        self.created = now()

    def health(self) -> dict:
        engine = self.engine
        return {"status": "ok", "busy": engine.running > 0, "running": engine.running, "waiting": engine.waiting,
                "max_batch_size": engine.max_batch_size, "max_waiting": engine.max_waiting}

    def check_request(self, body: ChatCompletionRequest) -> Tuple[ParsedMessages, GenerationConfig]:
        """The cheap checks, before anything is fetched or queued: the request's messages in the chat core's
        terms and its sampling settings over the server's flags."""
        check_supported(body, self.model_name)
        config = sampling_config(body, self.defaults, self.pipeline.vocab_size)
        for name in ("max_tokens", "max_completion_tokens"):  # either one, as the served schema says
            if (getattr(body, name) or 0) > self.max_length:
                raise APIError(400, f"{name} is {getattr(body, name)} but the model's context is "
                               f"{self.max_length} tokens", param=name, code="context_length_exceeded")
        return parse_messages(body.messages), config

    def prepare(self, body: ChatCompletionRequest, messages: ParsedMessages, config: GenerationConfig,
                image=None) -> ChatStream:
        """The request's chat turn around its fetched image (no model compute yet)."""
        conversation = self.pipeline.conversation(image)
        conversation.history = messages.history
        max_new = body.max_completion_tokens or body.max_tokens
        try:
            turn = self.pipeline.chat(conversation, messages.query, config.replace(max_new_tokens=max_new),
                                      self.engine)
        except PromptError:  # its message speaks to CLI users; say it in API terms
            raise APIError(400, f"the conversation (image included) fills the model's context of "
                           f"{self.max_length} tokens and leaves no room to answer; shorten the messages or "
                           "drop earlier turns", param="messages", code="context_length_exceeded") from None
        # OpenAI's contract: a max_tokens the context cannot hold is refused, not cut short
        room = turn.answer_room
        if max_new is not None and max_new > room:
            raise APIError(400, f"max_tokens is {max_new} but the prompt is {turn.prompt_length} tokens (image "
                           f"included) of a {self.max_length}-token context; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return turn

    def submit(self, turn: ChatStream) -> ChatStream:
        try:
            return turn.submit(self.request_timeout)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_busy", code="queue_full") from None

    async def run(self, turn: ChatStream, request: Request) -> AsyncIterator[str]:
        """The text deltas of the submitted turn as the engine generates it; the turn is finished at the end.
        Stops early (the engine frees the row at its next step) when the client has disconnected."""
        try:
            while True:
                try:
                    delta = await turn.next_delta(timeout=DISCONNECT_POLL_S)
                except (TimeoutError, asyncio.TimeoutError):
                    if await request.is_disconnected():
                        return
                    continue
                if delta is None:
                    break
                if delta:
                    yield delta
                if await request.is_disconnected():
                    logger.info("client went away; generation stopped after %d tokens", len(turn.token_ids))
                    return
        finally:
            turn.cancel()
        if turn.timed_out and not turn.token_ids:
            raise APIError(503, f"the request waited longer than the server's --request_timeout of "
                           f"{self.request_timeout:g} s; retry later", type="server_busy", code="timeout")
        turn.finish()  # a deadline mid-answer ends it as "length"

    async def complete(self, body: ChatCompletionRequest, request: Request):
        if self.engine.queue_full:  # refuse before decoding any image
            raise APIError(429, f"{self.engine.waiting} requests are already waiting for the model; retry later",
                           type="server_busy", code="queue_full")
        messages, config = self.check_request(body)
        # through the image gate (openai_demo/limits.py), before the request queues
        image = None if messages.image_url is None else await self.images.load(messages.image_url)
        turn = await anyio.to_thread.run_sync(self.prepare, body, messages, config, image)
        self.submit(turn)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return ClosingStreamingResponse(self.sse(turn, request, include_usage), turn,
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
            # aclosing: when this generator is closed mid-stream, the run cancels its engine request at once
            async with aclosing(self.run(turn, request)) as deltas:
                async for delta in deltas:
                    delta = text.feed(delta)
                    if delta:
                        yield chunk(Delta(content=delta))
        except APIError as e:
            yield f"data: {ErrorBody(error=ErrorDetail(message=e.message, type=e.type, code=e.code)).model_dump_json()}\n\n"
            return
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


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class APIKeyMiddleware:
    """Checks `Authorization: Bearer <key>` on every request except PUBLIC_ROUTES (method and exact path:
    HEAD, OPTIONS, a trailing slash, /docs and /openapi.json need the key too). The keys' SHA-256 digests
    are compared in constant time, so neither the key's bytes nor its length show in the answer time. A
    plain ASGI middleware: unlike BaseHTTPMiddleware it leaves streaming and disconnects untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = _digest(api_key.encode())

    def authorized(self, headers) -> bool:
        scheme, _, key = dict(headers).get(b"authorization", b"").strip().partition(b" ")
        return hmac.compare_digest(_digest(key.strip()), self.expected) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        public = scope["type"] == "lifespan" or (scope["type"] == "http" and
                                                 (scope["method"], scope["path"]) in PUBLIC_ROUTES)
        if public or self.authorized(scope["headers"]):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":  # no route takes one; closed before it is accepted (HTTP 403)
            await send({"type": "websocket.close", "code": 1008})
        else:
            response = error_json(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                                  "(the OpenAI client's api_key)", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)


def _validation_message(error: RequestValidationError) -> Tuple[str, Optional[str]]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else f"request body: {first.get('msg')}"), param


def create_app(pipeline: InferencePipeline, model_name: str, defaults: Optional[GenerationConfig] = None,
               api_key: Optional[str] = None, engine_args: EngineArgs = EngineArgs(), engine: Optional[Engine] = None,
               media_policy: MediaPolicy = DEFAULT_MEDIA_POLICY) -> FastAPI:
    """The FastAPI app serving `pipeline` under `model_name`, on `engine` (default: a new one sized by
    `engine_args`, whose request_timeout applies either way), fetching image URLs under `media_policy`."""
    request_timeout = engine_args.request_timeout
    engine = engine or engine_for(pipeline, engine_args)
    server = CogVLMServer(pipeline, model_name, defaults or pipeline.defaults, engine, request_timeout,
                          media_policy)
    app = FastAPI(title="CogVLM OpenAI-compatible API")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_json(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(SamplingError)
    async def _sampling_error(request, exc: SamplingError):
        return error_json(400, str(exc), param=exc.param)

    @app.exception_handler(CogVLMError)
    async def _input_error(request, exc: CogVLMError):
        code = "invalid_image" if isinstance(exc, ImageError) else None
        return error_json(400, str(exc), param="messages", code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_json(400, message, param=param)

    @app.exception_handler(ServerBusy)
    async def _busy(request, exc: ServerBusy):
        return error_json(429, str(exc), type="server_busy", code="image_downloads_busy")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_json(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          headers=exc.headers)  # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.error("request failed", exc_info=exc)
        return error_json(500, "internal server error; see the server log", type="server_error")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return server.health()

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

    install_openapi(app, model_name=model_name, vocab_size=pipeline.vocab_size, max_length=server.max_length,
                    secured=bool(api_key))
    app.add_middleware(BodySizeLimit)  # inside the key check: a client without the key gets 401 unread
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
