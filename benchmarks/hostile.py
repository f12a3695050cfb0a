"""Hostile requests for the front door, and a raw HTTP/1.1 exchange that survives them.

The payloads are the ones the issue "Harden the front door" measured before the fix: PNGs whose
header claims 4096x4096 (65 KB on the wire), BYTES tensors of 16 M empty elements (64 MB),
gzip bodies that inflate past (or just under) the 64 MiB body limit, a 16 MiB header, 20,000
headers, and request heads trickled a byte at a time. ``benchmarks.abuse`` fires them from many
processes; ``tests/security`` fires each once at a small-limit server and checks the answer.

A refused request is answered while its client may still be sending (the server closes a 16 MiB
head after 32 KiB), so ``exchange`` ignores send errors and then reads whatever came back.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BODY_BYTES = 64 << 20  # the gateway's default max_body_bytes


def model_limits(model: str = "digits") -> tuple[int, int]:
    """(body bytes, encoded image bytes) the gateway allows for a bundled model by default."""
    from bastion.gateway.limits import model_limits as limits_of
    from bastion.gateway.repository import ModelRepository
    from bastion.gateway.settings import DEFAULT_REPOSITORY, Settings

    limits = limits_of(ModelRepository(DEFAULT_REPOSITORY).config(model), Settings())
    return limits.codec.max_body_bytes, limits.images.max_bytes
_U32 = struct.Struct("<I")


def oversized_png(width: int = 4096, height: int = 4096) -> bytes:
    """A blank RGBA PNG: about 65 KB on the wire for 4096x4096, 64 MiB once decoded."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGBA", (width, height)).save(out, "PNG", optimize=True)
    return out.getvalue()


def bytes_body(
    items: list[bytes] | None, shape: list[int], blob: bytes | None = None, name: str = "images"
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension infer body with one BYTES input (``blob`` overrides ``items``)."""
    if blob is None:
        blob = b"".join(_U32.pack(len(item)) + item for item in items or [])
    header = {
        "inputs": [
            {
                "name": name,
                "datatype": "BYTES",
                "shape": shape,
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    js = json.dumps(header).encode()
    return js + blob, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(js))}


def image_body(png: bytes) -> tuple[bytes, dict[str, str]]:
    """One encoded image for the digits model, which takes PNG/JPEG in a BYTES input."""
    return bytes_body([png], [1])


def bytes_flood(count: int = 16_000_000) -> tuple[bytes, dict[str, str]]:
    """``count`` empty BYTES elements: four zero bytes each (64 MB for 16 M)."""
    return bytes_body(None, [count], blob=bytes(4 * count))


def gzip_bomb(inflated_bytes: int) -> tuple[bytes, dict[str, str]]:
    """A gzip body that inflates to ``inflated_bytes`` (about 1,000:1).

    The JSON header names an FP32 input with its data in binary, so a bomb under the body limit
    is inflated whole before the data-size check refuses it (400); one past it is cut off at the
    limit (413).
    """
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": [1, 1, 28, 28],
                "parameters": {"binary_data_size": 4 * 28 * 28},
            }
        ]
    }
    js = json.dumps(header).encode()
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflater.compress(js)]
    left, chunk = inflated_bytes - len(js), bytes(1 << 20)
    while left > 0:
        parts.append(deflater.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(deflater.flush())
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Encoding": "gzip",
        HEADER_LENGTH: str(len(js)),
    }
    return b"".join(parts), headers


def json_strings(json_bytes: int = 16 << 20) -> tuple[bytes, dict[str, str]]:
    """A JSON body of ``json_bytes``: one BYTES input of shape [1] whose data is about
    ``json_bytes / 3`` empty strings. Parsing it alone builds that many Python objects."""
    prefix = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"data":['
    suffix = b"]}]}"
    count = (json_bytes - len(prefix) - len(suffix) + 1) // 3
    return prefix + b",".join([b'""'] * count) + suffix, {"Content-Type": "application/json"}


def request_bytes(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """A whole HTTP/1.1 request as bytes (Content-Length added when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def huge_header(size: int = 16 << 20) -> bytes:
    """A GET whose one header value is ``size`` bytes."""
    return b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"


def many_headers(count: int = 20_000) -> bytes:
    """A GET with ``count`` small headers."""
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    return b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"


SLOW_HEAD = b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
SLOW_HEAD_TRICKLE = b"X-Slow: " + b"a" * 4096  # sent a byte at a time; never ends the head


@dataclass
class Reply:
    """What came back on a raw connection: a parsed response (status 0: none) and whether the
    server closed the connection."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False
    seconds: float = 0.0
    error: str | None = None


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, lower-case headers, body) of the first whole response in ``raw``, else None."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = raw[:end].decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = raw[end + 4 : end + 4 + length]
    if len(body) < length:
        return None
    return int(parts[1]), headers, body


def read_reply(sock: socket.socket, deadline: float) -> Reply:
    """Reads one response (or the close) from ``sock`` until ``deadline`` (monotonic)."""
    raw, reply = b"", Reply()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            reply.error = "timeout"
            break
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            reply.error = "timeout"
            break
        except OSError as exc:
            reply.closed, reply.error = True, type(exc).__name__
            break
        if not data:
            reply.closed = True
            break
        raw += data
        parsed = parse_response(raw)
        if parsed is not None:
            reply.status, reply.headers, reply.body = parsed
            if reply.headers.get("connection", "").lower() == "close":
                reply.closed = _closed_soon(sock, deadline)
            return reply
    parsed = parse_response(raw)
    if parsed is not None:
        reply.status, reply.headers, reply.body = parsed
    return reply


def _closed_soon(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes the connection (EOF or reset) before ``deadline``."""
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        while sock.recv(1 << 16):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def exchange(host: str, port: int, data: bytes, timeout_s: float = 10.0) -> Reply:
    """Sends ``data`` on a fresh connection and reads the answer; a server that refuses
    mid-send still has its response read."""
    started = time.monotonic()
    deadline = started + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer is still readable
            sock.sendall(data)
        reply = read_reply(sock, deadline)
    reply.seconds = time.monotonic() - started
    return reply
