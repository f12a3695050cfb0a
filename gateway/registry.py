"""Loaded model versions: each a backend, a dynamic batcher and its statistics.

Loading runs off the event loop. Versions appear and disappear with the repository's folders and
version policy (``load`` re-reads the config), so a version is rolled out or back without a
redeploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.gateway.backends import Backend, load_backend
from bastion.gateway.backends.triton_upstream import TritonUpstream, upstream_spec
from bastion.gateway.batcher import (
    Admit,
    Arrays,
    CallSlots,
    DeviceSlots,
    DynamicBatcher,
    Unobserved,
)
from bastion.gateway.errors import BastionError, NotFound, Unavailable
from bastion.gateway.limits import ModelLimits, model_limits
from bastion.gateway.monitoring.drift_monitor import DriftMonitor
from bastion.gateway.monitoring.metrics import Metrics, ModelObserver
from bastion.gateway.monitoring.reference import ReferenceProfile
from bastion.gateway.monitoring.stats import BatchTimes, ModelStats
from bastion.gateway.monitoring.window import DriftConfig
from bastion.gateway.protocol.dtypes import BY_V2
from bastion.gateway.repository import ConfigError, ModelConfig, ModelRepository
from bastion.gateway.screening.policy import ADVERSARIAL, from_config
from bastion.gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    version: int
    backend: Backend
    batcher: DynamicBatcher
    observer: ModelObserver
    screening_action: str = "allow"  # what an adversarial verdict does; admins may tighten it
    screening_review: str = "review"  # what a suspicious verdict does: review or allow
    drift: DriftMonitor | None = None
    limits: ModelLimits | None = None  # what this version can take (gateway.limits)
    remote: TritonUpstream | None = None  # a remote Triton model's upstream
    upstream: DynamicBatcher | None = None  # its second stage, after local screening

    def check_ready(self) -> None:
        """Raises ``Unavailable`` while a remote model's upstream cannot serve."""
        if self.remote is not None and not self.remote.ready:
            raise Unavailable(f"model {self.config.name!r} is not ready: {self.remote.reason}")

    @property
    def stats(self) -> ModelStats:
        self.observer.stats.pending = self.batcher.pending
        return self.observer.stats


def run_batch(backend: Backend, requests: Sequence[Arrays]) -> tuple[Arrays, BatchTimes]:
    """One device job: stack the requests' rows, run the model, bring the outputs back."""
    t0 = time.perf_counter_ns()
    # concatenate copies: the batch is fresh, writable memory even for a single request
    batch = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
    device_inputs = backend.to_device(batch)
    t1 = time.perf_counter_ns()
    device_outputs = backend.forward(device_inputs)
    t2 = time.perf_counter_ns()
    outputs = backend.to_host(device_outputs)
    t3 = time.perf_counter_ns()
    screen_ns = getattr(device_outputs, "screen_ns", 0)
    return outputs, BatchTimes(t1 - t0, t2 - t1, t3 - t2, screen_ns)


def warm_up(backend: Backend, config: ModelConfig) -> None:
    """Runs the smallest and largest batch once so the first requests pay no start-up cost."""
    for rows in sorted({1, config.max_batch_size}):
        batch = {
            spec.name: np.zeros((rows, *(max(d, 1) for d in spec.dims)), BY_V2[spec.datatype].numpy)
            for spec in config.inputs
        }
        run_batch(backend, [batch])


def check_profile(profile: ReferenceProfile, config: ModelConfig, backend: Backend) -> None:
    """Refuses a profile made for another model: other classes or another embedding width."""
    classes = config.outputs[0].dims[-1] if config.outputs else None
    if classes is not None and classes != len(profile.classes):
        raise ValueError(f"the reference profile has {len(profile.classes)} classes, not {classes}")
    width = getattr(getattr(backend, "module", None), "embedding_width", None)
    if len(profile.embeddings) and width != profile.embeddings.shape[1]:
        raise ValueError(
            f"the reference embeddings are {profile.embeddings.shape[1]} wide, the model's {width}"
        )


def drift_config(settings: Settings) -> DriftConfig:
    return DriftConfig(
        hop_images=settings.drift_hop_images,
        window_hops=settings.drift_window_hops,
        hop_max_s=settings.drift_hop_max_s,
        min_images=settings.drift_min_images,
        psi_threshold=settings.drift_psi_threshold,
        js_threshold=settings.drift_js_threshold,
        flag_z_threshold=settings.drift_flag_z_threshold,
        mmd_alpha=settings.drift_mmd_alpha,
        mmd_permutations=settings.drift_mmd_permutations,
        mmd_interval_s=settings.drift_mmd_interval_s,
        embedding_sample=settings.drift_embedding_sample,
    )


