"""What the defence's ``observe`` takes beside the images, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bastion.gateway.defence.knn import KnnSpec


@dataclass(frozen=True)
class Observation:
    rung: str
    probes: int  # images of the request that nearly duplicate a remembered query
    repeats: dict[int, np.ndarray]  # image index -> the remembered answer to give instead
    near: int = 0  # images the k-NN detector found close to the client's earlier queries
    contained: int = 0  # probes that continue a campaign at the refuse rung, whoever sent them
    refused: tuple[int, ...] = ()  # images whose near-duplicate was refused: refused again
    slots: tuple[tuple[int, int], ...] = ()  # (slot, content) of each query remembered
    answer_key: int = 0
    tightened: bool = False  # a young identity during an alert: its suspicious images withheld


@dataclass(frozen=True)
class Embedded:
    """A request's embeddings and the model's calibrated k-NN detector."""

    model: str  # name and version: histories are per embedding space
    spec: KnnSpec
    embeddings: np.ndarray  # (n, E) float32
