"""A relayed call's context on the gateway's side: what the handlers read of a
``grpc.aio.ServicerContext``, served from the frames of ``gateway.rpc.relay``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from bastion.gateway.rpc import relay


class Aborted(Exception):
    """Raised by ``RelayedContext.abort``, as ``grpc.aio``'s abort raises: the call is over."""


class RelayedContext:
    """A relayed call's context: what the handlers read of ``grpc.aio.ServicerContext``
    (metadata, peer, time left, ``abort``) and a stream's ``read`` and ``write``."""

    def __init__(self, ident: int, opening: relay.Opening, link: relay.FrameProtocol) -> None:
        self.ident, self.opening, self.link = ident, opening, link
        left = opening.remaining_s
        self.deadline = None if left is None else time.monotonic() + left
        self.ending: relay.Ending | None = None
        self.task: asyncio.Task[None] | None = None
        # a stream reads and writes at once: a read waits for MESSAGE or HALF_CLOSE, a write
        # for WROTE (each one at a time)
        self._read: asyncio.Future[Any] | None = None
        self._wrote: asyncio.Future[bool] | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.opening.metadata

    def peer(self) -> str:
        return self.opening.peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self.ending = relay.Ending(code.value[0], details, tuple(trailing_metadata or ()))
        raise Aborted(details)

    async def read(self) -> Any:
        """The stream's next message, or ``grpc.aio.EOF`` when the client half-closed."""
        self._read = asyncio.get_running_loop().create_future()
        self.link.send(relay.PULL, self.ident)
        try:
            return await self._read
        finally:
            self._read = None

    async def write(self, message: bytes | Message) -> bool:
        """Sends one reply of a stream; False when the client is gone or did not take it in
        time (the front's write timeout): nothing more should be sent."""
        data = message if isinstance(message, bytes) else message.SerializeToString()
        self._wrote = asyncio.get_running_loop().create_future()
        self.link.send(relay.REPLY, self.ident, data)
        try:
            return await self._wrote
        finally:
            self._wrote = None

    def delivered(self, message: Any) -> None:
        """A MESSAGE (its bytes) or HALF_CLOSE (``grpc.aio.EOF``) for the read that waits."""
        if self._read is not None and not self._read.done():
            self._read.set_result(message)

    def written(self, taken: bool) -> None:
        """WROTE: whether the client took the reply that waits."""
        if self._wrote is not None and not self._wrote.done():
            self._wrote.set_result(taken)


async def messages(context: RelayedContext) -> AsyncIterator[bytes]:
    """A stream's messages until the client half-closes (the front times them)."""
    while (raw := await context.read()) is not grpc.aio.EOF:
        yield raw
