"""Clean-score p-values that keep their resolution past the largest calibration score.

A score's p-value is the chance that a clean input scores at least as high. In the body of the
clean distribution it is the conformal p-value ``(1 + #{s_i > s}) / (n + 1)`` (Vovk, Gammerman &
Shafer 2005); its smallest value is ``1 / (n + 1)``, so 1,000 clean scores alone cannot set a
threshold at 0.1 %. Above a high clean quantile ``u`` (the top ``k`` scores) the excesses are
modelled by a generalized Pareto distribution (peaks over threshold; Pickands 1975, Balkema & de
Haan 1974): ``p(s) = (k + 1)/(n + 1) * (1 + xi (s - u) / sigma) ** (-1 / xi)``, continuous with the
body at ``u`` and still falling beyond the largest clean score.

The tail is fitted on a monotone re-expression of the score that matches its range, as is usual
before a peaks-over-threshold fit: the logit ``log s - log(bound - s)`` for a score in
``[0, bound]`` (feature squeezing's L1 distance tops out at 2, the margin score at 1), so a
maximal score is infinitely surprising rather than merely rare; ``log s`` for a positive
unbounded score (gradient norm, Mahalanobis distance). Both spread clean scores that span
orders of magnitude, which otherwise forces a very heavy fitted tail. The body's ranks do not
change.

Scores are reported as *surprise*, ``-log10 p``: a threshold at false-positive rate ``a`` is
simply ``-log10 a`` (2.3 for 0.5 %, 3 for 0.1 %). The fit runs offline (scipy); evaluation is a
``searchsorted`` and a few elementwise ops on the device, with no host sync.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

TAIL_FRACTION = 0.1
"""Share of the clean scores above the tail's start ``u``."""
MIN_EXCEEDANCES = 50
"""Fewest clean scores above ``u`` a generalized Pareto fit is trusted with."""
EXTRAPOLATION = 10.0
"""How far below the empirical resolution ``1/(n+1)`` a threshold may be set: one decade."""
TINY = 1e-30
"""Where the re-expressions clamp their logarithm's argument."""
FLOOR = 1e-30
"""Smallest p-value reported (surprise at most 30): beyond a bounded tail's end (xi < 0) the
model says 'impossible for a clean input', which must stay a finite, comparable number."""


class UnsupportedTarget(ValueError):
    """A false-positive rate the clean data cannot calibrate; says how much data it needs."""


@dataclass(frozen=True)
class TailModel:
    """One score's clean distribution: sorted clean scores and a GPD fit of their top ``k``."""

    reference: list[float]  # sorted ascending, n values
    start: float  # u, the largest clean score not in the tail
    scale: float  # sigma > 0, in the re-expressed units
    shape: float  # xi
    exceedances: int  # k
    bound: float | None = None  # the score's known maximum: tail on its logit
    log: bool = False  # a positive unbounded score: tail on log s

    @property
    def samples(self) -> int:
        return len(self.reference)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def samples_needed(fpr: float) -> int:
    """Clean calibration scores needed to set a threshold at ``fpr``: enough for the tail fit,
    and an empirical resolution within ``EXTRAPOLATION`` of the target."""
    by_resolution = math.ceil(1.0 / (fpr * EXTRAPOLATION)) - 1
    return max(math.ceil(MIN_EXCEEDANCES / TAIL_FRACTION), by_resolution)


def smallest_fpr(samples: int) -> float:
    """The lowest false-positive rate ``samples`` clean scores can calibrate."""
    return 1.0 / (EXTRAPOLATION * (samples + 1))


def check_target(fpr: float, samples: int, what: str = "target") -> None:
    """Raises ``UnsupportedTarget`` when ``samples`` clean scores cannot support ``fpr``."""
    if not 0.0 < fpr < 1.0:
        raise UnsupportedTarget(f"{what} false-positive rate must lie in (0, 1), got {fpr}")
    needed = samples_needed(fpr)
    if samples < needed:
        raise UnsupportedTarget(
            f"{what} false-positive rate {fpr:g} needs at least {needed:,} clean calibration "
            f"images (a generalized Pareto tail of >= {MIN_EXCEEDANCES} exceedances, and a "
            f"resolution 1/(n+1) within {EXTRAPOLATION:g}x of the target); have {samples:,}"
        )


def validate(model: TailModel, samples: int, name: str) -> None:
    """Raises ``ValueError`` for a tail model whose numbers cannot be what ``fit`` made."""
    reference = np.asarray(model.reference, dtype=np.float64)
    checks = {
        "reference is not the calibration samples": reference.shape != (samples,),
        "reference is not finite and sorted": not (
            np.isfinite(reference).all() and (np.diff(reference) >= 0).all()
        ),
        "start, scale or shape is not finite": not np.isfinite(
            [model.start, model.scale, model.shape]
        ).all(),
        "scale is not positive": not model.scale > 0,
        "exceedances out of range": not 1 <= model.exceedances < samples,
        "bound is not a positive number": model.bound is not None
        and not (math.isfinite(model.bound) and model.bound > 0),
    }
    failed = [what for what, bad in checks.items() if bad]
    if failed:
        raise ValueError(f"tail of {name}: {'; '.join(failed)}")


