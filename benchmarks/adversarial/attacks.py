"""White-box attacks from ART against the digits model, as data, with the protocol of Xu et al.

Protocol (Xu, Evans, Qi, "Feature Squeezing", NDSS 2018; Carlini & Wagner, AISec 2017): seeds are
correctly classified test images; an adversarial example counts only if it is still misclassified
after rounding to the 8-bit pixels the gateway accepts (``round(255 x) / 255``), since an attack
that only works between two pixel levels never reaches the model through the wire. Attacks
see the plain NCHW network (white box); the served graph computes the same function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.models.data import to_float

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration; ``max_seeds`` caps the slow optimisation attacks on the CPU."""

    name: str
    family: str
    art_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_seeds: int | None = None


_ITERATIVE = {"eps": 0.3, "eps_step": 0.01, "max_iter": 40, "batch_size": 250, "verbose": False}

ATTACKS: tuple[AttackSpec, ...] = (
    *(
        AttackSpec(f"fgsm-{eps}", "fgsm", "FastGradientMethod", {"eps": eps, "batch_size": 250})
        for eps in (0.1, 0.2, 0.3)
    ),
    AttackSpec("bim-0.3", "bim", "BasicIterativeMethod", dict(_ITERATIVE)),
    AttackSpec("pgd-0.3", "pgd", "ProjectedGradientDescent", {**_ITERATIVE, "num_random_init": 1}),
    # Carlini & Wagner (S&P 2017), kappa = 0: bounded to 5 x 20 Adam steps on the CPU; lr 0.1 and
    # c0 = 1 because ART's defaults (0.01, 0.01) found no example in that budget.
    AttackSpec(
        "cw-l2",
        "cw",
        "CarliniL2Method",
        {
            "confidence": 0.0,
            "learning_rate": 0.1,
            "initial_const": 1.0,
            "binary_search_steps": 5,
            "max_iter": 20,
            "batch_size": 50,
            "verbose": False,
        },
        max_seeds=250,
    ),
    # Moosavi-Dezfooli et al. (CVPR 2016); overshoot 0.02.
    AttackSpec(
        "deepfool",
        "deepfool",
        "DeepFool",
        {"max_iter": 50, "epsilon": 0.02, "batch_size": 125, "verbose": False},
        max_seeds=250,
    ),
)
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(spec.family for spec in ATTACKS))


@dataclass(frozen=True)
class AttackResult:
    """Successful adversarial examples of one attack, as the uint8 pixels a client would send."""

    name: str
    pixels: np.ndarray  # uint8 (s, 1, 28, 28), successes only
    seed_index: np.ndarray  # (s,) positions in the test split
    labels: np.ndarray  # (s,) true labels
    predictions: np.ndarray  # (s,) the model's label for the discretised example
    attempts: int
    mean_l2: float  # over successes, in [0, 1] pixel units, after discretisation
    mean_linf: float
    runtime_s: float

    @property
    def successes(self) -> int:
        return len(self.labels)


def select(families: list[str] | None) -> tuple[AttackSpec, ...]:
    """The specs of the named families (all when None), in the canonical order."""
    if families is None:
        return ATTACKS
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    return tuple(spec for spec in ATTACKS if spec.family in families)


def discretise(x: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] to the uint8 grid the gateway's clients send."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def predict(net: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted labels for float32 (or uint8) images."""
    if images.dtype == np.uint8:
        images = to_float(images)
    with torch.no_grad():
        chunks = [
            net(torch.from_numpy(images[i : i + batch_size])).argmax(1).numpy()
            for i in range(0, len(images), batch_size)
        ]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def select_seeds(
    net: nn.Module, images: np.ndarray, labels: np.ndarray, n: int, seed: int
) -> np.ndarray:
    """Indices of the first ``n`` correctly classified images in a seeded shuffle of the split.

    The split is stored ordered by class, so "the first n" without a shuffle would attack only
    the low digits.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    correct = predict(net, images[order]) == labels[order]
    return order[correct][:n]


def art_classifier(net: nn.Module) -> Any:
    """ART's wrapper around the plain network: clip to [0, 1], cross-entropy loss."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=INPUT_SHAPE,
        nb_classes=NUM_CLASSES,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def distortion(clean: np.ndarray, adversarial: np.ndarray) -> tuple[float, float]:
    """Mean L2 and L-infinity distance between uint8 image sets, in [0, 1] pixel units."""
    if len(clean) == 0:
        return float("nan"), float("nan")
    delta = (adversarial.astype(np.float64) - clean.astype(np.float64)).reshape(len(clean), -1)
    delta /= 255.0
    return float(np.linalg.norm(delta, axis=1).mean()), float(np.abs(delta).max(axis=1).mean())


def run_attack(
    spec: AttackSpec,
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    seeds: np.ndarray,
    seed: int,
) -> AttackResult:
    """Attacks the seed images, discretises, and keeps only the successes."""
    from art.attacks import evasion

    seeds = seeds[: spec.max_seeds] if spec.max_seeds else seeds
    np.random.seed(seed)
    torch.manual_seed(seed)
    attack = getattr(evasion, spec.art_class)(art_classifier(net), **spec.kwargs)
    start = time.perf_counter()
    adversarial = discretise(attack.generate(to_float(images[seeds])))
    runtime = time.perf_counter() - start
    predictions = predict(net, adversarial)
    hit = predictions != labels[seeds]
    l2, linf = distortion(images[seeds][hit], adversarial[hit])
    return AttackResult(
        name=spec.name,
        pixels=adversarial[hit],
        seed_index=seeds[hit],
        labels=labels[seeds][hit],
        predictions=predictions[hit],
        attempts=len(seeds),
        mean_l2=l2,
        mean_linf=linf,
        runtime_s=runtime,
    )
