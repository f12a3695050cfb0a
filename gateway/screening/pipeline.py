"""The fused screening job: classifier and every detector as one device job per batch.

The originals go forward with autograd for the input gradient (one backward pass over their
rows only); the squeezed copies go forward without it, in one batch; the margin comes from the
originals' softmax, and the detectors' percentiles are computed on the device: the host sees
only the final outputs and scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bastion.gateway.defence.fingerprint import FingerprintSpec, fingerprints
from bastion.gateway.defence.knn import KnnSpec
from bastion.gateway.screening import detectors as registry
from bastion.gateway.screening.calibration import Calibration, Combiner
from bastion.gateway.screening.detectors import Detector, ScreenInputs
from bastion.gateway.screening.mahalanobis import PENULTIMATE, ClassGaussian, LayerTap
from bastion.kernels.squeeze import SqueezeSpec, squeeze


@dataclass(frozen=True, slots=True)
class ScreenResult:
    logits: torch.Tensor  # (n, K)
    probs: torch.Tensor  # (n, K)
    scores: torch.Tensor  # (n, D), one column per detector
    combined: torch.Tensor  # (n,) clean surprise -log10 p; -1 when uncalibrated
    screen_ns: int  # host time spent on squeezing, backward and scoring
    embedding: torch.Tensor | None = None  # (n, E) penultimate layer, for drift monitoring
    fingerprints: torch.Tensor | None = None  # (n, S) int64 query fingerprints (defence)


class ScreenedClassifier:
    """Wraps a served classifier (returning logits, probs) with in-batch detectors."""

    def __init__(
        self,
        module: nn.Module,
        detector_names: tuple[str, ...],
        squeeze_spec: SqueezeSpec,
        calibration: Calibration | None,
        device: torch.device,
        gaussian: ClassGaussian | None = None,
    ) -> None:
        self.module = module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self.detectors: tuple[Detector, ...] = registry.get(detector_names)
        self.squeeze_spec = squeeze_spec
        self._squeeze = any(d.needs_squeeze for d in self.detectors)
        self._gradient = any(d.needs_gradient for d in self.detectors)
        self.gaussian = None
        self._tap: LayerTap | None = None
        if any(d.needs_features for d in self.detectors):
            if gaussian is None:
                raise ValueError("the mahalanobis detector needs its class Gaussian")
            self.gaussian = gaussian.to(device)
            if gaussian.layer != PENULTIMATE:
                self._tap = LayerTap(module, gaussian.layer)
        self.calibration = calibration
        # per verdict tier, set by the policy: target clean FPR and its combined-score threshold
        self.targets: dict[str, float] | None = None
        self.thresholds: dict[str, float] | None = None
        self.fingerprint_spec: FingerprintSpec | None = None  # set when the defence is on
        self.knn: KnnSpec | None = None  # the calibrated k-NN detector, when the version has one
        self.combiner = Combiner.on(calibration, device) if calibration else None

    def forward_features(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits, probabilities, penultimate embedding and the Gaussian's layer features."""
        if self._tap is None:
            logits, probs, embedding = self.module.forward_embedded(rows)
            return logits, probs, embedding, embedding
        with self._tap.capture() as tap:
            logits, probs, embedding = self.module.forward_embedded(rows)
        return logits, probs, embedding, tap.value

    def __call__(self, x: torch.Tensor) -> ScreenResult:
        n = x.shape[0]
        t0 = time.perf_counter_ns()
        with torch.no_grad():
            copies = squeeze(x, self.squeeze_spec).flatten(0, 1) if self._squeeze else None
        t1 = time.perf_counter_ns()
        gradient = None
        if self._gradient:
            # autograd over the originals only: the squeezed rows need no input gradient, and a
            # graph through the whole fused batch would make the backward (1 + S) times dearer
            with torch.enable_grad():
                original = x.detach().requires_grad_(True)
                # the module sees a view, not the leaf: module-level autograd hooks (the FLOP
                # counter's, profilers') cannot take a leaf passed to autograd.grad
                logits, probs, embedding, features = self.forward_features(original.view_as(x))
                loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
                (gradient,) = torch.autograd.grad(loss, original)
            with torch.no_grad():
                logits, probs = logits.detach(), probs.detach()
                embedding = None if embedding is None else embedding.detach()
                features = None if features is None else features.detach()
                squeezed_all = None if copies is None else self.module.forward_embedded(copies)[1]
        else:
            with torch.no_grad():
                rows = x if copies is None else torch.cat([x, copies])
                logits_all, probs_all, embedding_all, features_all = self.forward_features(rows)
                logits, probs = logits_all[:n], probs_all[:n]
                embedding = None if embedding_all is None else embedding_all[:n]
                features = None if features_all is None else features_all[:n]
                squeezed_all = None if copies is None else probs_all[n:]
        t2 = time.perf_counter_ns()
        with torch.no_grad():
            squeezed = None if squeezed_all is None else squeezed_all.view(-1, *probs.shape)
            inputs = ScreenInputs(probs, squeezed, gradient, features, self.gaussian)
            scores = registry.run(self.detectors, inputs)
            if self.combiner is None:
                combined = torch.full((n,), -1.0, device=x.device)
            else:
                combined = self.combiner(scores)
            spec = self.fingerprint_spec
            prints = None if spec is None else fingerprints(x, spec)
        screen_ns = t1 - t0 + time.perf_counter_ns() - t2
        return ScreenResult(logits, probs, scores, combined, screen_ns, embedding, prints)
