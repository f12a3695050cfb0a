"""Content-Encoding of v2 HTTP bodies: gzip and deflate, both ways, with limits.

Inflation is the classic amplifier (a 64 KB gzip body can inflate to 64 MiB), so it runs in
bounded steps under the decode budget and stops at the model's body limit.
"""

from __future__ import annotations

import zlib

from bastion.gateway.errors import InvalidInput, PayloadTooLarge
from bastion.gateway.protocol.budget import checkpoint

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


_CODINGS = ("gzip", "deflate")  # the server's preference on equal weight
_MAX_CODINGS = 32  # an Accept-Encoding with more entries is read no further


def preferred_coding(accept_encoding: str | None) -> str | None:
    """The response coding an ``Accept-Encoding`` asks for, by RFC 9110 section 12.5.3: each
    coding has a weight (``q``, 0 to 1, default 1); ``q=0`` means "not acceptable"; ``*``
    stands for every coding not named. The acceptable coding of highest weight among gzip and
    deflate (gzip on a tie), else None: identity (also when identity itself has ``q=0``, which
    the RFC allows a server to answer with an unencoded body). A malformed weight counts as 0.
    """
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for part in accept_encoding.split(",")[:_MAX_CODINGS]:
        name, _, params = part.partition(";")
        weights[name.strip().lower()] = _weight(params)
    best, best_q = None, 0.0
    for coding in _CODINGS:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    return best


def _weight(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compresses a response as the client's ``Accept-Encoding`` prefers (``preferred_coding``);
    returns the body and its coding (None: sent as it is)."""
    coding = preferred_coding(accept_encoding)
    if coding == "gzip":
        deflater = zlib.compressobj(wbits=31)
        return deflater.compress(body) + deflater.flush(), "gzip"
    if coding == "deflate":
        return zlib.compress(body), "deflate"
    return body, None
