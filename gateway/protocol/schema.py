"""Pydantic models of the KServe v2 inference bodies, for the public OpenAPI document.

The codec (``gateway.protocol.codec``) parses requests itself, off the event loop and with limits
checked before data is touched; these models only *describe* the protocol, so that clients and
fuzzers (schemathesis) see every route, body and status. Spec: KServe "Open Inference Protocol"
v2 REST, and Triton's binary tensor data, classification and parameters extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorParameters(_Open):
    binary_data_size: int | None = Field(
        None, ge=0, description="Bytes of this input in the binary section after the JSON."
    )


class RequestInput(BaseModel):
    name: str = Field(min_length=1)
    shape: list[int] = Field(max_length=16, description="Batch axis first.")
    datatype: Datatype
    parameters: TensorParameters | None = None
    data: list[Any] | None = Field(None, description="Row-major values (nested lists allowed).")


class OutputParameters(_Open):
    binary_data: bool | None = None
    classification: int | None = Field(None, ge=0, description="Top-k as 'score:index[:label]'.")


class RequestOutput(BaseModel):
    name: str = Field(min_length=1)
    parameters: OutputParameters | None = None


class RequestParameters(_Open):
    binary_data_output: bool | None = None
    timeout: int | None = Field(None, ge=0, description="Deadline in microseconds.")
    screening_report: bool | None = Field(
        None, description="Per-image verdicts and scores as extra outputs (admin token only)."
    )


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response; at most 256 characters.")
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorBody(_Open):
    """Every error: ``error`` first; some carry machine-readable details beside it."""

    error: str


class WithheldBody(ErrorBody):
    """A 403: screening withheld images (the fields below), or a capability needs a token
    (``error`` alone)."""

    request_id: str | None = None
    withheld: list[int] = Field([], description="Indices of the images screening withheld.")
    reason: str | None = None
    quarantine_ids: list[str] = []


def error(description: str, model: type[BaseModel] = ErrorBody) -> dict[str, Any]:
    return {"model": model, "description": description}


FRONT_DOOR: dict[int | str, dict[str, Any]] = {
    408: error("The request head or body was not received in time."),
    413: error("The body, or its cost to decode, is over a limit."),
    431: error("The request head is too large or has too many fields."),
    503: error("Overloaded (too many connections, requests or decodes) or not ready."),
}
"""What any route can answer before it runs: the HTTP limits of ``gateway.server``."""
