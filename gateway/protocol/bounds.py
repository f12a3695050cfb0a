"""What a request may carry, checked from its header before any of its data is touched.

``Limits`` holds the global bounds and, per input, what the model can take (``InputBound``,
derived by ``gateway.limits``); ``check_bound`` refuses a tensor past them from its name, datatype
and shape alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from bastion.gateway.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class InputBound:
    """What a model takes for one input, so a tensor too big for it is refused before its
    data is parsed: ``max_rows`` is the model's max_batch_size, ``max_elements`` the rows times
    the elements of one row (0 when a dimension is variable; then only the global limit holds).
    Encoded images (BYTES given to a non-BYTES input) are one element a row."""

    datatype: str
    max_rows: int
    max_elements: int

    def cap(self, datatype: str) -> int:
        if datatype == "BYTES" and self.datatype != "BYTES":
            return self.max_rows
        return self.max_elements


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 16 << 20
    max_elements: int = 1 << 26
    max_request_id_chars: int = 256
    inputs: Mapping[str, InputBound] = field(default_factory=dict)
    max_json_tokens: int = 0  # commas and brackets in the JSON part; 0: not checked


@dataclass(frozen=True, slots=True)
class RawInput:
    """What a header-less body (``Inference-Header-Content-Length: 0``) means for a model."""

    name: str
    datatype: str
    dims: tuple[int, ...]


def check_bound(name: str, datatype: str, shape: tuple[int, ...], limits: Limits) -> None:
    """Refuses a tensor larger than the model could take, before its data is touched."""
    bound = limits.inputs.get(name)
    if bound is None:
        if limits.inputs:  # refused before a byte of its data is touched
            raise InvalidInput(
                f"the model has no input {name!r}; its inputs are {sorted(limits.inputs)}"
            )
        return
    if shape and shape[0] > bound.max_rows:
        raise InvalidInput(f"input {name!r}: batch size {shape[0]} is outside 1..{bound.max_rows}")
    cap = bound.cap(datatype)
    count = math.prod(shape)
    if cap and count > cap:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} has {count} elements; the model takes at "
            f"most {cap} per request ({bound.max_rows} rows)"
        )
