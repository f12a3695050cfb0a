"""Composition root: builds every service once and hangs it on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import __version__, admin, dashboard
from gateway.dataplane import DataPlane
from gateway.http import InferRoute, install_error_handlers, router
from gateway.monitoring.metrics import Metrics
from gateway.monitoring.timeseries import Sampler, read_totals
from gateway.protocol.codec import Limits
from gateway.quarantine.factory import open_store, retention_sweep
from gateway.registry import ModelRegistry
from gateway.repository import ModelRepository
from gateway.screening.service import ScreeningService
from gateway.settings import Settings


def create_app(settings: Settings | None = None) -> InferRoute:
    """The ASGI app: the inference fast path in front of the FastAPI app (``.app``)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(ModelRepository(settings.model_repository), settings, metrics)
        store = open_store(settings)
        screening = ScreeningService(store, metrics)
        registry.on_screening = screening.publish_calibration
        app.state.dataplane = DataPlane(registry, settings, screening)
        app.state.sampler = Sampler(
            lambda: read_totals(time.time(), metrics, [m.stats for m in registry.loaded()]),
            settings.dashboard_interval_s,
        )
        await registry.load_all()
        sampling = asyncio.create_task(app.state.sampler.run())
        retention = asyncio.create_task(
            retention_sweep(store, settings, screening.publish_usage).run()
        )
        # the loaded models are permanent: keep the collector from rescanning them on every pass
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            await registry.close()
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
            store.close()

    app = FastAPI(title="Bastion", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.limits = Limits(
        settings.max_body_bytes, settings.max_json_bytes, settings.max_elements
    )
    app.include_router(router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    install_error_handlers(app, metrics)
    return InferRoute(app)
