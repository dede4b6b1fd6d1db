"""Image loading (path or http(s) URL) and the EVA-CLIP image processor, in PIL/numpy/torch."""
import io
import logging
import os
import time
from typing import Dict

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.errors import ImageError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
URL_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class ImageProcessor:
    """PIL image -> ViT inputs: RGB, bicubic resize to (S, S), [0, 1], CLIP mean/std normalisation.

    Returns {'image': (1, 3, S, S) float32}.
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

    def __call__(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        return {"image": self.to_tensor(image).unsqueeze(0)}


def get_image_processor(image_size: int) -> ImageProcessor:
    return ImageProcessor(image_size)


def image_from_bytes(data: bytes, source: str) -> Image.Image:
    """Decode image bytes (read from `source`, named in errors) into an RGB PIL image, or raise ImageError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{source} is not a readable image ({type(e).__name__}); "
                         "give a PNG/JPEG/WebP file or URL") from None
    return image.convert("RGB")


def load_image(path_or_url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Read an RGB image from a local path or an http(s) URL (with a timeout and a size cap)."""
    path_or_url = path_or_url.strip()
    if path_or_url.startswith(("http://", "https://")):
        return image_from_bytes(_download(path_or_url, timeout, max_bytes), path_or_url)
    path = os.path.expanduser(path_or_url)
    if not os.path.exists(path):
        raise ImageError(f"image file '{path_or_url}' does not exist; check the path (or give an http(s) URL)")
    if os.path.isdir(path):
        raise ImageError(f"'{path_or_url}' is a directory; give an image file")
    if os.path.getsize(path) > max_bytes:
        raise ImageError(f"image file '{path_or_url}' is larger than {max_bytes // 2**20} MiB; resize it first")
    with open(path, "rb") as f:
        return image_from_bytes(f.read(), f"image file '{path_or_url}'")


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    import requests

    deadline = time.monotonic() + timeout  # `timeout` bounds each read; this bounds the whole download
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise ImageError(f"image URL {url} answered HTTP {response.status_code}; check the URL")
            data = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 16):
                data.extend(chunk)
                if time.monotonic() > deadline:
                    raise requests.Timeout()
                if len(data) > max_bytes:
                    raise ImageError(f"image URL {url} is larger than {max_bytes // 2**20} MiB; use a smaller image")
            return bytes(data)
    except requests.Timeout:
        raise ImageError(f"image URL {url} timed out after {timeout:g}s; check the URL or download the image "
                         "and give its path") from None
    except requests.RequestException as e:
        raise ImageError(f"cannot fetch image URL {url} ({type(e).__name__}); check the URL or your network") from None
