"""Class-conditional Gaussian on penultimate features: the embedding-space detector's model.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks" (NeurIPS 2018): fit one mean per class and one shared (tied) covariance on
the penultimate-layer features of the *training* split, then score a sample by its smallest
Mahalanobis distance to any class mean. Adversarial perturbations move an image across the
decision boundary in logit space while its features stay off every class's manifold, so the
distance grows. We use the plain penultimate score (no input pre-processing, no layer ensemble):
one matrix product per batch, computed on the device with the rest of the screening job.

The features are the penultimate layer's (the head's input, which the drift monitor reads) or,
with ``screening_mahalanobis_layer``, any named module's output, spatially mean-pooled: Lee et al.
find earlier layers separate adversarial inputs better, and for the digits CNN the first
convolution block does (``benchmarks/adversarial/combiner``), while the penultimate layer barely
does (ROC-AUC 0.72 on the test attacks).

Stored beside the weights as ``mahalanobis.safetensors`` (tensors only: loading runs no code).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FILENAME = "mahalanobis.safetensors"
PENULTIMATE = "penultimate"
"""The layer name meaning 'the classification head's input'."""
SHRINKAGE = 1e-6
"""Ridge added to the tied covariance, relative to its mean eigenvalue: ReLU features have dead
dimensions (zero variance), which would make the covariance singular."""


@dataclass(frozen=True)
class ClassGaussian:
    """Class means and the whitening factor of the tied covariance.

    ``means`` is (K, E) float32; ``whitening`` is (E, E) float32, the lower Cholesky factor ``L``
    of the precision matrix, so ``(z - mu)^T Sigma^-1 (z - mu) = ||(z - mu) @ L||^2``.
    """

    means: torch.Tensor
    whitening: torch.Tensor
    layer: str = PENULTIMATE

    def to(self, device: torch.device) -> ClassGaussian:
        return ClassGaussian(self.means.to(device), self.whitening.to(device), self.layer)

    def save(self, folder: Path) -> Path:
        path = folder / FILENAME
        tensors = {"means": self.means.contiguous(), "whitening": self.whitening.contiguous()}
        metadata = {"method": "lee2018-tied-covariance", "layer": self.layer}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, folder: Path) -> ClassGaussian | None:
        path = folder / FILENAME
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            layer = (handle.metadata() or {}).get("layer", PENULTIMATE)
        tensors = load_file(str(path))
        means, whitening = tensors["means"].float(), tensors["whitening"].float()
        if means.ndim != 2 or whitening.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"{path}: means {tuple(means.shape)}, whitening {whitening.shape}")
        if not (torch.isfinite(means).all() and torch.isfinite(whitening).all()):
            raise ValueError(f"{path}: non-finite class means or whitening")
        if not layer:
            raise ValueError(f"{path}: no layer name")
        return cls(means, whitening, layer)


def fit(
    features: torch.Tensor, labels: torch.Tensor, classes: int, layer: str = PENULTIMATE
) -> ClassGaussian:
    """Fits the class means and tied covariance (maximum likelihood, in float64).

    ``features`` (N, E) float, ``labels`` (N,) int64 in ``[0, classes)``. Raises ``ValueError``
    when a class has no sample (its mean would be undefined).
    """
    z = features.detach().to(torch.float64)
    counts = torch.bincount(labels, minlength=classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"no training features for classes {missing}")
    means = torch.zeros(classes, z.shape[1], dtype=torch.float64).index_add_(0, labels, z)
    means /= counts.unsqueeze(1)
    centred = z - means[labels]
    covariance = centred.T @ centred / len(z)
    ridge = SHRINKAGE * covariance.diagonal().mean().clamp_min(1e-12)
    covariance += ridge * torch.eye(z.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2
    whitening = torch.linalg.cholesky(precision)
    return ClassGaussian(means.float(), whitening.float(), layer)


def score(embedding: torch.Tensor, model: ClassGaussian) -> torch.Tensor:
    """(n,) smallest squared Mahalanobis distance of each row of ``embedding`` (n, E) to a class
    mean; same device and dtype as the embedding. Expanded as ``|a|^2 - 2 a.b + |b|^2`` in the
    whitened space, so it is one (n, E) x (E, K) product, not an (n, K, E) tensor."""
    a = embedding @ model.whitening
    b = model.means @ model.whitening
    distances = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)
    return distances.clamp_min(0).amin(dim=1)


def pool(activation: torch.Tensor) -> torch.Tensor:
    """(n, C, ...) -> (n, C): a feature map's spatial mean; (n, E) passes through."""
    return activation.flatten(2).mean(dim=2) if activation.ndim > 2 else activation


class LayerTap:
    """Catches one named submodule's pooled output during a forward pass, per thread.

    The hook stays registered but records only inside ``capture()``, so plain serving passes
    and concurrent batches on other threads are untouched. Raises ``ValueError`` for a layer
    the module does not have.
    """

    def __init__(self, module: nn.Module, layer: str) -> None:
        try:
            target = module.get_submodule(layer) if layer else None
        except AttributeError:
            target = None
        if target is None or target is module:
            raise ValueError(f"the model has no layer {layer!r}")
        self.layer = layer
        self._local = threading.local()
        target.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: object, output: object) -> None:
        if getattr(self._local, "on", False):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer {self.layer!r} does not output one tensor")
            self._local.value = pool(output)

    @contextmanager
    def capture(self) -> Iterator[LayerTap]:
        self._local.on, self._local.value = True, None
        try:
            yield self
        finally:
            self._local.on = False

    @property
    def value(self) -> torch.Tensor | None:
        return getattr(self._local, "value", None)