def pick_device(setting: str) -> str:
    import torch

    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return "cuda:0"
    return "cpu"


def _entry(name: str, version: int, loaded: LoadedModel) -> dict[str, str]:
    """A loaded version's index entry: UNAVAILABLE, with the reason, while its upstream is."""
    entry = {"name": name, "version": str(version), "state": "READY"}
    if loaded.remote is not None and not loaded.remote.ready:
        entry.update(state="UNAVAILABLE", reason=loaded.remote.reason)
    return entry


UNLOADED = "unloaded"
"""The index's reason for a model an admin unloaded (or never loaded) on purpose."""


class ModelRegistry:
    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.device = pick_device(settings.device)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._errors: dict[str, str] = {}
        self._slots: dict[str, DeviceSlots] = {}
        self._lock = asyncio.Lock()
        self.on_screening: Callable[[str, str, Any], None] = lambda *_: None
        self.fingerprint_spec: Any = None  # set by the app when the stateful defence is on
        self.batch_admit: Admit | None = None  # set by the app: the rate limit shared in Redis
        self.on_drift_event: Callable[[Any], object] | None = None  # the incident log

    async def load_all(self) -> None:
        for name in self.repository.names():
            try:
                await self.load(name)
            except BastionError:  # logged by load; the server stays up, not ready (503)
                continue

    async def load(self, name: str) -> None:
        """(Re)loads a model, as Triton's load does: every served version is built afresh from
        the repository as it is now (config, weights, calibration), swapped in only once all
        loaded, and the old instances are then drained and closed. A config or calibration
        that no longer loads leaves the old versions serving and raises ``Unavailable``."""
        async with self._lock:
            fresh: dict[int, LoadedModel] = {}
            try:
                config = self.repository.config(name)
                if config.max_batch_size < 1:
                    raise ConfigError(f"model {name!r}: max_batch_size must be at least 1")
                limits = model_limits(config, self.settings)
                current = self._models.get(name, {})
                for version in config.versions:
                    fresh[version] = await self._load_version(config, version)
                    fresh[version].limits = limits
                if not fresh:
                    raise ConfigError(f"model {name!r} has no version folder to serve")
            except NotFound:  # not in the repository: the client's mistake, 404
                raise
            except Exception as exc:  # one broken model must never take the server down
                for built in fresh.values():  # the versions built before one failed
                    await self._close(built)
                log.error("model %s failed to load: %s", name, exc)
                self._errors[name] = str(exc)
                raise Unavailable(f"failed to load model {name!r}: {exc}") from exc
            self._models[name] = fresh
            self._errors.pop(name, None)
            for loaded in current.values():
                await self._close(loaded)
            self._update_ready()
            log.info("model %s ready, versions %s", name, sorted(fresh))

    async def unload(self, name: str) -> None:
        async with self._lock:
            versions = self._models.pop(name, None)
            if versions is None:
                raise NotFound(f"model {name!r} is not loaded")
            for loaded in versions.values():
                await self._close(loaded)
            self._update_ready()

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)
        for slots in self._slots.values():
            slots.close()

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        versions = self._models.get(name)
        if not versions:
            if name in self._errors:
                raise Unavailable(f"model {name!r} is not ready: {self._errors[name]}")
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            return versions[max(versions)]
        loaded = versions.get(version)
        if loaded is None:
            raise NotFound(f"model {name!r} has no version {version} (ready: {sorted(versions)})")
        return loaded

    def loaded(self) -> list[LoadedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def index(self) -> list[dict[str, str]]:
        entries = []
        for name in self.repository.names():
            versions = self._models.get(name)
            if versions:
                entries += [_entry(name, v, loaded) for v, loaded in versions.items()]
            else:
                entry = {"name": name, "state": "UNAVAILABLE"}
                entry["reason"] = self._errors.get(name, UNLOADED)
                entries.append(entry)
        return entries

    async def _load_version(self, config: ModelConfig, version: int) -> LoadedModel:
        source = self._screening_source(config, version)
        remote = await self._remote(config, version) if config.backend == "triton" else None
        started: list[DynamicBatcher] = []
        try:
            return await self._assemble(config, version, source, remote, started)
        except BaseException:  # nothing of a version that failed to load keeps running
            for batcher in started:
                await batcher.close(drain_timeout_s=0)
            if remote is not None:
                await self._close_remote(remote, version)
            raise

    async def _assemble(
        self,
        config: ModelConfig,
        version: int,
        source: tuple[ModelConfig, int] | None,
        remote: TritonUpstream | None,
        started: list[DynamicBatcher],
    ) -> LoadedModel:
        """The backend, batchers and policy of one version (``started``: each batcher
        started, for the caller to stop should a later step fail)."""
        threads = self.settings.torch_threads
        observer = ModelObserver(ModelStats(config.name, str(version)), self.metrics)
        batching = config.batching
        options = {
            "max_batch_size": batching.max_batch_size,
            "preferred_batch_sizes": batching.preferred_batch_sizes,
            "max_queue_delay_us": batching.max_queue_delay_us,
            "max_queue_size": self.settings.max_queue_size or batching.max_queue_size,
        }
        # batches in flight upstream: what it runs at once (more only shrinks the batches)
        inflight = self.settings.upstream_max_inflight_batches
        calls = CallSlots(inflight or (remote.instances if remote else 0) or 1)
        if source is None:  # a remote model that does not screen: the upstream is the backend
            assert remote is not None
            batcher = DynamicBatcher(
                remote.infer, calls, observer, admit=self.batch_admit, **options
            )
            batcher.start()
            started.append(batcher)
            loaded = LoadedModel(config, version, remote, batcher, observer, remote=remote)
            return loaded
        backend = await asyncio.to_thread(load_backend, *source, self.device, threads)
        await asyncio.to_thread(warm_up, backend, source[0])
        drift = self._drift_monitor(source[0], source[1], backend, config.name, version)
        slots = self._slots.get(backend.device)
        if slots is None:
            slots = DeviceSlots(backend.device, self.settings.max_concurrent_batches)
            self._slots[backend.device] = slots
        batcher = DynamicBatcher(
            lambda requests: run_batch(backend, requests),
            slots,
            observer,
            admit=self.batch_admit,
            **options,
        )
        batcher.start()
        started.append(batcher)
        loaded = LoadedModel(config, version, backend, batcher, observer, remote=remote)
        if remote is not None:
            # the rows screening passes, batched again for one upstream call (no extra wait:
            # the rows of one screened batch arrive together)
            second = {**options, "max_queue_delay_us": 0}
            loaded.upstream = DynamicBatcher(remote.infer, calls, Unobserved(), **second)
            loaded.upstream.start()
            started.append(loaded.upstream)
        loaded.drift = drift
        policy = from_config(source[0])
        if backend.screening is not None:  # the defence's fingerprints, in the same batch
            backend.screening.fingerprint_spec = self.fingerprint_spec
        if policy is not None and backend.screening is not None:
            loaded.screening_action = policy.action
            loaded.screening_review = policy.review_action
            self.on_screening(config.name, str(version), backend.screening)
        return loaded

    async def _remote(self, config: ModelConfig, version: int) -> TritonUpstream:
        """A remote Triton model's upstream, asked once before the model is served (an
        unreachable one leaves the model loaded but not ready) and watched after."""
        settings = self.settings
        spec = upstream_spec(
            config,
            settings.upstream_timeout_s,
            settings.upstream_connections,
            settings.upstream_health_interval_s,
            settings.upstream_max_response_bytes,
        )
        labels = (config.name, str(version))
        ready = self.metrics.upstream_ready

        def gauge_set(value: bool) -> None:  # looked up each time: a reload may remove it
            ready.labels(*labels).set(value)

        duration = self.metrics.upstream_duration.labels(*labels)
        errors = self.metrics.upstream_errors

        def failed(kind: str) -> None:
            errors.labels(*labels, kind[:40]).inc()

        remote = TritonUpstream(
            spec, config, on_ready=gauge_set, on_call=duration.observe, on_error=failed
        )
        gauge_set(False)
        try:
            if not await remote.probe():
                log.warning(
                    "model %s v%d: loaded, not ready: %s", config.name, version, remote.reason
                )
        except BaseException:  # cancelled while asking: its client goes too
            await self._close_remote(remote, version)
            raise
        remote.start()
        return remote

    async def _close_remote(self, remote: TritonUpstream, version: int) -> None:
        await remote.close()
        served = self._models.get(remote.config.name, {}).get(version)
        if served is None or served.remote is None or served.remote is remote:
            # no stale 1 for a version no longer served (a reload's new instance keeps it)
            with contextlib.suppress(KeyError):
                self.metrics.upstream_ready.remove(remote.config.name, str(version))
            return
        gauge = self.metrics.upstream_ready.labels(remote.config.name, str(version))
        gauge.set(served.remote.ready)

    def _screening_source(
        self, config: ModelConfig, version: int
    ) -> tuple[ModelConfig, int] | None:
        """The config and version folder a model's local backend loads: its own, or for a
        remote Triton model that screens, the weights in its own version folder or the model
        its parameter ``screening_model`` names (whose calibration and policy it then uses);
        None for a remote model that does not screen."""
        if config.backend != "triton":
            return config, version
        if from_config(config) is None:
            return None
        named = config.parameters.get("screening_model")
        if not named:
            if "architecture" not in config.parameters:
                raise ConfigError(
                    f"model {config.name!r} screens: name a screening_model in the repository, "
                    "or put its weights (model.safetensors, parameter architecture) and "
                    "calibration in its version folder"
                )
            return dataclasses.replace(config, backend="pytorch"), version
        if named == config.name:
            raise ConfigError(f"model {config.name!r}: screening_model names the model itself")
        try:
            source = self.repository.config(named)
        except NotFound:  # the repository's 404 would read as this model's own absence
            raise ConfigError(
                f"model {config.name!r}: screening_model {named!r} is not in the repository"
            ) from None
        wanted = config.parameters.get("screening_model_version")
        picked = int(wanted) if wanted and wanted.isdigit() else max(source.versions, default=0)
        if source.backend != "pytorch" or picked not in source.versions:
            raise ConfigError(
                f"model {config.name!r}: screening_model {named!r} needs to be a pytorch model "
                f"with version {picked} in the repository"
            )
        ours = [(t.name, t.datatype, t.dims) for t in (*config.inputs, *config.outputs)]
        theirs = [(t.name, t.datatype, t.dims) for t in (*source.inputs, *source.outputs)]
        if ours != theirs or from_config(source) is None:
            raise ConfigError(
                f"model {config.name!r}: screening_model {named!r} must screen, with the same "
                "inputs and outputs"
            )
        return source, picked

    def _drift_monitor(
        self,
        config: ModelConfig,
        version: int,
        backend: Backend,
        name: str | None = None,
        served: int | None = None,
    ) -> DriftMonitor | None:
        """A monitor for a torch model whose version folder holds a reference profile
        (``config`` and ``version``: the folder's; ``name`` and ``served``: the model it
        watches, when another model's weights screen it)."""
        wanted = config.parameters.get("drift", "on").lower() != "off"
        if not (self.settings.drift and wanted and hasattr(backend, "monitor")):
            return None
        try:  # monitoring must not cost a model its service: a bad profile turns it off
            profile = ReferenceProfile.load(config.version_path(version))
            if profile is not None:
                check_profile(profile, config, backend)
        except Exception as exc:
            log.error("model %s v%d: drift monitoring off: %s", config.name, version, exc)
            return None
        if profile is None:
            return None
        import torch

        screening = getattr(backend, "screening", None)
        targets = getattr(screening, "targets", None)
        if profile.flag_rate is not None and targets:
            # the flag-rate test follows the block tier in force, which the config can move
            # without recalibrating (the profile holds the rate at calibration time)
            profile = dataclasses.replace(profile, flag_rate=targets[ADVERSARIAL])
        monitor = DriftMonitor(
            name or config.name,
            str(served or version),
            profile,
            drift_config(self.settings),
            self.metrics,
            torch.device(backend.device),
            on_event=self.on_drift_event,
        )
        backend.monitor = monitor
        return monitor

    async def _close(self, loaded: LoadedModel) -> None:
        await loaded.batcher.close()
        if loaded.upstream is not None:
            await loaded.upstream.close()
        if loaded.remote is not None:
            await self._close_remote(loaded.remote, loaded.version)
        if loaded.backend is not loaded.remote:
            loaded.backend.close()
        if loaded.drift is not None:
            loaded.drift.close()

    def _update_ready(self) -> None:
        self.metrics.models_ready.set(len(self.loaded()))
