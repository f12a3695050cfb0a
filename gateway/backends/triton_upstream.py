"""A remote Triton as a model's backend: Bastion batches and screens, an existing Triton infers.

A model whose config says ``backend: "triton"`` names its upstream in parameters:

- ``upstream_url``: ``grpc://host:port`` or ``http://host:port`` (HTTP needs the
  ``triton-http`` extra: tritonclient's asyncio HTTP client runs on aiohttp);
- ``upstream_model`` (default: the model's own name) and ``upstream_version`` (default: the
  upstream's version policy picks);
- ``upstream_timeout_s`` and ``upstream_connections``, else the gateway's settings.

Calls go through tritonclient's asyncio clients on the event loop (no thread per call), with
binary tensors both ways, so the outputs a client gets are the upstream's bytes. The model is
ready only while the upstream answers: a watcher asks it for the model's metadata (checked
against the config once per reconnection) and readiness every ``upstream_health_interval_s``,
and a failed call marks it down at once.

Upstream errors become the protocol's statuses (``upstream_error``): what the upstream refused
as invalid is the client's 400, an absent or unready upstream model 503, a deadline 504, an
unimplemented feature 501, anything else 502 (the gateway got a bad answer from its upstream,
RFC 9110 section 15.6.3). Server-side messages and the upstream's address are logged, never
told to clients (the index and errors are public): they may name the upstream's hosts and files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bastion.gateway.errors import (
    BastionError,
    DeadlineExceeded,
    InvalidInput,
    Unavailable,
    Unsupported,
)
from bastion.gateway.monitoring.stats import BatchTimes
from bastion.gateway.protocol.dtypes import BY_V2
from bastion.gateway.repository import ConfigError, ModelConfig

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
PROTOCOLS = ("grpc", "http")
MAX_REASON_CHARS = 200
MAX_INSTANCES = 64  # batches in flight taken from the upstream's config, at most
UNAVAILABLE_STREAK = 3  # calls refused UNAVAILABLE in a row that mark the upstream down
MAX_RESPONSE_SLACK = 1 << 20  # bytes beyond the outputs' own: headers, JSON, framing


class BadGateway(BastionError):
    """The upstream answered with an error of its own or an answer that is not a valid one."""

    status = 502
    reason = "BACKEND"


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """Where a model's upstream is and how to call it."""

    protocol: str  # "grpc" or "http"
    address: str  # host:port, as tritonclient takes it
    model: str
    version: str  # "" lets the upstream's version policy pick
    timeout_s: float  # one call, connection included
    connections: int  # HTTP: the connection pool's size; gRPC: one HTTP/2 channel multiplexes
    health_interval_s: float
    max_response_bytes: int = 64 << 20  # an answer past it is refused unread

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"


