"""Shared by the quarantine store tests: an injected clock and items."""

from __future__ import annotations

import numpy as np

from bastion.gateway.quarantine import NewItem


class Clock:
    """A clock that ticks one second per reading, so order never depends on real time."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def item(
    model: str = "resnet",
    index: int = 0,
    array: np.ndarray | None = None,
    request_id: str | None = "req-1",
) -> NewItem:
    return NewItem(
        model=model,
        version="1",
        client_id="client-a",
        request_id=request_id,
        image_index=index,
        input=np.zeros((3, 4, 4), np.float32) if array is None else array,
        scores={"squeeze": 0.9},
        thresholds={"squeeze": 0.5},
        verdict="adversarial",
    )
