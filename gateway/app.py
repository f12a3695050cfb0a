"""Composition root: builds every service once and hangs it on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI

from bastion.gateway import __version__, admin, dashboard, openapi, routing_routes
from bastion.gateway.admission import InFlight
from bastion.gateway.asgi import Gateway, TracedGateway
from bastion.gateway.dataplane import DataPlane
from bastion.gateway.decode_pool import DecodePool
from bastion.gateway.defence import routes as defence_routes
from bastion.gateway.defence.replication import Replication, shared_salt
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.http import install_error_handlers, router
from bastion.gateway.identity import routes as key_routes
from bastion.gateway.identity.keys import KeyRing, open_key_store
from bastion.gateway.incidents import routes as incident_routes
from bastion.gateway.incidents.factory import open_incidents, open_ledger
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.writer import LogWriter
from bastion.gateway.monitoring.drift_monitor import DriftEvent
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.timeseries import Sampler, read_totals
from bastion.gateway.monitoring.tracing import Tracing
from bastion.gateway.monitoring.window import FLAG_RATE
from bastion.gateway.quarantine.factory import open_store, retention_sweep
from bastion.gateway.rate_limit import (
    LocalRateLimiter,
    RateLimiter,
    RateSpec,
    RedisRateLimiter,
)
from bastion.gateway.registry import ModelRegistry
from bastion.gateway.repository import ModelRepository
from bastion.gateway.routing import RouteTable
from bastion.gateway.rpc.server import GrpcServer
from bastion.gateway.screening.service import ScreeningService
from bastion.gateway.settings import Settings
from bastion.gateway.state import redis as redis_state
from bastion.gateway.state.route_sync import RouteSync

log = logging.getLogger(__name__)


def restore_state(incident_log: IncidentLog, grouper: Grouper, routes: RouteTable) -> None:
    """A restart keeps the route table (rebuilt from the log's route entries) and says what it
    does not keep: the containment ladder starts empty."""
    after, entries = 0, []
    while True:
        page = incident_log.entries(after, 10_000, kinds=("route_change", "rollback"))
        entries += page
        if len(page) < 10_000:
            break
        after = page[-1].seq
    if routes.restore(entries):
        log.warning("route table restored from the incident log: %s", routes.routes())
    opened = grouper.store.list(state="open", limit=1000)
    if opened:
        log.warning(
            "%d incident(s) open (%s): containment evidence is not kept across a restart, so "
            "their clients start at observe again; watch them, or keep keys revoked",
            len(opened),
            ", ".join(str(i.id) for i in opened[:20]),
        )


def log_drift_event(writer: LogWriter, event: DriftEvent) -> None:
    """A drift (or flag-rate) alarm raised or cleared, as an incident log entry."""
    kind = "flag_rate_alarm" if event.statistic == FLAG_RATE else "drift_alarm"
    body = {
        "event": event.kind,
        "statistic": event.statistic,
        "value": event.value if math.isfinite(event.value) else None,
        "threshold": event.threshold,
        "at_image": event.at_image,
        "window_images": event.window_images,
        "model": event.model,
    }
    writer.submit(kind, f"{event.model}:{event.version}", body)


def fingerprint_salt(redis: Any, settings: Settings) -> int | None:
    """The salt replicas share (their fingerprints must agree), from Redis; tried for 10 s.
    With the ``open`` policy a replica that cannot reach Redis fingerprints with a salt of its
    own (its queries match only its own until it restarts); with ``closed`` it does not start."""
    from redis.exceptions import RedisError

    for attempt in range(20):
        try:
            return shared_salt(redis)
        except (RedisError, OSError) as exc:
            if attempt == 19:
                if settings.shared_state_failure == "closed":
                    message = f"Redis did not answer for the fingerprint salt: {exc}"
                    raise RuntimeError(message) from exc
                log.error("Redis did not answer: fingerprints are this replica's own (%s)", exc)
            time.sleep(0.5)
    return None


def campaign_throttle(
    settings: Settings, redis: Any, shared: redis_state.RedisHealth | None
) -> RedisRateLimiter | None:
    """A throttled campaign's one request per ``throttle_interval_s``, kept in Redis so that it
    holds across replicas (None without Redis or the defence: each replica's own)."""
    if redis is None or shared is None or not settings.defence:
        return None
    return shared_limiter(RateSpec(60.0 / settings.throttle_interval_s, 1), settings, redis, shared)


def rate_limiter(
    settings: Settings, redis: Any, shared: redis_state.RedisHealth | None
) -> RateLimiter | None:
    """The per-client rate limit: in Redis when there is one (shared by replicas), else here."""
    if not settings.rate_limit:
        return None
    spec = RateSpec(settings.rate_limit, settings.rate_limit_burst)
    if redis is None or shared is None:
        return LocalRateLimiter(spec)
    return shared_limiter(spec, settings, redis, shared)


def shared_limiter(
    spec: RateSpec, settings: Settings, redis: Any, shared: redis_state.RedisHealth
) -> RedisRateLimiter:
    """A GCRA in Redis that reports to the replica's Redis health."""
    return RedisRateLimiter(
        redis,
        spec,
        settings.shared_state_failure,
        shared.failed,
        shared.round_trip,
        shared.reachable,
    )


def create_app(
    settings: Settings | None = None, grpc: bool = False, tracing: Tracing | None = None
) -> Gateway:
    """The ASGI app: front-door checks and the inference fast path in front of the FastAPI app
    (``.app``). ``grpc``: its lifespan also serves gRPC (``bastion serve`` asks for it when
    ``allow_grpc``; in-process tests do not). ``tracing``: OpenTelemetry's (default: from
    ``otel_endpoint``, None when unset)."""
    settings = settings or Settings()
    metrics = Metrics()
    tracing = tracing or Tracing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(ModelRepository(settings.model_repository), settings, metrics)
        store = await asyncio.to_thread(open_store, settings)
        keys = open_key_store(settings.database_url, settings.keys_path)
        remote = settings.database_url is not None  # never read over the network on the loop
        app.state.keys = KeyRing(keys, settings.keys_refresh_s, background=remote)
        if app.state.keys.enabled:  # say so: every inference request now needs a key
            where = "the database" if remote else str(settings.keys_path)
            log.info("client keys required (keys in %s): requests without one get 401", where)
        screening = ScreeningService(store, metrics, settings.review_backlog)
        registry.on_screening = screening.publish_calibration
        decoder = DecodePool(
            settings.decode_workers, settings.decode_queue_size, settings.decode_budget_ms, metrics
        )
        incident_log, grouper = await asyncio.to_thread(open_incidents, settings, metrics)
        app.state.incident_log, app.state.incidents = incident_log, grouper
        writer = LogWriter(
            incident_log, settings.incident_log_backlog, metrics.incident_log_dropped.inc
        )
        registry.on_drift_event = partial(log_drift_event, writer)
        redis, shared, replicated = None, None, None
        if settings.redis_url is not None:
            redis = redis_state.connect(settings.redis_url, settings.shared_state_timeout_s)
            shared = redis_state.RedisHealth(redis, metrics, settings.shared_state_failure)
            await shared.ping()  # readiness from the first request on
            replicated = redis_state.connect_sync(
                settings.redis_url, settings.shared_state_timeout_s
            )
        defence_settings = settings
        if replicated is not None and settings.defence and settings.fingerprint_salt is None:
            salt = await asyncio.to_thread(fingerprint_salt, replicated, settings)
            defence_settings = settings.model_copy(update={"fingerprint_salt": salt})
        defence = (
            DefenceService(defence_settings, metrics, audit=writer.submit)
            if settings.defence
            else None
        )
        replication = None
        if defence is not None and replicated is not None and shared is not None:
            replication = Replication(
                replicated, defence, metrics, failed=shared.failed, round_trip=shared.round_trip
            )
            await asyncio.to_thread(replication.start)
        registry.fingerprint_spec = defence.fingerprint_spec if defence else None
        ledger = await asyncio.to_thread(open_ledger, settings, metrics)
        limiter = rate_limiter(settings, redis, shared)
        if isinstance(limiter, RedisRateLimiter):  # the shared check: once per batch
            registry.batch_admit = limiter.admit_batch
        routes = RouteTable(audit=writer.submit)
        restore_state(incident_log, grouper, routes)
        route_sync = None
        if replicated is not None and shared is not None:  # Redis holds the current table
            route_sync = RouteSync(replicated, routes, shared.failed)
            route_sync.start()
        incident_log.listeners.append(routes.on_entry)  # the rollback rules
        app.state.routes, app.state.log_writer = routes, writer
        app.state.dataplane = DataPlane(
            registry,
            settings,
            screening,
            decoder,
            defence,
            ledger,
            routes,
            limiter,
            shared,
            campaign_throttle(settings, redis, shared),
        )
        if replication is not None:
            app.state.dataplane.caught_up = replication.caught_up.is_set
        app.state.dataplane.tracing = tracing
        if ledger is not None:
            ledger.tracing = tracing
        app.state.sampler = Sampler(
            lambda: read_totals(time.time(), metrics, [m.stats for m in registry.loaded()]),
            settings.dashboard_interval_s,
        )
        await registry.load_all()
        sampling = asyncio.create_task(app.state.sampler.run())
        pinging = asyncio.create_task(shared.run()) if shared is not None else None
        retention = asyncio.create_task(
            retention_sweep(store, settings, screening.publish_usage).run()
        )
        # the loaded models are permanent: keep the collector from rescanning them on every pass
        gc.collect()
        gc.freeze()
        grpc_server = GrpcServer(settings, app.state) if grpc else None
        if grpc_server is not None:
            await grpc_server.start()
        app.state.grpc = grpc_server
        try:
            yield
        finally:
            if grpc_server is not None:  # answers what it accepted, before the models go
                await grpc_server.stop()
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            if pinging is not None:
                pinging.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinging
            if replication is not None:
                await asyncio.to_thread(replication.close)
            if route_sync is not None:
                await asyncio.to_thread(route_sync.close)
            if replicated is not None:
                replicated.close()
            if redis is not None:
                await redis.aclose()
            await registry.close()
            decoder.close()
            await asyncio.to_thread(screening.close)
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
            await asyncio.to_thread(store.close)
            app.state.keys.close()
            await asyncio.to_thread(writer.close)  # what the defence decided is written
            if ledger is not None:
                await asyncio.to_thread(ledger.close)  # what was served is written
            grouper.store.close()
            incident_log.close()
            if tracing is not None:  # the spans still queued go out
                await asyncio.to_thread(tracing.shutdown)

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, which a security
    # gateway should not serve and an air-gapped host cannot reach; /openapi.json stays
    app = FastAPI(
        title="Bastion",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by gateway.openapi, serialised once
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.in_flight = InFlight(settings.max_requests_in_flight, metrics)
    app.state.keys = None  # the key ring, opened with the rest in the lifespan
    app.state.incident_log = app.state.incidents = app.state.routes = None
    app.include_router(router)
    app.include_router(admin.router)
    app.include_router(key_routes.router)
    app.include_router(defence_routes.router)
    app.include_router(incident_routes.router)
    app.include_router(routing_routes.router)
    app.include_router(dashboard.router)
    openapi.install(app)
    install_error_handlers(app, metrics)
    return Gateway(app) if tracing is None else TracedGateway(app, tracing)
