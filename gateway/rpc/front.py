"""The gRPC front process: the ``grpc.aio`` server and every per-call bound, relaying each call
to the gateway (``gateway.rpc.relay``).

Started by the gateway (``GrpcServer``) with one end of a ``socketpair`` and its configuration;
never by hand. It binds the gRPC port, answers READY with the bound port, and serves until the
gateway sends SHUTDOWN (the accepted calls are answered within the grace) or its socket closes
(the gateway is gone: the calls still open end UNAVAILABLE and the process exits). It parses no
message: a call's bytes go to the gateway as they came, where the data plane parses them off the
event loop as before. SIGINT is ignored (a terminal's Ctrl-C reaches the gateway, which stops
the front in order); SIGTERM stops it as SHUTDOWN does.

Run by the gateway as ``python -m bastion.gateway.rpc.front --fd N --config JSON``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson

from bastion.gateway.errors import BastionError, Unavailable
from bastion.gateway.rpc import relay
from bastion.gateway.rpc.calls import CallGate
from bastion.gateway.rpc.status import to_status

log = logging.getLogger("bastion.grpc.front")
Context = grpc.aio.ServicerContext
CODES = {code.value[0]: code for code in grpc.StatusCode}
_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}
_LOST = -1  # a call's inbox item when the gateway is gone
_FAILED = -2  # a stream's read failed in the front (its error follows)


class GatewayGone(Unavailable):
    """The gateway's end of the relay closed while the call was open."""


