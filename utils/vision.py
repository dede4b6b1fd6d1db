"""Image loading (file path, http(s) URL or data: URI) at a bounded cost, and the EVA-CLIP image processor.

No input image can cost more than a few hundred MB or a few seconds:
- a URL has one deadline for connecting and the whole body (URL_TIMEOUT_S, also against a server that
  trickles bytes) and a byte cap checked while reading (MAX_IMAGE_BYTES; files and data URIs have it too),
  both kept by utils.media;
- the pixel count is read from the header before anything is decoded: a JPEG above KEEP_PIXELS is decoded
  at 1/2, 1/4 or 1/8 scale (libjpeg's draft mode), any other image above MAX_PIXELS is refused;
- a decoded image above KEEP_PIXELS is box-reduced to at most that (still far above any ViT input), so an
  image held by a conversation or a waiting request stays small.
16-bit images (PIL modes I;16 and I) are scaled to 8 bits rather than clipped.

Image URLs are fetched under a MediaPolicy (utils/media.py: public addresses only by default).
"""
import asyncio
import base64
import binascii
import concurrent.futures
import io
import logging
import math
import os
import re
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image

from models.errors import ImageError
from utils.media import DEFAULT_MEDIA_POLICY, URL_TIMEOUT_S, MediaPolicy, fetch_url

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000
KEEP_PIXELS = 16_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageProcessor:
    """PIL image -> ViT inputs: RGB, bicubic resize to (S, S), [0, 1], CLIP mean/std normalisation.

    Called on an image it returns upstream's dict: {'image': (1, 3, S, S) float32} and the ViT's token inputs
    {'input_ids': (1, 1) zeros, 'position_ids': None, 'attention_mask': (1, 1) ones}, so that
    `model(..., **{"vision_" + k: v for k, v in processor(image).items()})` works as upstream.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.mean = np.asarray(CLIP_MEAN, dtype=np.float32)
        self.std = np.asarray(CLIP_STD, dtype=np.float32)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float32."""
        return self.normalize(self.resize(image))

    def resize(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (S, S, 3) uint8, RGB, resized: the compact form a dataset can cache."""
        return np.asarray(image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC))

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 -> (3, S, S) float32, CLIP-normalised."""
        pixels = (pixels.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __call__(self, image: Image.Image) -> Dict[str, Optional[torch.Tensor]]:
        return {"image": self.to_tensor(image).unsqueeze(0), "input_ids": torch.zeros(1, 1, dtype=torch.long),
                "position_ids": None, "attention_mask": torch.ones(1, 1, dtype=torch.long)}


def get_image_processor(image_size: int) -> ImageProcessor:
    return ImageProcessor(image_size)


# Decoding ------------------------------------------------------------------------------------

def _too_many_pixels(source: str, width: int, height: int, max_pixels: int) -> ImageError:
    return ImageError(f"{source} is {width}x{height} pixels ({width * height / 1e6:.0f} Mpx), more than the "
                      f"{max_pixels / 1e6:.0f} Mpx this server decodes; downscale it first")


def _reduction(width: int, height: int, limit: int) -> int:
    """The smallest integer factor that brings width x height to at most `limit` pixels."""
    factor = max(1, math.ceil(math.sqrt(width * height / limit)))
    while math.ceil(width / factor) * math.ceil(height / factor) > limit:
        factor += 1
    return factor


def _open_bounded(data: bytes, source: str, max_pixels: int, keep_pixels: int) -> Image.Image:
    """Read the header and check the pixel count; a JPEG over `keep_pixels` is set to decode at 1/2, 1/4 or
    1/8 scale (the largest that fits, up to 1/8); any other image over `max_pixels` is refused (ImageError).
    Nothing is decoded yet."""
    with warnings.catch_warnings():  # the cap below replaces PIL's DecompressionBombWarning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > keep_pixels and image.format == "JPEG":
        scale = min(8, 1 << (_reduction(width, height, keep_pixels) - 1).bit_length())  # a power of two
        image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        logger.info("%s: %dx%d JPEG decoded at 1/%d scale", source, width, height, scale)
    if image.size[0] * image.size[1] > max_pixels:
        raise _too_many_pixels(source, width, height, max_pixels)
    return image


def _to_small_rgb(image: Image.Image, keep_pixels: int) -> Image.Image:
    """A decoded image of any mode -> 8-bit RGB of at most `keep_pixels` (box-reduced first where the mode
    allows, so the copies are small), 16-bit values scaled (PIL's own convert clips them)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    factor = _reduction(*image.size, keep_pixels)
    if factor > 1 and image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"):
        image = image.convert("RGB")  # palette and 1-bit images cannot be box-reduced as they are
    if factor > 1:
        image = image.reduce(factor)
    return image if image.mode == "RGB" else image.convert("RGB")


def image_from_bytes(data: bytes, source: str, max_pixels: int = MAX_PIXELS,
                     keep_pixels: int = KEEP_PIXELS) -> Image.Image:
    """Decode image bytes (read from `source`, named in errors) into an RGB PIL image, or raise ImageError.

    The pixel count is checked from the header before decoding (see the module docstring)."""
    try:
        image = _open_bounded(data, source, max_pixels, keep_pixels)
        image.load()
        return _to_small_rgb(image, keep_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, hit while reading the header of a huge image
        raise ImageError(f"{source} has more pixels than the {max_pixels / 1e6:.0f} Mpx this server decodes; "
                         "downscale it first") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) on bad data
        raise ImageError(f"{source} is not a readable image ({type(e).__name__}); "
                         "give a PNG/JPEG/WebP file or URL") from None


# Reading: files, data URIs, URLs ------------------------------------------------------------

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


def data_uri_bytes(uri: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI (size-capped before decoding), or ImageError."""
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
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URI is not valid base64; encode the file bytes with base64") from None


def download(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES,
             policy: MediaPolicy = DEFAULT_MEDIA_POLICY) -> bytes:
    """utils.media.fetch_url for synchronous callers (on a fresh event loop; in a helper thread when this
    thread already runs one, e.g. in a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetch_url(url, max_bytes, timeout, policy))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fetch_url(url, max_bytes, timeout, policy)).result()


def read_file(path_or_url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a local image file (size-capped), or ImageError naming the problem."""
    path = os.path.expanduser(path_or_url)
    if not os.path.exists(path):
        raise ImageError(f"image file '{path_or_url}' does not exist; check the path (or give an http(s) URL)")
    if os.path.isdir(path):
        raise ImageError(f"'{path_or_url}' is a directory; give an image file")
    if os.path.getsize(path) > max_bytes:
        raise ImageError(f"image file '{path_or_url}' is larger than {max_bytes // 2**20} MiB; resize it first")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read image file '{path_or_url}' ({e.strerror}); check its permissions") from None


def load_image(path_or_url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES, *,
               policy: MediaPolicy = DEFAULT_MEDIA_POLICY) -> Image.Image:
    """An RGB image from a local path, an http(s) URL (fetched under `policy`) or a data: URI, within the
    limits above."""
    path_or_url = path_or_url.strip()
    if path_or_url.lower().startswith(("http://", "https://")):
        return image_from_bytes(download(path_or_url, timeout, max_bytes, policy), f"image URL {path_or_url}")
    if path_or_url.startswith("data:"):
        return image_from_bytes(data_uri_bytes(path_or_url, max_bytes), "image data URI")
    return image_from_bytes(read_file(path_or_url, max_bytes), f"image file '{path_or_url}'")