def reexpress(scores: np.ndarray, bound: float | None, log: bool) -> np.ndarray:
    """The monotone re-expression the tail is fitted on (float64 numpy)."""
    s = np.asarray(scores, dtype=np.float64)
    with np.errstate(all="ignore"):
        if bound is not None:
            return np.log(np.clip(s, TINY, None)) - np.log(np.clip(bound - s, TINY, None))
        if log:
            return np.log(np.clip(s, TINY, None))
    return s


def fit(scores: np.ndarray, bound: float | None = None, log: bool = False) -> TailModel:
    """Fits the body and the tail of finite clean ``scores`` (n,), n >= ``samples_needed`` of
    the top decile. Raises ``ValueError`` for too few or non-finite scores."""
    from scipy.stats import genpareto

    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    if n < MIN_EXCEEDANCES / TAIL_FRACTION or not np.isfinite(ordered).all():
        raise ValueError(f"need >= {MIN_EXCEEDANCES / TAIL_FRACTION:.0f} finite clean scores")
    k = max(MIN_EXCEEDANCES, math.ceil(TAIL_FRACTION * n))
    start = float(ordered[n - k - 1])
    top = reexpress(ordered[n - k :], bound, log)
    excesses = top - reexpress(np.array([start]), bound, log)[0]
    if excesses.max() <= 0:  # a flat tail: everything above u is as surprising as can be
        return TailModel(ordered.tolist(), start, 1e-12, -1.0, k, bound, log)
    with np.errstate(all="ignore"):
        shape, _, scale = genpareto.fit(excesses, floc=0.0)
    if not (np.isfinite(shape) and np.isfinite(scale) and scale > 0) or shape < -0.5:
        # the MLE is irregular for xi < -1/2 (Smith 1985): fall back to the exponential tail
        shape, scale = 0.0, float(excesses.mean())
    return TailModel(ordered.tolist(), start, float(scale), float(shape), k, bound, log)


@dataclass(frozen=True)
class TailTensors:
    """The tail models of D scores, stacked on one device for batched evaluation."""

    reference: torch.Tensor  # (D, n) sorted clean scores; all models share n
    start: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)
    shape: torch.Tensor  # (D,)
    exceedances: torch.Tensor  # (D,)
    bound: torch.Tensor  # (D,) the known maximum, NaN where there is none
    log: torch.Tensor  # (D,) bool: tail on log s

    @classmethod
    def stack(cls, models: list[TailModel], device: torch.device) -> TailTensors:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            reference=torch.tensor(
                [m.reference for m in models], dtype=torch.float32, device=device
            ),
            start=column([m.start for m in models]),
            scale=column([m.scale for m in models]),
            shape=column([m.shape for m in models]),
            exceedances=column([float(m.exceedances) for m in models]),
            bound=column([math.nan if m.bound is None else m.bound for m in models]),
            log=torch.tensor([m.log for m in models], device=device),
        )

    def reexpress(self, scores: torch.Tensor) -> torch.Tensor:
        """(n, D) scores -> their per-column re-expression, as ``reexpress`` does."""
        logged = torch.log(scores.clamp_min(TINY))
        bounded = logged - torch.log((self.bound - scores).clamp_min(TINY))
        out = torch.where(self.log, logged, scores)
        return torch.where(torch.isnan(self.bound), out, bounded)


def surprise(scores: torch.Tensor, tails: TailTensors) -> torch.Tensor:
    """``-log10 p`` of each score under its clean model: (n, D) scores -> (n, D) surprise >= 0.

    Non-finite scores are mapped to the floor p-value (maximum surprise) by the caller's
    detectors already; here every input is treated as a number.
    """
    n = tails.reference.shape[1]
    above = n - torch.searchsorted(tails.reference, scores.T.contiguous(), right=True).T
    body = (1.0 + above.to(scores.dtype)) / (n + 1)
    start = tails.reexpress(tails.start.unsqueeze(0))
    excess = (tails.reexpress(scores) - start).clamp_min(0) / tails.scale
    xi = tails.shape
    exponential = torch.exp(-excess)
    safe_xi = torch.where(xi.abs() < 1e-6, torch.ones_like(xi), xi)
    base = (1.0 + safe_xi * excess).clamp_min(0.0)
    pareto = torch.where(base > 0, base.pow(-1.0 / safe_xi), torch.zeros_like(base))
    survival = torch.where(xi.abs() < 1e-6, exponential, pareto)
    tail = (tails.exceedances + 1.0) / (n + 1) * survival
    p = torch.where(scores > tails.start, tail, body)
    return -torch.log10(p.clamp(FLOOR, 1.0))


def surprise_numpy(scores: np.ndarray, model: TailModel) -> np.ndarray:
    """The same p-value for one score column, in float64 numpy: for offline reports and tests."""
    reference = np.asarray(model.reference)
    n = len(reference)
    s = np.asarray(scores, dtype=np.float64)
    body = (1.0 + n - np.searchsorted(reference, s, side="right")) / (n + 1)
    start = reexpress(np.array([model.start]), model.bound, model.log)[0]
    excess = np.clip(reexpress(s, model.bound, model.log) - start, 0, None) / model.scale
    if abs(model.shape) < 1e-6:
        survival = np.exp(-excess)
    else:
        base = np.clip(1.0 + model.shape * excess, 0.0, None)
        with np.errstate(divide="ignore"):
            survival = np.where(base > 0, base ** (-1.0 / model.shape), 0.0)
    tail = (model.exceedances + 1.0) / (n + 1) * survival
    p = np.where(s > model.start, tail, body)
    return -np.log10(np.clip(p, FLOOR, 1.0))