class Front:
    """The front's calls and its relay. ``config``: the gRPC server's ``options`` and
    ``compression``, the ``address`` to bind, the ``methods`` (full name → [streaming, the pool
    of call slots it holds]), the call gates' ``limits`` and ``max_frame_bytes``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        limits = config["limits"]
        self.gates = {
            pool: CallGate(
                limits[size],
                limits["body_timeout_s"],
                limits["write_timeout_s"],
                self._abort,
                self._reject,
                limits["idle_timeout_s"],
            )
            for pool, size in (("calls", "max_calls"), ("watches", "max_watches"))
        }
        self.relay: relay.FrameProtocol | None = None
        self.calls: dict[int, asyncio.Queue[tuple[int, Any]]] = {}
        self._next = 0
        self._stop: asyncio.Future[float] | None = None

    # -- the relay -------------------------------------------------------------------------------
    def on_frame(self, kind: int, call: int, payload: bytes) -> None:
        if kind == relay.SHUTDOWN:
            self._stopping(float(orjson.loads(payload)["grace_s"]))
            return
        inbox = self.calls.get(call)
        if inbox is not None:  # frames for a call already over are dropped
            inbox.put_nowait((kind, payload))

    def on_lost(self, exc: Exception | None) -> None:
        self.relay = None
        for inbox in self.calls.values():
            inbox.put_nowait((_LOST, None))
        self._stopping(0.0)

    def _stopping(self, grace_s: float) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(grace_s)

    def _send(self, kind: int, call: int, payload: bytes = b"") -> None:
        if self.relay is not None:
            self.relay.send(kind, call, payload)

    def _event(self, **fields: Any) -> None:
        self._send(relay.EVENT, relay.CONTROL_CALL, orjson.dumps(fields))

    async def _abort(self, context: Context, exc: BastionError) -> None:
        self._event(status=exc.status)
        status = to_status(exc)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _reject(self, reason: str) -> None:
        self._event(rejected=reason)

    def _open(self) -> tuple[int, asyncio.Queue[tuple[int, Any]]]:
        self._next = self._next % 0xFFFFFFFF + 1  # ids wrap; 0 is the relay's own
        inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.calls[self._next] = inbox
        return self._next, inbox

    # -- calls -----------------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """One handler per method the gateway serves; any other is UNIMPLEMENTED (gRPC's)."""
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for full, (streaming, pool) in self.config["methods"].items():
            service, _, name = full.strip("/").partition("/")
            gate = self.gates[pool or "calls"]
            if streaming:
                relayed = gate.stream(self._stream(full, gate))
                method = grpc.stream_stream_rpc_method_handler(relayed)
            else:
                method = grpc.stream_unary_rpc_method_handler(
                    gate.unary(self._unary(full), counted=pool is not None)
                )
            by_service.setdefault(service, {})[name] = method
        return _Handlers(by_service)

    def _unary(self, method: str) -> Callable[[bytes, Context], Any]:
        async def call(raw: bytes, context: Context) -> bytes:
            if self.relay is None:
                raise GatewayGone("the gateway is restarting; retry")
            ident, inbox = self._open()
            ended = False
            try:
                self._send(relay.UNARY, ident, relay.encode_unary(_opening(method, context), raw))
                kind, payload = await inbox.get()
                ended = True
            finally:
                del self.calls[ident]
                if not ended:  # cancelled: the client went away
                    self._send(relay.CANCEL, ident)
            return await _finish(kind, payload, context)

        return call

    def _stream(
        self, method: str, gate: CallGate
    ) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def call(messages: AsyncIterator[bytes], context: Context) -> None:
            if self.relay is None:
                raise GatewayGone("the gateway is restarting; retry")
            ident, inbox = self._open()
            reader: asyncio.Task[None] | None = None

            async def pull() -> None:
                try:
                    raw = await anext(messages)
                except StopAsyncIteration:
                    self._send(relay.HALF_CLOSE, ident)
                except BastionError as exc:  # the gate's timeouts: the call ends with it
                    inbox.put_nowait((_FAILED, exc))
                else:
                    self._send(relay.MESSAGE, ident, raw)

            ended = False
            try:
                self._send(relay.OPEN, ident, _opening(method, context).encode())
                while True:
                    kind, payload = await inbox.get()
                    if kind == relay.PULL:
                        reader = asyncio.create_task(pull())
                    elif kind == relay.REPLY:
                        taken = await gate.write(context, payload)
                        self._send(relay.WROTE, ident, b"\x01" if taken else b"\x00")
                    else:
                        ended = kind in (relay.END, _LOST)
                        break
            finally:
                del self.calls[ident]
                if reader is not None:
                    reader.cancel()
                if not ended:
                    self._send(relay.CANCEL, ident)
            await _finish(kind, payload, context)

        return call

    # -- the process -----------------------------------------------------------------------------
    async def run(self, fd: int) -> int:
        """Serves until told to stop; 0, or 1 when the port could not be bound."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        sock = socket.socket(fileno=fd)
        link = relay.FrameProtocol(self.on_frame, self.on_lost, self.config["max_frame_bytes"])
        await loop.create_connection(lambda: link, sock=sock)
        self.relay = link
        server = grpc.aio.server(
            options=[tuple(option) for option in self.config["options"]],
            compression=_COMPRESSION[self.config["compression"]],
        )
        server.add_generic_rpc_handlers((self.handler(),))
        address = self.config["address"]
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind this way
            self._event_ready(error=f"cannot bind gRPC to {address}: {exc}")
            return 1
        await server.start()
        loop.add_signal_handler(signal.SIGTERM, self._stopping, self.config["grace_s"])
        self._event_ready(port=port)
        grace_s = await self._stop
        await server.stop(grace_s)
        if self.relay is not None:
            self.relay.close()
        return 0

    def _event_ready(self, **fields: Any) -> None:
        self._send(relay.READY, relay.CONTROL_CALL, orjson.dumps(fields))


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, by_service: dict[str, dict[str, grpc.RpcMethodHandler]]) -> None:
        self.by_method = {
            f"/{service}/{name}": handler
            for service, methods in by_service.items()
            for name, handler in methods.items()
        }

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        return self.by_method.get(handler_call_details.method)


def _opening(method: str, context: Context) -> relay.Opening:
    """The call's text metadata (``-bin`` values are bytes: the gateway reads none), peer and
    time left."""
    metadata = [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str) and not key.endswith("-bin")
    ]
    return relay.Opening(method, metadata, context.peer() or "", context.time_remaining())


async def _finish(kind: int, payload: Any, context: Context) -> bytes:
    """The call's end as the gateway (or the front) decided it: the reply, or an abort."""
    if kind == _LOST:
        raise GatewayGone("the gateway went away while answering; retry")
    if kind == _FAILED:
        raise payload
    ending = relay.Ending.decode(payload)
    if ending.code:
        await context.abort(CODES[ending.code], ending.details, ending.trailing)
    return ending.reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the relay socket's descriptor")
    parser.add_argument("--config", required=True, help="the front's configuration (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="bastion grpc front: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return asyncio.run(Front(orjson.loads(args.config)).run(args.fd))


if __name__ == "__main__":
    sys.exit(main())
