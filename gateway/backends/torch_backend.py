"""PyTorch backend: an architecture from ``models.zoo`` plus safetensors weights.

Nothing executable is read from the repository (no pickles, no TorchScript). On CUDA the batch is
staged in pinned memory and copied without blocking; on the CPU the same code runs unchanged.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bastion.gateway.backends import COMBINED, EMBEDDINGS, FINGERPRINTS, SCORES, weights_file
from bastion.gateway.defence.knn import KnnSpec
from bastion.gateway.monitoring.drift_monitor import DriftMonitor
from bastion.gateway.repository import ConfigError, ModelConfig
from bastion.gateway.screening.calibration import Calibration
from bastion.gateway.screening.mahalanobis import ClassGaussian
from bastion.gateway.screening.pipeline import ScreenedClassifier, ScreenResult
from bastion.gateway.screening.policy import ADVERSARIAL, ScreeningPolicy
from bastion.models.zoo import ServedClassifier, build


class TorchBackend:
    def __init__(
        self, config: ModelConfig, folder: Path, device: str, policy: ScreeningPolicy | None
    ) -> None:
        arch = config.parameters.get("architecture")
        if not arch:
            raise ConfigError(f"model {config.name!r}: parameters need an 'architecture'")
        path = weights_file(folder, ("model.safetensors",))
        if path is not None:
            net = build(arch)
            net.load_state_dict(load_file(path), strict=True)
        elif config.parameters.get("random_weights", "").lower() == "true":
            # benchmark models: the architecture's own initialisation, from a seed, no download
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(config.parameters.get("seed", "0")))
                net = build(arch)
        else:
            raise ConfigError(f"{folder} has no model.safetensors")
        self.device = device
        self._device = torch.device(device)
        images = all(len(t.dims) == 3 for t in config.inputs)
        self.module = ServedClassifier(net, channels_last=images).to(self._device).eval()
        self._inputs = [t.name for t in config.inputs]
        self._outputs = [t.name for t in config.outputs]
        if len(self._outputs) > 2:
            raise ConfigError(
                f"model {config.name!r}: a classifier serves logits and probabilities"
            )
        self._cuda = self._device.type == "cuda"
        self._pinned = threading.local()
        self.screening = _screened(self.module, config, folder, policy, self._device)
        self.monitor: DriftMonitor | None = None  # attached by the registry after warm-up

    def to_device(self, batch: dict[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = [torch.from_numpy(batch[name]) for name in self._inputs]
        if self._cuda:
            tensors = [
                self._stage(name, t).to(self._device, non_blocking=True)
                for name, t in zip(self._inputs, tensors, strict=True)
            ]
        return tensors

    def _stage(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copies into this thread's pinned buffer (allocating pinned memory per batch is slow).

        A buffer is reused only by the thread that owns it, after ``forward`` synchronised, so
        no copy in flight can be overwritten.
        """
        buffers: dict[str, torch.Tensor] = self._pinned.__dict__.setdefault("buffers", {})
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < tensor.numel():
            buffer = buffers[name] = torch.empty(tensor.numel(), dtype=tensor.dtype).pin_memory()
        staged = buffer[: tensor.numel()].view(tensor.shape)
        staged.copy_(tensor)
        return staged

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...] | ScreenResult:
        monitor = self.monitor
        if self.screening is not None:
            outputs = self.screening(inputs[0])
            if monitor is not None:
                flags = self._flags(outputs)
                with torch.no_grad():
                    monitor.observe(inputs[0], outputs.probs, outputs.embedding, flags)
        elif monitor is not None:
            with torch.inference_mode():
                logits, probs, embedding = self.module.forward_embedded(inputs[0])
            with torch.no_grad():  # the hop's tensors are ordinary ones, updated outside
                monitor.observe(inputs[0], probs, embedding, None)
            outputs = (logits, probs)
        else:
            with torch.inference_mode():
                outputs = self.module(*inputs)
        if self._cuda:
            torch.cuda.synchronize(self._device)
        return outputs

    def _flags(self, result: ScreenResult) -> torch.Tensor | None:
        """Which rows screening flags, on the device (float32, as the policy compares)."""
        calibration = self.screening.calibration if self.screening else None
        if calibration is None:
            return None
        return result.combined > self.screening.thresholds[ADVERSARIAL]

    def to_host(self, outputs: tuple[torch.Tensor, ...] | ScreenResult) -> dict[str, np.ndarray]:
        if isinstance(outputs, ScreenResult):
            host = {SCORES: outputs.scores.cpu().numpy(), COMBINED: outputs.combined.cpu().numpy()}
            if outputs.fingerprints is not None:
                host[FINGERPRINTS] = outputs.fingerprints.cpu().numpy()
                if self.screening.knn is not None and outputs.embedding is not None:
                    host[EMBEDDINGS] = outputs.embedding.float().cpu().numpy()
            outputs = (outputs.logits, outputs.probs)
        else:
            host = {}
        for name, tensor in zip(self._outputs, outputs, strict=False):
            host[name] = tensor.cpu().numpy()
        return host

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        if self._cuda:
            torch.cuda.empty_cache()


def _screened(
    module: torch.nn.Module,
    config: ModelConfig,
    folder: Path,
    policy: ScreeningPolicy | None,
    device: torch.device,
) -> ScreenedClassifier | None:
    """The fused screening job, refusing a model whose calibration is missing or stale."""
    if policy is None:
        return None
    where = f"model {config.name!r} version {folder.name}"
    again = f"run `bastion calibrate {config.name}` again"
    try:
        calibration = Calibration.load(folder)
        gaussian = ClassGaussian.load(folder) if "mahalanobis" in policy.detectors else None
    except Exception as exc:  # any unreadable file (JSON, safetensors, shapes) is a config error
        raise ConfigError(f"{where}: unreadable calibration ({exc}); {again}") from None
    if calibration is None and not policy.allow_uncalibrated:
        raise ConfigError(
            f"{where} screens its inputs but has no calibration; run `bastion calibrate "
            f"{config.name}` or set parameter screening_uncalibrated to allow"
        )
    if calibration is not None:
        wanted = (policy.detectors, policy.squeeze.bits, policy.squeeze.medians, policy.combiner)
        made = (calibration.detectors, calibration.bits, calibration.medians, calibration.rule)
        if wanted != made:
            raise ConfigError(
                f"{where}: calibration was made for detectors, bits, medians, combiner {made}; "
                f"the config asks for {wanted}; {again}"
            )
        if policy.block_fpr < calibration.smallest_fpr:
            raise ConfigError(
                f"{where}: screening_block_fpr {policy.block_fpr:g} is below the smallest rate "
                f"its {calibration.samples} calibration images support "
                f"({calibration.smallest_fpr:.2g}); calibrate with more clean data"
            )
    if "mahalanobis" in policy.detectors and (
        gaussian is None or gaussian.layer != policy.mahalanobis_layer
    ):
        raise ConfigError(
            f"{where}: the mahalanobis detector needs its class Gaussian for layer "
            f"{policy.mahalanobis_layer!r} (mahalanobis.safetensors); {again}"
        )
    try:
        job = ScreenedClassifier(
            module, policy.detectors, policy.squeeze, calibration, device, gaussian
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if calibration is not None:
        job.targets, job.thresholds = policy.targets, policy.thresholds
    try:
        job.knn = KnnSpec.load(folder)
    except ValueError as exc:
        raise ConfigError(f"{where}: unreadable k-NN detector ({exc}); {again}") from None
    return job
