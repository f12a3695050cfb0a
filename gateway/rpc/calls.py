"""The bounds every gRPC call gets before its handler sees a byte: the limits a public endpoint
needs, which ``grpc.aio`` alone does not give.

Every RPC is registered with a streaming request side, so a handler runs as soon as a call's
headers arrive (a unary handler would run only once its whole message had come). That lets the
gate:

- count the call from its start, so calls that send headers and then nothing count against
  ``grpc_max_concurrent_rpcs`` (past it: UNAVAILABLE at once), while the health service's
  ``Check`` is never counted (a probe must answer while the port is flooded);
- give a call ``http_body_timeout_s`` to deliver its message (then DEADLINE_EXCEEDED, and the
  part received is freed), and answer a call that ends with no message INVALID_ARGUMENT (gRPC
  itself would leave it open); a stream gets the same for its first message, then
  ``grpc_stream_idle_timeout_s`` between messages;
- give a reply ``http_write_timeout_s`` to be taken by a client that does not read (streams).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from bastion.gateway.errors import BastionError, InvalidInput, Unavailable

Context = grpc.aio.ServicerContext
Abort = Callable[[Context, BastionError], Awaitable[None]]


class RequestTimeout(BastionError):
    """The client did not send its request in time (HTTP 408, gRPC DEADLINE_EXCEEDED)."""

    status = 408
    reason = "REJECTED"


class CallGate:
    """Counts calls and bounds the time their bytes may take. ``abort`` answers an error."""

    def __init__(
        self,
        limit: int,
        body_timeout_s: float,
        write_timeout_s: float,
        abort: Abort,
        on_reject: Callable[[str], None],
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.limit, self.calls = limit, 0
        self.body_timeout_s, self.write_timeout_s = body_timeout_s, write_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._abort, self._reject = abort, on_reject

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.calls >= self.limit:
            self._reject("grpc_calls")
            raise Unavailable(f"{self.limit} gRPC calls open; retry later")
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1

    async def message(self, context: Context) -> bytes:
        """The call's next message, within the body timeout. Raises ``RequestTimeout``, and
        ``InvalidInput`` when the call ends without one."""
        raw = await self._read(context, self.body_timeout_s, "grpc_body_timeout")
        if raw is grpc.aio.EOF:
            raise InvalidInput("the call ended without a request message")
        return raw

    async def _read(self, context: Context, seconds: float, reason: str) -> Any:
        try:
            async with asyncio.timeout(seconds):
                return await context.read()
        except TimeoutError:
            self._reject(reason)
            raise RequestTimeout(f"no request message arrived within {seconds:g} s") from None

    async def write(self, context: Context, reply: bytes) -> bool:
        """Sends one reply of a stream; False when the client is gone or does not read it in
        time (the call is then over: nothing more is sent)."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await context.write(reply)
        except TimeoutError:
            self._reject("grpc_write_timeout")
            return False
        except Exception:  # the peer went away mid-stream: not an error of ours to log
            return False
        return True

    def unary(
        self, behavior: Callable[[bytes, Context], Awaitable[bytes]], counted: bool = True
    ) -> Callable[[Any, Context], Awaitable[bytes | None]]:
        """A unary RPC's handler: one message, within the timeout, then ``behavior``."""

        async def handler(_requests: Any, context: Context) -> bytes | None:
            try:
                with self._slot() if counted else contextlib.nullcontext():
                    raw = await self.message(context)
                    return await behavior(raw, context)
            except BastionError as exc:
                await self._abort(context, exc)
            return None

        return handler

    def stream(
        self, behavior: Callable[[AsyncIterator[bytes], Context], Awaitable[None]]
    ) -> Callable[[Any, Context], Awaitable[None]]:
        """A streaming RPC's handler: counted for its whole life; ``behavior`` reads with
        ``messages`` and writes with ``write``."""

        async def handler(_requests: Any, context: Context) -> None:
            try:
                with self._slot():
                    await behavior(self.messages(context), context)
            except BastionError as exc:
                await self._abort(context, exc)

        return handler

    async def messages(self, context: Context) -> AsyncIterator[bytes]:
        """A stream's messages until the client half-closes: the first within the body timeout,
        each next within the idle timeout (``RequestTimeout`` past either), so a stream that
        sends nothing does not hold its call slot for ever."""
        seconds, reason = self.body_timeout_s, "grpc_body_timeout"
        while (raw := await self._read(context, seconds, reason)) is not grpc.aio.EOF:
            yield raw
            seconds, reason = self.idle_timeout_s, "grpc_stream_idle"
