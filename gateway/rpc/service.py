"""The RPCs of ``inference.GRPCInferenceService`` that ``tritonclient.grpc`` calls, over the
data plane HTTP uses: the same validation, batching, screening, containment and metrics.

Every handler takes the request's serialised bytes, never a parsed message, so nothing untrusted
is parsed on the event loop by gRPC itself: an inference request is parsed in the decode pool,
and a control request only once its size is under ``max_control_body_bytes`` (a few hundred
bytes in practice; parsing it costs microseconds). The shared-memory status RPCs answer that no
region is registered; registering one, tracing and log settings answer UNIMPLEMENTED, as they
do over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb

from bastion.gateway import model_control
from bastion.gateway.dataplane import DataPlane
from bastion.gateway.errors import (
    BastionError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from bastion.gateway.identity.caller import check_admin, resolve_caller
from bastion.gateway.protocol.bounds import Limits, RawInput
from bastion.gateway.protocol.grpc_codec import (
    parse_infer_request,
    to_infer_request,
    to_infer_response,
)
from bastion.gateway.protocol.types import Caller, InferRequest, InferResponse
from bastion.gateway.repository import parse_version
from bastion.gateway.rpc.status import clip, to_status

if TYPE_CHECKING:  # the handlers answer relayed calls (gateway.rpc.context)
    from bastion.gateway.rpc.context import RelayedContext as Context

FINAL_ASKED = "triton_enable_empty_final_response"  # tritonclient's enable_empty_final_response
FINAL = "triton_final_response"  # Triton's flag on a stream's last response for a request
log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
MAX_METADATA_VALUE_CHARS = 8192
_NO_DEADLINE_S = 10 * 365 * 86400  # gRPC reports "no deadline" as a time far in the future


@dataclass(frozen=True)
class Method:
    """One RPC as the front serves it: ``streaming`` (its replies; its requests are read as a
    stream either way), ``run``: ``(request bytes, context) -> reply`` for a unary RPC,
    ``(messages, context) -> None`` for a streaming one (which writes its replies), and the
    ``pool`` of call slots it holds while open: ``calls`` (``grpc_max_concurrent_rpcs``),
    ``watches`` (health watches, which stay open, have their own few) or None (uncounted)."""

    streaming: bool
    run: Callable[..., Awaitable[Any]]
    pool: str | None = "calls"


class InferenceService:
    """The servicer; ``state`` is the app's state (data plane, keys, metrics, in-flight gate,
    incident log), read at call time so it can be built before the lifespan fills it."""

    def __init__(self, state: Any) -> None:
        self.state = state

    @property
    def plane(self) -> DataPlane:
        return self.state.dataplane

    def methods(self) -> dict[str, Method]:
        """Every implemented RPC by its full name, taking and returning bytes."""
        control: dict[str, tuple[type[Message], Callable[..., Awaitable[Message]]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.unload),
            "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, self.no_regions),
            "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, self.no_regions),
        }
        prefix = f"/{SERVICE}/"
        methods = {
            prefix + name: Method(False, partial(self._control, kind, method))
            for name, (kind, method) in control.items()
        }
        methods[prefix + "ModelInfer"] = Method(False, self.model_infer)
        methods[prefix + "ModelStreamInfer"] = Method(True, self.model_stream_infer)
        return methods

    # -- errors ----------------------------------------------------------------------------------
    async def abort(self, context: Context, exc: BastionError) -> None:
        """Counts the error and ends the call with its status (raises, as ``abort`` does)."""
        self.state.metrics.errors.labels(str(exc.status)).inc()
        status = to_status(exc)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _reject(self, reason: str) -> None:
        self.state.metrics.rejected.labels(reason).inc()

    # -- control RPCs ----------------------------------------------------------------------------
    async def _control(
        self,
        kind: type[Message],
        method: Callable[[Any, dict[str, str]], Awaitable[Message]],
        raw: bytes,
        context: Context,
    ) -> bytes:
        try:
            limit = self.plane.settings.max_control_body_bytes
            if len(raw) > limit:
                self._reject("control_body")
                raise PayloadTooLarge(f"request of {len(raw)} bytes is over {limit} for this RPC")
            request = kind()
            try:
                request.ParseFromString(raw)
            except DecodeError as exc:
                raise InvalidInput(f"request is not a {kind.__name__}: {exc}") from None
            response = await method(request, metadata(context))
        except BastionError as exc:
            await self.abort(context, exc)
        except Exception as exc:  # answered, never a dropped stream
            log.exception("unhandled error in %s", kind.__name__)
            await self.abort(context, BastionError(f"internal error: {type(exc).__name__}"))
        return response.SerializeToString()

    async def server_live(self, request: pb.ServerLiveRequest, meta: dict) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, meta: dict) -> Message:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def model_ready(self, request: pb.ModelReadyRequest, meta: dict) -> Message:
        try:
            model = self.plane.registry.get(request.name, parse_version(request.version or None))
            model.check_ready()
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: pb.ServerMetadataRequest, meta: dict) -> Message:
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def model_metadata(self, request: pb.ModelMetadataRequest, meta: dict) -> Message:
        data = self.plane.model_metadata(request.name, parse_version(request.version or None))
        return json_format.ParseDict(data, pb.ModelMetadataResponse())

    async def model_config(self, request: pb.ModelConfigRequest, meta: dict) -> Message:
        config = self.plane.model_config(request.name, parse_version(request.version or None))
        message = json_format.ParseDict(
            config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
        )
        return pb.ModelConfigResponse(config=message)

    async def model_statistics(self, request: pb.ModelStatisticsRequest, meta: dict) -> Message:
        name = request.name or None
        version = parse_version(request.version or None) if name else None
        stats = self.plane.statistics(name, version)
        return json_format.ParseDict(
            stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
        )

    async def repository_index(self, request: pb.RepositoryIndexRequest, meta: dict) -> Message:
        entries = self.plane.registry.index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries]
        )

    async def load(self, request: pb.RepositoryModelLoadRequest, meta: dict) -> Message:
        check_admin(self.plane.settings, meta.get("authorization"))
        if request.parameters:
            raise InvalidInput("load parameters (config or files override) are not supported")
        incident_log = self.state.incident_log
        await model_control.load_model(self.plane.registry, incident_log, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def unload(self, request: pb.RepositoryModelUnloadRequest, meta: dict) -> Message:
        check_admin(self.plane.settings, meta.get("authorization"))
        incident_log = self.state.incident_log
        await model_control.unload_model(self.plane.registry, incident_log, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def no_regions(self, request: Message, meta: dict) -> Message:
        if isinstance(request, pb.SystemSharedMemoryStatusRequest):
            return pb.SystemSharedMemoryStatusResponse()
        return pb.CudaSharedMemoryStatusResponse()

    # -- inference -------------------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: Context) -> bytes:
        try:
            caller = self._caller(metadata(context), context)
            response = await self._infer(raw, caller, deadline_of(context))
        except BastionError as exc:
            await self.abort(context, exc)
        except Exception as exc:
            log.exception("unhandled error in ModelInfer")
            await self.abort(context, BastionError(f"internal error: {type(exc).__name__}"))
        tracing = self.plane.tracing
        if tracing is None or not tracing.active():
            return to_infer_response(response).SerializeToString()
        with tracing.span("encode"):
            return to_infer_response(response).SerializeToString()

    def _caller(self, meta: dict[str, str], context: Context) -> Caller:
        return resolve_caller(
            self.plane.settings, self.state.keys, meta, peer_address(context), self._reject
        )

    async def _infer(
        self, raw: bytes, caller: Caller, deadline_ns: int | None, final: list[bool] | None = None
    ) -> InferResponse:
        """One ModelInfer message through the data plane. ``final`` (a stream's) receives
        whether the request asked for ``triton_enable_empty_final_response``."""
        named: list[Any] = []  # the parsed message's model, version and id, for a stream error

        def parse() -> tuple[str, int | None, int, Any]:
            message = parse_infer_request(raw)
            bound = self.plane.settings.max_request_id_chars  # echoed on a stream's error
            named.append(
                tuple(v[:bound] for v in (message.model_name, message.model_version, message.id))
            )
            if final is not None:
                asked = message.parameters.get(FINAL_ASKED)
                final.append(
                    asked is not None
                    and asked.WhichOneof("parameter_choice") == "bool_param"
                    and asked.bool_param
                )

            def decode(_raw: RawInput | None, limits: Limits) -> InferRequest:
                return to_infer_request(message, limits)

            return (
                message.model_name,
                parse_version(message.model_version or None),
                len(raw),
                decode,
            )

        try:
            with self.state.in_flight.slot():
                return await self.plane.infer_message(parse, caller, deadline_ns)
        except BastionError as exc:  # a stream's error names its request (as tritonclient reads)
            if named:
                exc.request = named[0]
            raise

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Each request of the stream is answered, in the order they finish (match them by
        request id), with at most ``grpc_stream_window`` of them in flight; a failed request is
        an ``error_message`` on the stream (which stays open), as Triton answers, with its
        ``infer_response`` naming the model and the request id. A request that sets
        ``triton_enable_empty_final_response`` (tritonclient's ``enable_empty_final_response``)
        gets ``triton_final_response`` true on its answer: these models are not decoupled,
        so their one answer is the final one, as Triton marks it. The caller is resolved per
        request, so a key revoked mid-stream stops working at once. A reply the client does
        not take within ``http_write_timeout_s`` ends the stream."""
        meta = metadata(context)
        self._caller(meta, context)  # with keys on, a stream without one is refused at once
        window = asyncio.Semaphore(self.plane.settings.grpc_stream_window)
        tracing = self.plane.tracing
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(raw: bytes) -> None:
            try:
                caller = self._caller(meta, context)
                final: list[bool] = []
                response = await self._infer(raw, caller, deadline_of(context), final)
                reply = pb.ModelStreamInferResponse(infer_response=to_infer_response(response))
                if final and final[0]:  # a model that is not decoupled: its one answer is final
                    reply.infer_response.parameters[FINAL].bool_param = True
            except BastionError as exc:
                self.state.metrics.errors.labels(str(exc.status)).inc()
                name, version, request_id = getattr(exc, "request", ("", "", ""))
                named = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
                reply = pb.ModelStreamInferResponse(
                    error_message=clip(exc.message), infer_response=named
                )
            except Exception as exc:
                log.exception("unhandled error in ModelStreamInfer")
                reply = pb.ModelStreamInferResponse(
                    error_message=f"internal error: {type(exc).__name__}"
                )
            await answers.put(reply.SerializeToString())

        async def read() -> None:
            try:
                async for raw in requests:
                    await window.acquire()
                    # each message counts against the trace cap, as an HTTP request does
                    context, message = (
                        tracing.for_message() if tracing is not None else (None, None)
                    )
                    task = asyncio.create_task(answer(raw), context=context)
                    if message is not None and tracing is not None:
                        task.add_done_callback(lambda _, m=message: tracing.finish(m))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await answers.get()) is not None:
                if not await context.write(reply):
                    break
                window.release()
            else:  # the client's side ended: a timeout there ends the stream with its status
                (ended,) = await asyncio.gather(reader, return_exceptions=True)
                if isinstance(ended, BastionError):
                    raise ended
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def metadata(context: Context) -> dict[str, str]:
    """The call's text metadata (keys are lower case in gRPC), each value bounded."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key.endswith("-bin") or not isinstance(value, str):
            continue
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidInput(f"metadata {key[:64]!r} is over {MAX_METADATA_VALUE_CHARS} chars")
        out[key] = value
    return out


def peer_address(context: Context) -> str | None:
    """The peer's address without its port (``ipv4:127.0.0.1:5555`` → ``127.0.0.1``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or None
    return rest or None


def deadline_of(context: Context) -> int | None:
    """The client's deadline on the ``perf_counter_ns`` clock, or None when it set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.perf_counter_ns() + int(max(remaining, 0.0) * 1e9)
