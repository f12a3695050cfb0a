"""Protocol-agnostic inference request and response: what the codecs produce and consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InputTensor:
    """A decoded input. ``data`` has ``shape``; BYTES inputs hold an object array of ``bytes``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output
    class_count: int = 0  # classification extension: top-k as "score:index[:label]"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as its transport established it.

    ``client_id`` is validated (length, charset) by the transport; ``scopes`` are capabilities the
    caller proved (the admin token grants ``screening_report``). ``shared``: the id is only the
    peer address, which many clients may share (a proxy, a NAT): the stateful defence refuses
    such a caller's probing queries, never the address as a whole.
    """

    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    shared: bool = False


@dataclass(slots=True)
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    binary_output: bool = False
    timeout_us: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None  # from a transport header, for screening and quarantine


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray
    binary: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
