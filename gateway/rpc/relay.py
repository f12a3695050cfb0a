"""The relay between the gRPC front process and the gateway: frames over one local socket.

``grpc.aio`` costs about 0.3 ms of Python per call before any of Bastion's code runs, and in
the gateway's process that time is taken under the same GIL as the data plane, so gRPC served
at 70 % of HTTP's rate (benchmarks/RESULTS.md §12). The front process (``gateway.rpc.front``)
holds the ``grpc.aio`` server and the per-call bounds; the gateway receives each call as a few
frames over a ``socketpair`` and answers it with the same handlers and the same data plane as
before. Nothing is parsed twice: the front forwards a call's message bytes untouched.

A frame is a 9-byte header (payload length u32, kind u8, call id u32, big-endian) and the
payload. The front sends ``UNARY`` (a unary call: its metadata, peer and deadline as JSON,
then its one message), or ``OPEN`` then one ``MESSAGE`` or ``HALF_CLOSE`` for each ``PULL`` of
a stream, ``WROTE`` (a stream reply was taken, or not) and ``CANCEL`` (the client is gone);
``EVENT`` counts a rejection the front made; ``READY`` says the port is bound. The gateway
sends ``REPLY`` (a stream's message), ``END`` (the status, trailing metadata and a unary
call's reply) and ``SHUTDOWN``. Either side closes the socket on a malformed frame.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IBI")
# front -> gateway
UNARY, OPEN, MESSAGE, HALF_CLOSE, CANCEL, WROTE, EVENT, READY = range(1, 9)
# gateway -> front
END, REPLY, PULL, SHUTDOWN = range(9, 13)
CONTROL_CALL = 0  # the call id of frames about the relay itself (EVENT, READY, SHUTDOWN)
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Opening:
    """What the gateway needs of a call besides its messages: the full method name, the
    caller's text metadata, its peer (gRPC's ``ipv4:host:port`` form) and the seconds left
    before its deadline (None: no deadline)."""

    method: str
    metadata: list[tuple[str, str]]
    peer: str
    remaining_s: float | None

    def encode(self) -> bytes:
        return orjson.dumps([self.method, self.metadata, self.peer, self.remaining_s])

    @classmethod
    def decode(cls, raw: bytes) -> Opening:
        """Raises ``ValueError`` for bytes the front did not write."""
        method, metadata, peer, remaining = orjson.loads(raw)
        pairs = [(str(k), str(v)) for k, v in metadata]
        left = None if remaining is None else float(remaining)
        return cls(str(method), pairs, str(peer), left)


def encode_unary(opening: Opening, message: bytes) -> bytes:
    head = opening.encode()
    return _U32.pack(len(head)) + head + message


def decode_unary(payload: bytes) -> tuple[Opening, bytes]:
    (size,) = _U32.unpack_from(payload)
    return Opening.decode(payload[4 : 4 + size]), payload[4 + size :]


@dataclass
class Ending:
    """A call's status: gRPC's numeric code (0 OK), its details, the trailing metadata
    (``-bin`` keys carry bytes) and, for a unary call that succeeded, the reply."""

    code: int = 0
    details: str = ""
    trailing: Metadata = ()
    reply: bytes = b""

    def encode(self) -> bytes:
        details = self.details.encode()
        parts = [bytes((self.code,)), _U32.pack(len(details)), details]
        parts.append(_U16.pack(len(self.trailing)))
        for key, value in self.trailing:
            name = key.encode()
            data = value if isinstance(value, bytes) else value.encode()
            parts += [_U16.pack(len(name)), name, bytes((isinstance(value, bytes),))]
            parts += [_U32.pack(len(data)), data]
        parts.append(self.reply)
        return b"".join(parts)

    @classmethod
    def decode(cls, raw: bytes) -> Ending:
        """Raises ``struct.error`` or ``ValueError`` for bytes the gateway did not write."""
        code = raw[0]
        (size,) = _U32.unpack_from(raw, 1)
        at = 5 + size
        details = raw[5:at].decode()
        (count,) = _U16.unpack_from(raw, at)
        at += 2
        trailing: list[tuple[str, str | bytes]] = []
        for _ in range(count):
            (size,) = _U16.unpack_from(raw, at)
            key = raw[at + 2 : at + 2 + size].decode()
            at += 2 + size
            binary = raw[at]
            (size,) = _U32.unpack_from(raw, at + 1)
            data = raw[at + 5 : at + 5 + size]
            at += 5 + size
            trailing.append((key, data if binary else data.decode()))
        return cls(code, details, tuple(trailing), raw[at:])


@dataclass
class FrameProtocol(asyncio.Protocol):
    """Both ends of the relay: splits the byte stream into frames for ``on_frame(kind, call,
    payload)`` and writes frames. A frame over ``max_frame_bytes`` is a broken peer: the
    connection is closed (``on_lost`` is called, as for any lost connection)."""

    on_frame: Callable[[int, int, bytes], None]
    on_lost: Callable[[Exception | None], None]
    max_frame_bytes: int
    transport: asyncio.Transport | None = None
    _buffer: bytearray = field(default_factory=bytearray)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost(exc)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at, end = 0, len(buffer)
        with memoryview(buffer) as view:
            while end - at >= HEADER.size:
                size, kind, call = HEADER.unpack_from(buffer, at)
                if size > self.max_frame_bytes:
                    log.error("relay: a frame of %d bytes is over the limit; closing", size)
                    self.close()
                    return
                if end - at - HEADER.size < size:
                    break
                start = at + HEADER.size
                payload = view[start : start + size].tobytes()
                at = start + size
                self.on_frame(kind, call, payload)
        del buffer[:at]

    def send(self, kind: int, call: int, payload: bytes = b"") -> None:
        """Writes one frame (dropped when the connection is gone: the peer has ended)."""
        if self.transport is not None:
            self.transport.write(HEADER.pack(len(payload), kind, call) + payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
