"""Backends run a batch of tensors on a device; they know nothing of the protocol.

The contract is three phases the batcher times separately (Triton's compute_input, compute_infer,
compute_output): ``to_device``, ``forward`` and ``to_host``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bastion.gateway.errors import NotFound
from bastion.gateway.repository import ConfigError, ModelConfig

SCORES = "bastion.screening.scores"  # (n, D) detector scores, beside the model's outputs
COMBINED = "bastion.screening.combined"  # (n,) combined score; -1 when uncalibrated
FINGERPRINTS = "bastion.defence.fingerprints"  # (n, S) int64 query fingerprints (Blacklight)
EMBEDDINGS = "bastion.defence.embeddings"  # (n, E) float32 penultimate layer, for the k-NN test


class Backend(Protocol):
    device: str  # "cpu" or "cuda:N": batches on one device share its concurrency bound
    screening: Any  # the ScreenedClassifier when the model screens its inputs, else None

    def to_device(self, batch: dict[str, np.ndarray]) -> Any: ...

    def forward(self, inputs: Any) -> Any: ...

    def to_host(self, outputs: Any) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def load_backend(config: ModelConfig, version: int, device: str, threads: int) -> Backend:
    """Builds the backend a model's config names, for one version folder."""
    from bastion.gateway.screening.policy import from_config

    folder = config.version_path(version)
    policy = from_config(config)
    if config.backend == "pytorch":
        from bastion.gateway.backends.torch_backend import TorchBackend

        return TorchBackend(config, folder, device, policy)
    if policy is not None:
        raise ConfigError(
            f"model {config.name!r}: screening needs the pytorch backend (it takes an input "
            "gradient); set parameter screening to off"
        )
    if config.backend == "onnxruntime":
        from bastion.gateway.backends.onnx_backend import OnnxBackend

        return OnnxBackend(config, folder, device, threads)
    raise NotFound(f"model {config.name!r}: no backend named {config.backend!r}")


def weights_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
