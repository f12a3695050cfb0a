"""Drift windows: one hop's sufficient statistics on the device, and a window's scores.

A hop accumulates, with tensor ops only (no host sync), the histogram counts of each batch's
scalar statistics over the reference's bins, their sums, the predicted-class counts, the
flagged count and a ring of the latest embeddings. Closing a hop is the one host read. A window
is the last few closed hops; ``score_window`` compares it with the reference profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bastion.gateway.monitoring import drift
from bastion.gateway.monitoring.reference import STATISTICS, ReferenceProfile, scalar_statistics

PSI = tuple(f"psi_{name}" for name in STATISTICS)
JS_CLASSES = "js_classes"
FLAG_RATE = "flag_rate_z"
MMD = "mmd_embedding"


@dataclass(frozen=True)
class DriftConfig:
    hop_images: int = 250
    window_hops: int = 2
    hop_max_s: float = 60.0
    min_images: int = 400
    psi_threshold: float = 0.15
    js_threshold: float = 0.05
    flag_z_threshold: float = 5.0
    mmd_alpha: float = 0.001
    mmd_permutations: int = 1000
    mmd_interval_s: float = 5.0
    embedding_sample: int = 256


@dataclass
class Hop:
    """One hop's sufficient statistics, on the host once closed."""

    counts: torch.Tensor  # (S, B)
    sums: torch.Tensor  # (S,)
    classes: torch.Tensor  # (K,)
    flagged: int
    screened: int  # images that had a screening verdict
    images: int
    embeddings: torch.Tensor  # (<= ring, E), oldest first


class DeviceHop:
    """The open hop's device tensors; ``add`` is tensor ops only."""

    def __init__(
        self, profile: ReferenceProfile, device: torch.device, ring: int, opened: float
    ) -> None:
        s, b = profile.proportions.shape
        self.edges = profile.edges.to(device)
        self.counts = torch.zeros(s * b, dtype=torch.long, device=device)
        self.sums = torch.zeros(s, dtype=torch.float64, device=device)
        self.classes = torch.zeros(len(profile.classes), dtype=torch.long, device=device)
        self.flagged = torch.zeros((), dtype=torch.long, device=device)
        self.ring = torch.zeros(ring, profile.embeddings.shape[1], device=device)
        self.written = 0  # embeddings written to the ring, host-side count
        self.screened = 0
        self.images = 0
        self.opened = opened

    def add(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        embedding: torch.Tensor | None,
        flagged: torch.Tensor | None,
    ) -> None:
        values = scalar_statistics(images, probs)
        self.counts += drift.bin_counts(values, self.edges).flatten()
        self.sums += values.sum(dim=1, dtype=torch.float64)
        drift.count_into(self.classes, probs.argmax(dim=1))
        if flagged is not None:
            self.flagged += flagged.sum()
            self.screened += len(flagged)
        if embedding is not None:
            rows = embedding.detach()[-len(self.ring) :].float()
            end = self.written + len(rows)
            slots = torch.arange(self.written, end, device=self.ring.device) % len(self.ring)
            self.ring.index_copy_(0, slots, rows)
            self.written += len(rows)
        self.images += len(images)

    def close(self) -> Hop:
        s, b = self.edges.shape[0], self.edges.shape[1] + 1
        filled = min(self.written, len(self.ring))
        start = self.written % len(self.ring) if self.written > len(self.ring) else 0
        order = (torch.arange(filled) + start) % len(self.ring)
        return Hop(
            counts=self.counts.view(s, b).cpu(),
            sums=self.sums.cpu(),
            classes=self.classes.cpu(),
            flagged=int(self.flagged),
            screened=self.screened,
            images=self.images,
            embeddings=self.ring[order.to(self.ring.device)].cpu(),
        )


@dataclass
class WindowScores:
    at_image: int
    time: float
    images: int
    scores: dict[str, float]
    means: dict[str, float]
    pvalue: float | None = None
    alarm: bool = False
    active: list[str] = field(default_factory=list)


def score_window(
    profile: ReferenceProfile, hops: list[Hop], config: DriftConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """Scores (statistic → value) and statistic means of a window of closed hops. Pure."""
    counts = torch.stack([h.counts for h in hops]).sum(0)
    images = sum(h.images for h in hops)
    psi = drift.psi(profile.proportions, drift.proportions(counts))
    scores = {name: float(v) for name, v in zip(PSI, psi, strict=True)}
    classes = drift.proportions(torch.stack([h.classes for h in hops]).sum(0))
    scores[JS_CLASSES] = float(drift.js_divergence(profile.classes, classes))
    screened = sum(h.screened for h in hops)
    if profile.flag_rate is not None and screened:
        p0 = profile.flag_rate
        flagged = sum(h.flagged for h in hops)
        scores[FLAG_RATE] = (flagged - screened * p0) / math.sqrt(screened * p0 * (1 - p0))
    sums = torch.stack([h.sums for h in hops]).sum(0) / max(images, 1)
    means = {name: float(v) for name, v in zip(STATISTICS, sums, strict=True)}
    return scores, means


def thresholds(config: DriftConfig) -> dict[str, float]:
    table = dict.fromkeys(PSI, config.psi_threshold)
    table[JS_CLASSES] = config.js_threshold
    table[FLAG_RATE] = config.flag_z_threshold
    table[MMD] = config.mmd_alpha  # on the p-value: an alarm is *below* it
    return table
