"""What a response holds: the outputs a request names (every output when none), each as a
tensor or as Triton's classification extension, and what screening adds to it."""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.gateway.errors import InvalidInput
from bastion.gateway.protocol.types import (
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestedOutput,
)
from bastion.gateway.repository import ModelConfig, TensorSpec
from bastion.gateway.screening.service import REPORT_PARAMETER, Screened, report_outputs


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


def attach_screening(response: InferResponse, screened: Screened, request: InferRequest) -> None:
    """The flagged images' indices (served, not withheld); for an admin who asked
    (``screening_report``), every image's verdict and scores as extra outputs."""
    decision = screened.decision
    if decision.flagged:
        response.parameters["screening_flagged"] = ",".join(map(str, decision.flagged))
    if request.parameters.get(REPORT_PARAMETER) is True:
        report_outputs(screened, response.outputs, request.binary_output)
        response.parameters["screening_scores_columns"] = ",".join(screened.columns)


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor in model metadata: its batch dimension is -1."""
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.dims]}
