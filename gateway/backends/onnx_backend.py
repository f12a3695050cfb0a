"""onnxruntime backend: ``model.onnx`` on the CUDA provider when present, else the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from bastion.gateway.backends import weights_file
from bastion.gateway.repository import ConfigError, ModelConfig


class OnnxBackend:
    def __init__(self, config: ModelConfig, folder: Path, device: str, threads: int) -> None:
        path = weights_file(folder, ("model.onnx",))
        if path is None:
            raise ConfigError(f"{folder} has no model.onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.device = device if providers[0] != "CPUExecutionProvider" else "cpu"
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self._outputs = [t.name for t in config.outputs]
        self.screening = None

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch

    def forward(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._outputs, inputs)

    def to_host(self, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, outputs, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
