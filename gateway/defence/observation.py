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
    lines: tuple[int, ...] = ()  # images on a line through two of the client's: withheld
    client: str | None = None  # whose images (for ``settle``)
    rows: tuple[int, ...] = ()  # the image index of each of ``slots``


@dataclass(frozen=True)
class Embedded:
    """A request's embeddings and the model's calibrated k-NN detector."""

    model: str  # name and version: histories are per embedding space
    spec: KnnSpec
    embeddings: np.ndarray  # (n, E) float32


@dataclass(frozen=True)
class Evidence:
    """One image's evidence as its replica weighed it, for the other replicas to apply as if
    they had seen it (``DefenceService.replay``): the query to remember, what it was answered,
    and the ladder's observation (probe and link decided by the replica that saw it)."""

    client: str
    fingerprint: np.ndarray  # (S,) int64
    content: int  # picture_hash of the input row
    flagged: bool
    adversarial: bool
    probe: bool
    linked: str | None
    near: bool | None
    flag_rate: float | None
    block_rate: float | None
    near_rate: float | None
    answer_key: int = 0
    answer: np.ndarray | None = None  # (A,) float32: what the query was answered
    model: str | None = None  # the k-NN's embedding space ("name:version"), with ``embedding``
    embedding: np.ndarray | None = None  # (E,) float32
    resend: bool = False  # a refused picture its client sent again: the ladder's only

    @classmethod
    def resent(
        cls,
        client: str,
        fingerprint: np.ndarray,
        content: int,
        flag_rate: float | None,
        block_rate: float | None,
    ) -> Evidence:
        """A blocked picture its client resent, counted against it once more."""
        return cls(client, fingerprint, content, True, True, False, None, None, flag_rate,
                   block_rate, None, resend=True)  # fmt: skip