def upstream_spec(
    config: ModelConfig,
    timeout_s: float,
    connections: int,
    health_interval_s: float,
    max_response_bytes: int = 64 << 20,
) -> UpstreamSpec:
    """The upstream a ``triton`` model's parameters name. Raises ``ConfigError`` for a missing
    or malformed URL (only ``grpc://host:port`` and ``http://host:port``), version or knob."""
    params = config.parameters
    where = f"model {config.name!r}"
    url = params.get("upstream_url", "")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: upstream_url is not a valid URL ({exc})") from None
    if parts.scheme not in PROTOCOLS or not parts.hostname or port is None:
        raise ConfigError(
            f"{where}: parameter upstream_url must be grpc://host:port or http://host:port"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{where}: upstream_url takes no path, query or credentials")
    if any(d < 0 for spec in config.inputs for d in spec.dims):
        raise ConfigError(
            f"{where}: a remote model's inputs need fixed dims: its requests are batched into "
            "one upstream call"
        )
    version = params.get("upstream_version", "")
    if version and not (version.isascii() and version.isdigit() and len(version) <= 18):
        raise ConfigError(f"{where}: upstream_version must be a positive integer")
    try:
        timeout = float(params.get("upstream_timeout_s", timeout_s))
        pool = int(params.get("upstream_connections", connections))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not (0 < timeout <= 3600) or not (1 <= pool <= 1024):
        raise ConfigError(
            f"{where}: upstream_timeout_s must be in (0, 3600], upstream_connections in [1, 1024]"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return UpstreamSpec(
        parts.scheme,
        f"{host}:{port}",
        params.get("upstream_model", config.name),
        version,
        timeout,
        pool,
        health_interval_s,
        response_cap(config, max_response_bytes),
    )


# aiohttp's errors for a pooled connection the upstream closed while idle: not a dead upstream
_DROPPED = {"ServerDisconnectedError", "ClientPayloadError", "ClientOSError"}
# tritonclient's status strings: gRPC's "StatusCode.X", HTTP's status code
_CLIENT = {"StatusCode.INVALID_ARGUMENT", "400", "413"}
_NOT_READY = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "503", "404"}
_OVERLOADED = {"StatusCode.RESOURCE_EXHAUSTED", "429"}
_DEADLINE = {"StatusCode.DEADLINE_EXCEEDED", "504", "408"}
_UNSUPPORTED = {"StatusCode.UNIMPLEMENTED", "501"}


def upstream_error(status: str | None, message: str) -> BastionError:
    """The protocol error for an upstream's ``InferenceServerException``.

    ``status``: tritonclient's (``StatusCode.INVALID_ARGUMENT`` over gRPC, ``"400"`` over
    HTTP). The upstream's own message is never quoted (it is logged): it may name the
    upstream's model, hosts and files.
    """
    status = status or ""
    if status in _CLIENT:  # its text is logged: it names the upstream's model, maybe files
        return InvalidInput("the upstream refused the request as invalid")
    if status in _NOT_READY:
        return Unavailable("the upstream model is not ready; retry later")
    if status in _OVERLOADED:
        return Unavailable("the upstream is overloaded; retry later")
    if status in _DEADLINE:
        return DeadlineExceeded("the upstream did not answer in time")
    if status in _UNSUPPORTED:
        return Unsupported("the upstream does not support this request")
    return BadGateway(f"the upstream failed the request ({clip(status, 40) or 'error'})")


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_compatible(config: ModelConfig, metadata: dict[str, Any], max_batch_size: int) -> None:
    """Refuses an upstream model that cannot take this config's batches or give its outputs.

    ``metadata``: the v2 model metadata as JSON (inputs and outputs with name, datatype, shape,
    the batch dimension first when the model batches). Raises ``ConfigError`` naming the
    first mismatch.
    """
    if max_batch_size < config.max_batch_size:
        raise ConfigError(
            f"the upstream's max_batch_size is {max_batch_size}, below this config's "
            f"{config.max_batch_size}"
        )
    for kind, specs in (("input", config.inputs), ("output", config.outputs)):
        theirs = {t.get("name"): t for t in metadata.get(f"{kind}s", [])}
        for spec in specs:
            tensor = theirs.get(spec.name)
            if tensor is None:
                raise ConfigError(f"the upstream model has no {kind} {spec.name!r}")
            shape = tuple(int(d) for d in tensor.get("shape", []))[1:]
            if tensor.get("datatype") != spec.datatype or not _same_dims(shape, spec.dims):
                theirs_type = clip(str(tensor.get("datatype")), 16)
                raise ConfigError(
                    f"the upstream's {kind} {spec.name!r} is {theirs_type} "
                    f"{clip(str(list(shape)), 80)}, this config's {spec.datatype} {list(spec.dims)}"
                )


def _same_dims(theirs: Sequence[int], ours: Sequence[int]) -> bool:
    return len(theirs) == len(ours) and all(
        t == o or t == -1 for t, o in zip(theirs, ours, strict=True)
    )


class TritonUpstream:
    """One model version's upstream: its client, its readiness and the batched call.

    Built and used on the event loop. ``ready`` and ``reason`` say whether it can serve and,
    if not, why (shown in the repository index).
    """

    device = "upstream"
    screening = None  # a model that screens does so locally, before this is called

    def __init__(
        self,
        spec: UpstreamSpec,
        config: ModelConfig,
        on_ready: Callable[[bool], None] = lambda ready: None,
        on_call: Callable[[float], None] = lambda seconds: None,
        on_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        """``on_ready``: told each change of readiness; ``on_call``: each call's seconds;
        ``on_error``: each failed call's kind (the upstream's status, ``timeout``,
        ``unreachable``, ...)."""
        self.spec = spec
        self.config = config
        self.ready = False
        self.reason = "the upstream has not answered yet"
        self._on_ready, self._on_call, self._errors = on_ready, on_call, on_error
        self._unavailable = 0  # calls refused UNAVAILABLE in a row
        self._checked = False
        self.instances = 0  # the upstream model's instance count, once its config is read
        self._inputs = [(t.name, t.datatype) for t in config.inputs]
        self._outputs = [  # BYTES arrive as numpy objects
            (t.name, BY_V2[t.datatype].numpy or np.dtype(object), t.dims) for t in config.outputs
        ]
        self._client, self._module, self._transport_errors = _client(spec)
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def probe(self) -> bool:
        """Asks the upstream once; True when its model is ready and matches the config."""
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                if not self._checked:
                    await self._check()
                ready = await self._client.is_model_ready(self.spec.model, self.spec.version)
        except ConfigError as exc:
            self._set(False, f"the upstream model does not match this config: {exc}")
        except Exception as exc:  # unreachable, refused, timed out, malformed: not ready
            kind = _kind(exc)
            if kind in ("StatusCode.NOT_FOUND", "404"):
                reason = (
                    f"the upstream has no such model: check upstream_model and version ({kind})"
                )
            else:
                reason = f"the upstream is unreachable ({kind})"
            self._set(False, reason)
        else:
            reason = "the upstream reports its model not ready"
            self._set(bool(ready), None if ready else reason)
        return self.ready

    async def _check(self) -> None:
        metadata = await self._client.get_model_metadata(
            self.spec.model, self.spec.version, **self._as_json
        )
        config = await self._client.get_model_config(
            self.spec.model, self.spec.version, **self._as_json
        )
        config = config.get("config", config)  # gRPC's JSON wraps it
        check_compatible(self.config, metadata, int(config.get("max_batch_size", 0)))
        groups = config.get("instance_group") or [{}]
        count = sum(max(1, int(g.get("count", 1))) for g in groups)
        self.instances = min(count, MAX_INSTANCES)  # the upstream's word, bounded
        self._checked = True

    @property
    def _as_json(self) -> dict[str, bool]:
        return {"as_json": True} if self.spec.protocol == "grpc" else {}

    async def _watch(self) -> None:
        while True:
            self._wake.clear()  # before the probe: a call failing during it wakes the next
            await self.probe()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.spec.health_interval_s):
                    await self._wake.wait()

    def _set(self, ready: bool, reason: str | None) -> None:
        if ready:
            self._unavailable = 0
        if ready != self.ready:
            if ready:
                log.info("model %s: upstream %s ready", self.config.name, self.spec.url)
            else:
                log.warning(
                    "model %s: upstream %s not ready: %s", self.config.name, self.spec.url, reason
                )
                self._checked = False  # it may come back as another model
            self._on_ready(ready)
        self.ready = ready
        self.reason = reason or ""

    async def infer(self, requests: Sequence[Arrays]) -> tuple[Arrays, BatchTimes]:
        """One upstream call for a batch's requests (rows concatenated, as ``run_batch`` does);
        the outputs by name, rows in order, as the upstream's arrays. Raises a protocol error
        (``upstream_error``) or ``Unavailable`` when the upstream cannot be reached."""
        if not self.ready:
            raise Unavailable(f"model {self.config.name!r} is not ready: {self.reason}")
        t0 = time.perf_counter_ns()
        batch = {name: np.concatenate([r[name] for r in requests]) for name, _ in self._inputs}
        inputs = []
        for name, datatype in self._inputs:
            tensor = self._module.InferInput(name, list(batch[name].shape), datatype)
            tensor.set_data_from_numpy(batch[name])
            inputs.append(tensor)
        wanted = [self._module.InferRequestedOutput(name) for name, _, _ in self._outputs]
        t1 = time.perf_counter_ns()
        result = await self._call(inputs, wanted)
        t2 = time.perf_counter_ns()
        self._on_call((t2 - t1) / 1e9)
        self._unavailable = 0
        rows = len(batch[self._inputs[0][0]])
        outputs = {}
        for name, dtype, dims in self._outputs:
            try:
                value = result.as_numpy(name)
            except Exception:  # text in number data, a wrong size: the upstream's fault
                log.warning("model %s: unreadable upstream output %r", self.config.name, name)
                value = None
            # checked at load, but the upstream may have swapped its model since
            if (
                value is None
                or value.dtype != dtype
                or value.shape[:1] != (rows,)
                or not _same_dims(dims, value.shape[1:])
            ):
                self._errors(BadGateway.__name__)
                raise BadGateway(f"the upstream's output {name!r} is not what the config says")
            outputs[name] = value
        return outputs, BatchTimes(t1 - t0, t2 - t1, time.perf_counter_ns() - t2)

    async def _call(self, inputs: list[Any], wanted: list[Any]) -> Any:
        from tritonclient.utils import InferenceServerException

        spec = self.spec
        extra = {"client_timeout": spec.timeout_s} if spec.protocol == "grpc" else {}
        try:
            async with asyncio.timeout(spec.timeout_s):
                return await self._client.infer(
                    spec.model, inputs, model_version=spec.version, outputs=wanted, **extra
                )
        except TimeoutError:
            self._errors("timeout")
            raise DeadlineExceeded("the upstream did not answer in time") from None
        except InferenceServerException as exc:
            status = str(exc.status())
            error = upstream_error(status, exc.message() or "")
            self._errors(status)
            log.warning(
                "model %s: upstream error %s: %s",
                self.config.name,
                status,
                clip(str(exc.message())),
            )
            if status in ("StatusCode.NOT_FOUND", "404"):
                self._down(f"the upstream has no such model ({status})")
            elif isinstance(error, Unavailable):
                self._unavailable += 1  # a full queue answers this too: down only if it lasts
                if self._unavailable >= UNAVAILABLE_STREAK:
                    self._down(f"the upstream keeps refusing calls ({clip(status, 40)})")
            raise error from None
        except BastionError as exc:
            self._errors(type(exc).__name__)
            raise
        except self._transport_errors as exc:
            self._errors("unreachable")
            if type(exc).__name__ in _DROPPED:  # a kept-alive connection the upstream closed
                self._unavailable += 1
                if self._unavailable >= UNAVAILABLE_STREAK:
                    self._down(f"the upstream keeps dropping calls ({_kind(exc)})")
                raise Unavailable("the upstream dropped the connection; retry") from None
            self._down(f"the upstream is unreachable ({_kind(exc)})")
            raise Unavailable(f"model {self.config.name!r} is not ready: {self.reason}") from None
        except asyncio.CancelledError:
            # the client closed under the call (an unload), not this task cancelled: answer it
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._errors("closed")
            raise Unavailable(f"model {self.config.name!r} was unloaded during the call") from None

    def _down(self, reason: str) -> None:
        """Not ready until the watcher, woken now, reaches the upstream again."""
        self._set(False, reason)
        self._wake.set()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(Exception):
            await self._client.close()


def _kind(exc: BaseException) -> str:
    """What went wrong, without the upstream's own text (it may name its files and hosts)."""
    status = getattr(exc, "status", None)
    if callable(status):
        with contextlib.suppress(Exception):
            return str(status()) or type(exc).__name__
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


def response_cap(config: ModelConfig, ceiling: int) -> int:
    """The most bytes an upstream answer may take: four times the largest batch's outputs
    (binary, or JSON numbers) plus framing, when every output has fixed dims and a numeric
    type; else ``ceiling``. A bigger answer is refused before it is parsed."""
    total = 0
    for spec in config.outputs:
        dtype = BY_V2[spec.datatype].numpy
        if dtype is None or any(d < 0 for d in spec.dims):
            return ceiling
        total += int(np.prod(spec.dims, dtype=np.int64)) * dtype.itemsize
    return min(ceiling, 4 * config.max_batch_size * total + MAX_RESPONSE_SLACK)


@dataclass(frozen=True, slots=True)
class _Answer:
    """An HTTP answer read whole within the cap: what tritonclient reads of a response."""

    status: int
    headers: Any
    body: bytes

    async def read(self) -> bytes:
        return self.body


class _GuardedSession:
    """tritonclient's aiohttp session, refusing what a gateway must not trust from its
    upstream: redirects (they would send the batch, or fetch a reply, elsewhere), compressed
    bodies (tritonclient inflates them on the event loop, unbounded) and bodies past the cap.
    Each refusal is a ``BadGateway``."""

    def __init__(self, session: Any, cap: int) -> None:
        self._session, self._cap = session, cap

    async def post(self, url: str, data: bytes, headers: Any) -> _Answer:
        return await self._read(
            await self._session.post(
                url=url, data=data, headers=_identity(headers), allow_redirects=False
            )
        )

    async def get(self, url: str, headers: Any) -> _Answer:
        return await self._read(
            await self._session.get(url=url, headers=_identity(headers), allow_redirects=False)
        )

    async def close(self) -> None:
        await self._session.close()

    async def _read(self, response: Any) -> _Answer:
        try:
            if 300 <= response.status < 400:
                raise BadGateway("the upstream answered with a redirect, which is not followed")
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise BadGateway("the upstream answered with a compressed body, not asked for")
            if (response.content_length or 0) > self._cap:
                raise BadGateway("the upstream's answer is larger than its outputs can be")
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > self._cap:
                    raise BadGateway("the upstream's answer is larger than its outputs can be")
            return _Answer(response.status, response.headers, bytes(body))
        finally:
            response.release()


def _identity(headers: Any) -> dict[str, str]:
    """The request's headers, asking for an uncompressed answer (aiohttp offers gzip by
    default, and Triton takes the offer)."""
    return {**(headers or {}), "Accept-Encoding": "identity"}


def _client(spec: UpstreamSpec) -> tuple[Any, Any, tuple[type[BaseException], ...]]:
    """tritonclient's asyncio client for the spec's protocol, its tensor module, and the
    transport errors that mean the upstream is unreachable."""
    if spec.protocol == "grpc":
        import tritonclient.grpc as module
        import tritonclient.grpc.aio as aio

        backoff_ms = int(max(0.1, min(spec.health_interval_s, 10.0)) * 1000)
        options = [
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", spec.max_response_bytes),
            # gRPC's own reconnect backoff grows to 120 s; readiness is asked every interval
            ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
            ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        client = aio.InferenceServerClient(spec.address, channel_args=options)
        return client, module, (OSError,)
    try:
        import aiohttp
        import tritonclient.http as module
        import tritonclient.http.aio as aio
    except ImportError as exc:
        raise ConfigError(
            f"an http:// upstream needs tritonclient's HTTP client: pip install "
            f"'bastion-gateway[triton-http]' ({exc})"
        ) from None
    client = aio.InferenceServerClient(
        spec.address, conn_limit=spec.connections, conn_timeout=spec.timeout_s
    )
    client._stub = _GuardedSession(client._stub, spec.max_response_bytes)  # see its docstring
    return client, module, (aiohttp.ClientError, OSError)
