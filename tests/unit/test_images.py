"""Encoded images: decoded to the model's layout, limits checked before any pixel is decoded."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from bastion.gateway.errors import InvalidInput
from bastion.gateway.protocol.images import decode_image, decode_images


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def test_png_and_base64_png_decode_to_the_same_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    raw = encode(pixels)
    text = base64.b64encode(raw)
    items = np.array([raw, text, b"data:image/png;base64," + text], dtype=object)
    batch = decode_images(items, (1, 28, 28), 1 << 20, 1 << 20, "images")
    assert batch.shape == (3, 1, 28, 28)
    for image in batch:
        np.testing.assert_array_equal(image[0], pixels)


def test_rgb_model_gets_channels_first_and_grey_images_are_expanded() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    batch = decode_images(np.array([encode(rgb)], dtype=object), (3, 4, 5), 1 << 20, 1 << 20, "x")
    assert batch.shape == (1, 3, 4, 5) and batch[0, 0].min() == 255 and batch[0, 1].max() == 0
    grey = decode_images(np.array([encode(rgb[..., 0])], dtype=object), (3, 4, 5), 1 << 20,
                         1 << 20, "x")
    assert grey.shape == (1, 3, 4, 5)


def test_huge_image_is_refused_from_its_header() -> None:
    bomb = encode(np.zeros((3000, 3000), np.uint8))  # ~9 Mpx that compress to a few KB
    assert len(bomb) < 100_000
    with pytest.raises(InvalidInput, match="over the limit of 1000000 pixels"):
        decode_image(bomb, "L", 1 << 20, 1_000_000, "x[0]")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a" + b"\0" * 20, "not a readable PNG or JPEG"),
        (encode(np.zeros((8, 8), np.uint8))[:30], "not a readable PNG or JPEG"),
        (encode(np.zeros((8, 8), np.uint8), "JPEG")[:50], "not a readable PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * (2 << 20), "over the limit"),
    ],
    ids=["gif", "truncated-png", "truncated-jpeg", "too-many-bytes"],
)
def test_broken_or_foreign_images_are_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, "L", 1 << 20, 1 << 20, "x[0]")


def test_an_image_of_the_wrong_size_is_refused_from_its_header_alone() -> None:
    """A PNG whose header says 4096x4096 but whose pixel data is garbage: refused for its size,
    so no pixel was decoded (decoding would have failed on the garbage instead)."""
    header = encode(np.zeros((4096, 4096), dtype=np.uint8))
    idat = header.index(b"IDAT")
    garbage = header[: idat + 4] + b"\x00" * 64  # truncated, undecodable pixel data
    with pytest.raises(InvalidInput, match="is 4096x4096, the model expects 28x28"):
        decode_images(np.array([garbage], dtype=object), (1, 28, 28), 1 << 20, 1 << 30, "x")


def test_decoding_a_batch_of_images_stops_at_the_decode_budget() -> None:
    import time

    from bastion.gateway.errors import PayloadTooLarge
    from bastion.gateway.protocol.budget import budget

    items = np.array([encode(np.zeros((28, 28), dtype=np.uint8))] * 4, dtype=object)
    with budget(time.monotonic() - 1, 5), pytest.raises(PayloadTooLarge, match="decode budget"):
        decode_images(items, (1, 28, 28), 1 << 20, 1 << 20, "x")


def test_mime_wrapped_and_url_safe_base64_images_decode() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    raw = encode(pixels)
    items = np.array(
        [base64.encodebytes(raw), base64.urlsafe_b64encode(raw)], dtype=object
    )
    batch = decode_images(items, (1, 28, 28), 1 << 20, 1 << 20, "images")
    for image in batch:
        np.testing.assert_array_equal(image[0], pixels)


def test_an_unreadable_image_error_does_not_leak_internals() -> None:
    with pytest.raises(InvalidInput) as err:
        decode_image(b"not an image at all", "L", 1 << 20, 1 << 20, "x[0]")
    assert "BytesIO" not in str(err.value) and "unrecognised format" in str(err.value)
