"""What a request asks back: the outputs it names (every output when none), each as a tensor or
as Triton's classification extension."""

from __future__ import annotations

import numpy as np

from gateway.errors import InvalidInput
from gateway.protocol.types import InferRequest, OutputTensor, RequestedOutput
from gateway.repository import ModelConfig


def requested_outputs(config: ModelConfig, request: InferRequest) -> list[RequestedOutput]:
    if request.outputs is None:
        return [RequestedOutput(spec.name, request.binary_output) for spec in config.outputs]
    known = {spec.name for spec in config.outputs}
    for want in request.outputs:
        if want.name not in known:
            raise InvalidInput(
                f"model {config.name!r} has no output {want.name!r}; its outputs are "
                f"{sorted(known)}"
            )
    return [
        RequestedOutput(
            w.name, request.binary_output if w.binary is None else w.binary, w.class_count
        )
        for w in request.outputs
    ]


def output_tensor(config: ModelConfig, want: RequestedOutput, values: np.ndarray) -> OutputTensor:
    spec = next(s for s in config.outputs if s.name == want.name)
    binary = bool(want.binary)
    if not want.class_count:
        return OutputTensor(spec.name, spec.datatype, values, binary)
    return OutputTensor(spec.name, "BYTES", classify(values, want.class_count, spec.labels), binary)


def classify(values: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """Triton's classification extension: top-k per row as ``"score:index[:label]"``."""
    flat = values.reshape(values.shape[0], -1)
    k = min(k, flat.shape[1])
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    out = np.empty(top.shape, dtype=object)
    for row, indices in enumerate(top):
        for col, index in enumerate(indices):
            label = f":{labels[index]}" if index < len(labels) else ""
            out[row, col] = f"{flat[row, index]:f}:{index}{label}".encode()
    return out
