"""The protocol-agnostic service: lookup, validation, batching, responses, statistics.

Transports (HTTP now, gRPC later) only receive bytes and encode responses; they hand the data
plane a *decoder* for the bytes, which runs with input validation in the bounded decode pool,
never on the event loop. Everything a request means happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bastion.gateway import __version__
from bastion.gateway.backends import EMBEDDINGS, FINGERPRINTS
from bastion.gateway.decode_pool import DecodePool
from bastion.gateway.defence.answers import served_answers
from bastion.gateway.defence.observation import Observation
from bastion.gateway.defence.request_path import defend
from bastion.gateway.defence.service import DefenceService, throttled
from bastion.gateway.errors import (
    BastionError,
    Blocked,
    DeadlineExceeded,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from bastion.gateway.identity.caller import SCREENING_REPORT_SCOPE
from bastion.gateway.incidents.ledger import Ledger
from bastion.gateway.inputs import prepare_inputs
from bastion.gateway.limits import ModelLimits, model_limits
from bastion.gateway.monitoring.tracing import Tracing, timed
from bastion.gateway.outputs import (
    attach_screening,
    output_tensor,
    requested_outputs,
    tensor_metadata,
)
from bastion.gateway.protocol.bounds import Limits, RawInput
from bastion.gateway.protocol.types import (
    Caller,
    InferRequest,
    InferResponse,
)
from bastion.gateway.rate_limit import RateLimiter, RedisRateLimiter
from bastion.gateway.registry import UNLOADED, LoadedModel, ModelRegistry
from bastion.gateway.routing import RouteTable, point
from bastion.gateway.screening.service import (
    REPORT_PARAMETER,
    Screened,
    ScreeningService,
    refuse_if_withheld,
    tighten,
)
from bastion.gateway.settings import Settings
from bastion.gateway.state.redis import RedisHealth

EXTENSIONS = [
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
]


Prepared = tuple[InferRequest, dict[str, np.ndarray], int]
"""A decoded request, its batch rows by input, and their count."""
Decoder = Callable[[RawInput | None, Limits], InferRequest]
"""A transport's parser for one request's bytes: given the model's raw-input description and
the limits that hold for it, returns the request or raises a ``BastionError``. Runs on a pool
thread."""
MessageParser = Callable[[], tuple[str, int | None, int, Decoder]]
"""A transport's parser for a message that names its model (gRPC): returns the model's name,
the version asked for (None: the route's or the latest), the message's size in bytes and the
decoder of its tensors, or raises a ``BastionError``. Runs on a pool thread."""

# the screening policy, and where a remote model's upstream is (internal topology)
_PRIVATE_PARAMETERS = ("screening", "squeeze", "upstream")


class DataPlane:
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        screening: ScreeningService,
        decoder: DecodePool,
        defence: DefenceService | None = None,
        ledger: Ledger | None = None,
        routes: RouteTable | None = None,
        limiter: RateLimiter | None = None,
        shared: RedisHealth | None = None,
        throttle: RedisRateLimiter | None = None,
    ) -> None:
        """``limiter``: the per-client rate limit (None: none); ``shared``: whether the shared
        state answers (None: no Redis), which readiness follows under the closed policy;
        ``throttle``: a throttled campaign's one request per interval across replicas."""
        self.limiter, self.shared, self.throttle = limiter, shared, throttle
        # whether the defence has replayed the other replicas' evidence (None: nothing to
        # replay): until then a contained client would be a stranger here
        self.caught_up: Callable[[], bool] | None = None
        self.registry = registry
        self.ledger = ledger
        self.routes = routes
        self.settings = settings
        self.screening = screening
        self.decoder = decoder
        self.defence = defence
        self.tracing: Tracing | None = None  # OpenTelemetry, when BASTION_OTEL_ENDPOINT is set

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "bastion", "version": __version__, "extensions": EXTENSIONS}

    def ready(self) -> bool:
        """Triton's rule: ready while every model that should serve does. A model an admin
        unloaded on purpose does not count, so unloading one model does not take the whole
        pod out of a Kubernetes Service; a model that failed to load does."""
        index = self.registry.index()
        if self.shared is not None and not self.shared.serving():
            return False  # the shared state is down and the policy is closed: 503 anyway
        if self.caught_up is not None and not self.caught_up():
            return False  # the other replicas' evidence is still being replayed
        return bool(index) and all(
            entry["state"] == "READY" or entry.get("reason") == UNLOADED for entry in index
        )

    async def _throttle_shared(self, campaign: str | None) -> None:
        """A throttled campaign this replica let through (``campaign``, what ``admit``
        charged) gets its one request per interval across every replica, not per replica:
        the same GCRA as the rate limit, in Redis (one round trip, for throttled clients
        only). Raises the throttle's 429, or 503 when Redis is down and the policy closed."""
        if campaign is None or self.throttle is None:
            return
        (refusal,) = await self.throttle.admit_batch([f"campaign:{campaign}"])
        if isinstance(refusal, TooManyRequests):
            assert self.defence is not None
            self.defence.metrics.defence_refused.labels("throttle").inc()
            raise throttled(float(refusal.headers["Retry-After"]))
        if refusal is not None:
            raise refusal

    def _check_shared(self) -> None:
        """Under the ``closed`` policy, no inference while the shared state (Redis) is down:
        the defence and the limits would be this replica's alone. Raises ``Unavailable``."""
        if self.shared is not None and not self.shared.serving():
            raise Unavailable("the shared state (Redis) is unreachable; retry later")
        if self.caught_up is not None and not self.caught_up():
            raise Unavailable("this replica is still catching up with the others; retry later")

    def model_metadata(self, name: str, version: int | None) -> dict[str, Any]:
        model = self.registry.get(name, version)
        config = model.config
        versions = [str(m.version) for m in self.registry.loaded() if m.config.name == name]
        return {
            "name": name,
            "versions": sorted(versions, key=int) if version is None else [str(version)],
            "platform": config.platform or config.backend,
            "inputs": [tensor_metadata(t) for t in config.inputs],
            "outputs": [tensor_metadata(t) for t in config.outputs],
        }

    def model_config(self, name: str, version: int | None) -> dict[str, Any]:
        """Triton's config, without the screening policy (admin-only, like the thresholds)."""
        raw = self.registry.get(name, version).config.raw
        parameters = raw.get("parameters")
        if not parameters:
            return raw
        public = {k: v for k, v in parameters.items() if not k.startswith(_PRIVATE_PARAMETERS)}
        return {**raw, "parameters": public}

    def statistics(self, name: str | None, version: int | None) -> dict[str, Any]:
        if name is None:
            models = self.registry.loaded()
        elif version is None:
            self.registry.get(name)
            models = [m for m in self.registry.loaded() if m.config.name == name]
        else:
            models = [self.registry.get(name, version)]
        return {"model_stats": [m.stats.as_dict() for m in models]}

    def drift(self, name: str, version: int | None) -> dict[str, Any]:
        """The drift monitor's reference, latest window, scores, alarms and events."""
        model = self.registry.get(name, version)
        if model.drift is None:
            return {
                "model": name,
                "version": str(model.version),
                "enabled": False,
                "reason": "no reference profile for this version (bastion calibrate writes one)"
                if self.settings.drift
                else "drift monitoring is off (BASTION_DRIFT)",
            }
        return {"enabled": True, **model.drift.snapshot()}

    def limits(self, model: LoadedModel) -> ModelLimits:
        """What one model version can take (computed once per loaded version)."""
        if model.limits is None:
            model.limits = model_limits(model.config, self.settings)
        return model.limits

    def _route(self, name: str, version: int | None, client: str | None) -> LoadedModel:
        """The version the route table assigns (also in place of a version a rollback took
        out of service, when named), else the named one, else the latest."""
        route = self.routes.routes().get(name) if self.routes is not None else None
        if route is None:
            return self.registry.get(name, version)
        if version is not None and not (route.rolled_back and version != route.safe):
            return self.registry.get(name, version)
        routed = route.pick(point(client))
        try:
            return self.registry.get(name, routed)
        except NotFound:  # unloaded since it was routed: the safe version, never the latest
            if route.safe is None or route.safe == routed:
                message = f"model {name!r}: routed version {routed} is not loaded"
                raise Unavailable(message) from None
            return self.registry.get(name, route.safe)

    async def infer(
        self,
        name: str,
        version: int | None,
        decode: Decoder,
        caller: Caller,
        deadline_ns: int | None = None,
    ) -> InferResponse:
        """Decodes (in the pool), validates, batches, screens and answers one request.
        ``deadline_ns`` (``perf_counter_ns`` time): the transport's own deadline, e.g. a gRPC
        client's; the request is answered DeadlineExceeded rather than run past it."""
        start = time.perf_counter_ns()
        model = self._route(name, version, caller.client_id)
        self._check_shared()
        if self.limiter is not None and caller.client_id is not None:
            await self.limiter.check(caller.client_id)  # 429 over the client's rate limit
        charged = None
        if self.defence is not None:
            # 429 / 403 before any work for a contained client, whichever model it asks (an
            # unscreened model may serve the same weights as a screened one)
            charged = self.defence.admit(caller.client_id, caller.shared)
            await self._throttle_shared(charged)
        job = partial(self._decode_and_prepare, model, decode, caller)
        times: list[int] = []
        tracing = self._tracing()
        try:
            prepared = await self.decoder.run(job if tracing is None else timed(job, times))
        except BastionError as exc:
            model.observer.on_failure(time.perf_counter_ns() - start, exc.reason)
            raise
        finally:
            if tracing is not None and len(times) == 2:
                tracing.record("decode", *times)
        return await self._serve(model, prepared, caller, charged, start, deadline_ns)

    async def infer_message(
        self, parse: MessageParser, caller: Caller, deadline_ns: int | None = None
    ) -> InferResponse:
        """``infer`` for a transport whose message names its model (gRPC): one decode-pool job
        parses the message, picks the version (as ``infer`` does) and decodes it; the
        defence's admission comes after, before any model work. ``parse`` returns the model's
        name, the version asked for, the message's size and the decoder of its tensors."""
        start = time.perf_counter_ns()

        def job() -> tuple[LoadedModel, Prepared | BastionError]:
            name, version, size, decode = parse()
            model = self._route(name, version, caller.client_id)
            try:
                limit = self.limits(model).codec.max_body_bytes
                if size > limit:  # as HTTP refuses a body over the model's limit: 413
                    raise PayloadTooLarge(
                        f"request of {size} bytes exceeds the limit of {limit} for this model "
                        "(its config parameter max_request_bytes raises it)"
                    )
                return model, self._decode_and_prepare(model, decode, caller)
            except BastionError as exc:
                return model, exc

        times: list[int] = []
        tracing = self._tracing()
        model, prepared = await self.decoder.run(job if tracing is None else timed(job, times))
        if tracing is not None and len(times) == 2:
            tracing.record("decode", *times)
        try:
            if isinstance(prepared, BastionError):
                raise prepared
            self._check_shared()
            if self.limiter is not None and caller.client_id is not None:
                await self.limiter.check(caller.client_id)
            charged = None
            if self.defence is not None:
                charged = self.defence.admit(caller.client_id, caller.shared)
                await self._throttle_shared(charged)
        except BastionError as exc:
            model.observer.on_failure(time.perf_counter_ns() - start, exc.reason)
            raise
        return await self._serve(model, prepared, caller, charged, start, deadline_ns)

    async def _serve(
        self,
        model: LoadedModel,
        prepared: Prepared,
        caller: Caller,
        charged: str | None,
        start: int,
        deadline_ns: int | None,
    ) -> InferResponse:
        """Batches, screens and answers a decoded request (failures counted for ``model``)."""
        request, arrays, rows = prepared
        try:
            model.check_ready()  # a remote model whose upstream is down: 503 before any work
            wanted = requested_outputs(model.config, request)
            deadline = self._deadline(model, request, start)
            if deadline_ns is not None:
                deadline = deadline_ns if deadline is None else min(deadline, deadline_ns)
            tracing = self._tracing()
            timing: list[Any] | None = None if tracing is None else []
            results = await model.batcher.submit(arrays, rows, deadline, caller.client_id, timing)
            if timing and tracing is not None:
                tracing.annotate(**_attributes(model))  # on the request's server span
                tracing.batch(timing[0], rows)
            screened, observed = await self._screen(
                model, request, arrays, results, charged, caller.shared
            )
            if model.upstream is not None and screened is not None:
                results = await self._forward(
                    model, request, arrays, results, screened, observed, deadline
                )
            outputs = [output_tensor(model.config, want, results[want.name]) for want in wanted]
        except BastionError as exc:
            model.observer.on_failure(time.perf_counter_ns() - start, exc.reason)
            raise
        model.observer.on_success(time.perf_counter_ns() - start)
        response = InferResponse(model.config.name, str(model.version), outputs, id=request.id)
        if screened is not None:
            attach_screening(response, screened, request)
        return response

    def _decode_and_prepare(
        self, model: LoadedModel, decode: Decoder, caller: Caller
    ) -> tuple[InferRequest, dict[str, np.ndarray], int]:
        """On a decode thread: parse, check what the caller may ask, build the batch rows."""
        config = model.config
        raw = None
        if len(config.inputs) == 1:
            spec = config.inputs[0]
            raw = RawInput(spec.name, spec.datatype, spec.dims)
        limits = self.limits(model)
        request = decode(raw, limits.codec)
        request.client_id = caller.client_id
        if (
            request.parameters.get(REPORT_PARAMETER) is True
            and SCREENING_REPORT_SCOPE not in caller.scopes
        ):
            # per-detector scores are a gradient-free oracle for an adaptive attacker
            raise Forbidden(
                f"request parameter {REPORT_PARAMETER!r} needs the admin token "
                "('Authorization: Bearer <admin token>')"
            )
        arrays, rows = prepare_inputs(config, request, limits.images)
        return request, arrays, rows

    async def _screen(
        self,
        model: LoadedModel,
        request: InferRequest,
        arrays: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        charged: str | None = None,
        shared: bool = False,
    ) -> tuple[Screened | None, Observation | None]:
        """Policy after the fused batch: metrics, quarantine, the stateful defence's evidence
        and rung (``charged``: the campaign ``admit`` charged), and the 403 for withheld
        images; returns the verdicts and the defence's observation."""
        job = model.backend.screening
        if job is None:
            if self.ledger is not None:
                self._record(model, request, arrays, results, None, "served")
            return None, None
        tracing = self._tracing()
        with _NOT_TRACED if tracing is None else tracing.span("policy") as span:
            screened = await self.screening.apply(
                job,
                model.screening_action,
                model.config.name,
                str(model.version),
                request,
                arrays,
                results,
                model.screening_review,
            )
            if span is not None:
                span.set_attributes(_verdicts(screened))
            observed = self._defend(model, request, arrays, results, screened, charged, shared)
        try:
            refuse_if_withheld(screened, request)
        except Blocked:
            self.screening.metrics.screening_refused.inc()
            raise
        return screened, observed

    def _defend(
        self,
        model: LoadedModel,
        request: InferRequest,
        arrays: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        screened: Screened,
        charged: str | None,
        shared: bool,
    ) -> Observation | None:
        """The stateful defence's evidence and rung, strict mode's tightening, and the ledger
        row of what the request's outcome is; returns the defence's observation (None: no
        defence)."""
        prints = results.get(FINGERPRINTS)
        outcome = "refused"  # by the defence, unless the block below finishes
        observed = None
        try:
            if self.defence is not None and prints is not None:
                observed = defend(
                    self.defence, model, request, arrays, results, screened, prints, charged, shared
                )
            if self.routes is not None and self.routes.strict(model.config.name):
                tighten(screened)  # rolled back in strict mode: suspicious is withheld too
            report = request.parameters.get(REPORT_PARAMETER) is True
            outcome = "withheld" if screened.decision.withheld and not report else "served"
        finally:
            # what was answered to whom, off the hot path; a remote model's served rows are
            # recorded once its upstream has answered (``_forward``)
            if self.ledger is not None and not (model.upstream is not None and outcome == "served"):
                self._record(model, request, arrays, results, screened.decision.verdicts, outcome)
        return observed

    async def _forward(
        self,
        model: LoadedModel,
        request: InferRequest,
        arrays: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        screened: Screened,
        observed: Observation | None,
        deadline: int | None,
    ) -> dict[str, np.ndarray]:
        """A screened remote model's second stage: the rows the policy let through go to the
        upstream (batched with other requests' rows), and its outputs replace the local
        screening model's, unchanged. Rows the stateful defence gave a remembered answer
        (``repeat``) keep it and are not sent; the upstream's answers are what the defence then
        remembers. Only an admin's report asks for a request with withheld rows; those keep
        the local outputs, which ``report_outputs`` then blanks."""
        assert model.upstream is not None
        rows = len(next(iter(arrays.values())))
        kept = set(screened.decision.withheld) | set(observed.repeats if observed else ())
        keep = [i for i in range(rows) if i not in kept]
        served, outcome = results, "failed"  # nothing served unless the upstream answers
        tracing = self._tracing()
        try:
            if keep:
                sent = arrays if len(keep) == rows else {k: v[keep] for k, v in arrays.items()}
                wait = None if deadline is None else max(0, deadline - time.perf_counter_ns()) / 1e9
                with _NOT_TRACED if tracing is None else tracing.span("upstream"):
                    try:
                        async with asyncio.timeout(wait):
                            answer = await model.upstream.submit(sent, len(keep), deadline)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            "request timed out waiting for the upstream"
                        ) from None
                served = dict(results)
                for spec in model.config.outputs:
                    if len(keep) == rows:
                        served[spec.name] = answer[spec.name]
                    else:
                        merged = results[spec.name].copy()
                        merged[keep] = answer[spec.name]
                        served[spec.name] = merged
                if observed is not None and self.defence is not None:
                    outputs = [spec.name for spec in model.config.outputs]
                    name = (model.config.name, model.version)
                    self.defence.answered(observed, served_answers(outputs, name, served)[0])
            outcome = "served"
        finally:
            if self.ledger is not None:
                self._record(model, request, arrays, served, screened.decision.verdicts, outcome)
        return served

    def _record(
        self,
        model: LoadedModel,
        request: InferRequest,
        arrays: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        verdicts: list[str] | None,
        outcome: str,
    ) -> None:
        """Queues what the request's ledger rows are built from, on the ledger's thread
        (``verdicts`` None: an unscreened model)."""
        assert self.ledger is not None
        inputs = next(iter(arrays.values()))
        self.ledger.submit_request(
            (model.config.name, str(model.version)),
            (request.client_id, request.id),
            inputs,
            {spec.name: results[spec.name] for spec in model.config.outputs},
            results.get(FINGERPRINTS),
            verdicts if verdicts is not None else ["unscreened"] * len(inputs),
            outcome,
            time.time(),
            results.get(EMBEDDINGS),
        )

    def _tracing(self) -> Tracing | None:
        """The tracer when the current request is traced (sampled), else None."""
        tracing = self.tracing
        return tracing if tracing is not None and tracing.active() else None

    def _deadline(self, model: LoadedModel, request: InferRequest, start_ns: int) -> int | None:
        policy = model.config.batching
        timeout_us = policy.default_timeout_us or self.settings.default_timeout_us
        if request.timeout_us and policy.allow_timeout_override:
            timeout_us = request.timeout_us
        return start_ns + timeout_us * 1000 if timeout_us else None


_NOT_TRACED = contextlib.nullcontext()


def _attributes(model: LoadedModel) -> dict[str, str]:
    return {"bastion.model": model.config.name, "bastion.model_version": str(model.version)}


def _verdicts(screened: Screened) -> dict[str, Any]:
    """A request's verdicts and actions as span attributes (never a score or threshold)."""
    decision = screened.decision
    return {
        # one string each (a list attribute costs the SDK a copy per element)
        "bastion.screening.verdicts": ",".join(decision.verdicts),
        "bastion.screening.actions": ",".join(decision.actions),
        "bastion.screening.withheld": len(decision.withheld),
    }
