"""Encoded images (PNG/JPEG in BYTES inputs) to pixel arrays, with limits checked before decoding.

Pillow reads the header first, so the size is known before any pixel is decoded: an image that
is not exactly the model's input size (or is over the pixel limit) is refused from its header
alone, and a decompression bomb or a truncated file becomes an ``InvalidInput`` naming the
element. Decoding runs in the decode pool, with a budget checkpoint between images.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from bastion.gateway.errors import InvalidInput
from bastion.gateway.protocol.budget import checkpoint

_MODES = {1: "L", 3: "RGB"}
# Pillow inflates PNG text chunks (zTXt, iTXt) while opening, up to 1 MiB each and 64 MiB in all
# by default: an image within the byte limit could cost seconds. Bastion reads no text chunk.
PngImagePlugin.MAX_TEXT_CHUNK = 4096
PngImagePlugin.MAX_TEXT_MEMORY = 16384
_FORMATS = ("PNG", "JPEG")


def decode_images(
    items: np.ndarray, dims: tuple[int, ...], max_bytes: int, max_pixels: int, name: str
) -> np.ndarray:
    """Decodes a flat batch of encoded images into uint8 (n, C, H, W) matching ``dims``."""
    channels, height, width = dims
    if channels not in _MODES:
        raise InvalidInput(f"input {name!r}: images need 1 or 3 channels, the model has {channels}")
    out = np.empty((len(items), channels, height, width), dtype=np.uint8)
    for i, item in enumerate(items):
        checkpoint()
        what = f"{name}[{i}]"
        pixels = decode_image(item, _MODES[channels], max_bytes, max_pixels, what, (width, height))
        out[i] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    return out


def decode_image(
    data: bytes,
    mode: str,
    max_bytes: int,
    max_pixels: int,
    what: str,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """One PNG/JPEG (raw or base64 text) to an (H, W[, C]) uint8 array in ``mode``.

    ``size`` (width, height), when given, must match the header, checked before decoding.
    """
    data = _unwrap_base64(data)
    if len(data) > max_bytes:
        raise InvalidInput(
            f"image {what} has {len(data)} bytes, over the limit of {max_bytes} for this model "
            "(its config parameter max_image_bytes raises it, up to BASTION_MAX_IMAGE_BYTES)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image {what} is {width}x{height}, over the limit of {max_pixels} pixels"
                )
            if size is not None and (width, height) != size:
                raise InvalidInput(
                    f"image {what} is {width}x{height}, the model expects {size[0]}x{size[1]}"
                )
            image.load()
            return np.asarray(image.convert(mode))
    except InvalidInput:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        reason = "unrecognised format" if isinstance(exc, UnidentifiedImageError) else exc
        raise InvalidInput(f"image {what} is not a readable PNG or JPEG: {reason}") from None


def _unwrap_base64(data: bytes) -> bytes:
    """JSON requests carry images as base64 text (optionally a data: URI); binary ones raw."""
    if data[:8] in (b"\x89PNG\r\n\x1a\n",) or data[:3] == b"\xff\xd8\xff":
        return data
    text = data.partition(b",")[2] if data.startswith(b"data:") else data
    text = b"".join(text.split())  # MIME base64 wraps lines
    for alphabet in (b"+/", b"-_"):  # the standard alphabet, then the URL-safe one (RFC 4648)
        try:
            return base64.b64decode(text, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
    return data
