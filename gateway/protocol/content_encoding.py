"""Content-Encoding of v2 HTTP bodies: gzip and deflate, both ways, with limits.

Inflation is the classic amplifier (a 64 KB gzip body can inflate to 64 MiB), so it runs in
bounded steps under the decode budget and stops at the model's body limit.
"""

from __future__ import annotations

import zlib

from gateway.errors import InvalidInput, PayloadTooLarge
from gateway.protocol.budget import checkpoint

_INFLATE_STEP = 1 << 20


def decompress(body: bytes | bytearray, encoding: str | None, limit: int) -> bytes | bytearray:
    """Undoes ``Content-Encoding`` gzip/deflate without ever holding more than ``limit`` bytes.

    Inflates in 1 MiB steps with a budget checkpoint between them: one call for the whole body
    would build the result while holding the GIL (tens of milliseconds for a 64 MiB bomb, during
    which the event loop cannot run) and could not be cut off by the decode budget.
    """
    if not encoding or encoding.strip().lower() == "identity":
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    pending: bytes | bytearray | memoryview = body
    try:
        while True:
            checkpoint()
            step = inflater.decompress(pending, _INFLATE_STEP)
            out += step
            if len(out) > limit:
                raise PayloadTooLarge(
                    f"decompressed body is larger than the limit of {limit} bytes"
                )
            pending = inflater.unconsumed_tail
            # a full step may leave output inside zlib even with no input left: go round again
            if inflater.eof or (not pending and len(step) < _INFLATE_STEP):
                break
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {encoding} data: {exc}") from None
    if not inflater.eof:
        raise InvalidInput(f"{encoding} body is truncated")
    return out


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compresses a response when the client asked for it (tritonclient's Accept-Encoding)."""
    if not accept_encoding:
        return body, None
    accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if "gzip" in accepted:
        deflater = zlib.compressobj(wbits=31)
        return deflater.compress(body) + deflater.flush(), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body), "deflate"
    return body, None
