"""What bounds one client's cost to the API server: the request-body cap and the image gate.

- `BodySizeLimit` (ASGI middleware): a body over the cap is answered 413 with an OpenAI-style error body;
  the bytes are counted as they arrive and at most the cap is held, so a huge or endless body costs no
  memory. The rest of a refused body is read and dropped (for a bounded time), so that the client, still
  sending, reads the 413 instead of a reset connection.
- `ImageGate`: a request's image is fetched (under the server's MediaPolicy: utils.media) and decoded
  before the request takes a place in the model's queue, with at most `max_fetches` downloads and
  `max_decodes` decodes at once; a URL the policy refuses costs no download place. A URL image, its wait for a
  download place included, ends within utils.media.URL_TIMEOUT_S, so slow or trickling image servers tie
  up download places only, never the model, the thread pool or requests without URL images. Decodes run on
  the gate's own `max_decodes` threads: the memory the allocator keeps after a decode stays with those few
  threads (each of the many pool threads would otherwise keep its own).
"""
import asyncio
import concurrent.futures
from typing import Optional

from fastapi.responses import JSONResponse
from PIL import Image

from models.errors import ImageError
from openai_demo.schemas import ErrorBody, ErrorDetail
from utils.media import DEFAULT_MEDIA_POLICY, URL_TIMEOUT_S, ImageFetcher, MediaPolicy, check_url, url_timed_out
from utils.vision import MAX_IMAGE_BYTES, data_uri_bytes, image_from_bytes

MAX_BODY_BYTES = 32 * 2**20  # an image of MAX_IMAGE_BYTES (20 MiB) as base64, plus the text
DRAIN_BYTES = 256 * 2**20  # of a refused body, read and dropped at most this much ...
DRAIN_S = 5.0  # ... for at most this long, then the connection is closed


class ServerBusy(Exception):
    """The server refuses a request for now (HTTP 429)."""


def error_json(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    """An OpenAI-style error response."""
    body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 and never reach the app."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> JSONResponse:
        return error_json(413, f"request body is larger than the server's limit of {self.max_bytes // 2**20} MiB; "
                          f"send a smaller image (at most {MAX_IMAGE_BYTES // 2**20} MiB) or fewer messages",
                          code="request_too_large", headers={"Connection": "close"})

    async def _drain(self, receive, more_body: bool) -> None:
        dropped = 0
        try:
            async with asyncio.timeout(DRAIN_S):
                while more_body and dropped < DRAIN_BYTES:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    dropped += len(message.get("body", b""))
                    more_body = message.get("more_body", False)
        except TimeoutError:
            pass  # the connection is closed after the answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":  # else the client has not sent it
                await self._drain(receive, True)
            await self._too_large()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                chunks.clear()
                await self._drain(receive, message.get("more_body", False))
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        chunks.clear()

        async def replay():
            nonlocal replayed, body
            if replayed:
                return await receive()  # later calls: the client's disconnect
            replayed = True
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        await self.app(scope, replay, send)


class ImageGate:
    """Fetches and decodes request images with bounded concurrency (see the module docstring)."""

    def __init__(self, policy: MediaPolicy = DEFAULT_MEDIA_POLICY, max_fetches: int = 16, max_decodes: int = 2,
                 timeout: float = URL_TIMEOUT_S):
        self.policy, self.max_fetches, self.timeout = policy, max_fetches, timeout
        self.fetches = asyncio.Semaphore(max_fetches)
        self.decoders = concurrent.futures.ThreadPoolExecutor(max_decodes, thread_name_prefix="image-decode")
        self.fetcher: Optional[ImageFetcher] = None  # made on first use, inside the server's event loop

    async def _fetch(self, url: str) -> bytes:
        holding = False
        try:
            async with asyncio.timeout(self.timeout):  # one deadline: the wait for a place and the download
                await self.fetches.acquire()
                holding = True
                if self.fetcher is None:
                    self.fetcher = ImageFetcher(self.policy, max_connections=self.max_fetches)
                return await self.fetcher.fetch(url, MAX_IMAGE_BYTES, self.timeout)
        except TimeoutError:
            if holding:
                raise url_timed_out(url, self.timeout) from None
            raise ServerBusy(f"{self.max_fetches} image downloads are in progress; retry later or send the "
                             "image as a data: URI") from None
        finally:
            if holding:
                self.fetches.release()

    async def load(self, url: str) -> Image.Image:
        """A request's image_url (data: URI or http(s) URL; never a path on the server) -> RGB PIL image."""
        if url.lower().startswith(("http://", "https://")):
            check_url(url, self.policy)  # a refusal is answered at once, without waiting for a download place
            data = await self._fetch(url)

            def decode():
                return image_from_bytes(data, f"image URL {url}")
        elif url.startswith("data:"):
            def decode():  # base64 of up to 20 MiB: off the event loop too
                return image_from_bytes(data_uri_bytes(url), "image data URI")
        else:
            raise ImageError(f"image URL '{url[:60]}' is neither a data: URI nor http(s); send the image as "
                             "data:image/png;base64,... or give an http(s) URL")
        return await asyncio.get_running_loop().run_in_executor(self.decoders, decode)
