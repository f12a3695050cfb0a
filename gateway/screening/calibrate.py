"""``bastion calibrate``: fit the screening on clean data and write it beside the weights.

Three clean sets, kept apart (``models.data`` for the bundled digits model, ``.npz`` files for
any other): the *training* split fits the Mahalanobis detector's class Gaussian (when the policy
uses it); the *calibration* split fits the clean tails and the tiers; the held-out *test* split
only measures: the realised false-positive rate of each tier, with its Clopper-Pearson 95 %
upper bound. Writes ``calibration.json``, ``mahalanobis.safetensors``, the drift reference
profile (``reference.safetensors``) and the stateful defence's k-NN threshold (``knn.json``, at
clean FPR ``KNN_FPR`` on the calibration split's embeddings).

An ``.npz`` file holds ``images`` (uint8 pixels, or floats in [0, 1], shaped like the model's
input) and, for the training set, ``labels`` (int, one per image).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bastion.gateway.backends.torch_backend import TorchBackend
from bastion.gateway.defence import knn
from bastion.gateway.monitoring.reference import build_profile
from bastion.gateway.progress import Progress
from bastion.gateway.registry import pick_device
from bastion.gateway.repository import ConfigError, ModelRepository
from bastion.gateway.screening import mahalanobis
from bastion.gateway.screening.calibration import Calibration, fit, held_out
from bastion.gateway.screening.mahalanobis import PENULTIMATE, ClassGaussian, LayerTap
from bastion.gateway.screening.pipeline import ScreenedClassifier, ScreenResult
from bastion.gateway.screening.policy import from_config
from bastion.gateway.screening.tail import (
    UnsupportedTarget,
    check_target,
    samples_needed,
    smallest_fpr,
)

GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
KNN_FPR = 0.001  # Chen, Carlini & Wagner's 0.1th percentile of benign k-NN distances
"""Rates always measured beside the tiers, so a tier moved in the config has a measured rate."""
SPLIT_NAMES = {"train": "3,000", "calibration": "1,000", "test": "1,000"}


def clean_images(
    data: Path | None, dims: tuple[int, ...], split: str = "calibration"
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Float32 images in [0, 1], their labels when known, and where they came from."""
    labels = None
    if data is not None:
        with np.load(data, allow_pickle=False) as archive:
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
        source = str(data)
    elif dims == (1, 28, 28):
        from bastion.models.data import load_split

        images, labels = load_split(split)  # type: ignore[arg-type]
        source = f"models.data {split} split ({SPLIT_NAMES[split]} MNIST digits, seed 0)"
    else:
        raise ConfigError(f"this model has no bundled {split} split; pass an .npz file")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if tuple(images.shape[1:]) != dims:
        raise ConfigError(f"{split} images are {images.shape[1:]}, the model takes {dims}")
    return np.ascontiguousarray(images, dtype=np.float32), labels, source


def layer_features(
    module: torch.nn.Module, images: np.ndarray, layer: str, device: torch.device
) -> torch.Tensor:
    """(n, E) pooled features of ``layer`` (or the penultimate embedding) for float images."""
    tap = None if layer == PENULTIMATE else LayerTap(module, layer)
    parts = []
    with torch.no_grad():
        for i in range(0, len(images), 250):
            batch = torch.from_numpy(images[i : i + 250]).to(device)
            if tap is None:
                parts.append(module.forward_embedded(batch)[2])
            else:
                with tap.capture():
                    module(batch)
                parts.append(tap.value)
    if any(p is None for p in parts):
        raise ConfigError("the model exposes no penultimate layer (no final Linear)")
    return torch.cat(parts).cpu()


def fit_gaussian(
    module: torch.nn.Module,
    layer: str,
    train: Path | None,
    dims: tuple[int, ...],
    classes: int,
    device: torch.device,
) -> tuple[ClassGaussian, str]:
    """The class Gaussian of ``layer``, fitted on the labelled training images."""
    images, labels, source = clean_images(train, dims, "train")
    if labels is None:
        raise ConfigError("the mahalanobis detector needs training labels (array 'labels')")
    features = layer_features(module, images, layer, device)
    try:
        classes_of = torch.from_numpy(labels.astype(np.int64))
        gaussian = mahalanobis.fit(features, classes_of, classes, layer)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"fitting the class Gaussian on {source}: {exc}") from None
    return gaussian, source


def run_job(
    job: ScreenedClassifier, images: np.ndarray, device: torch.device, what: str = "screen"
) -> list[ScreenResult]:
    """The fused job over ``images`` in batches of 250, its progress reported as ``what``."""
    results = []
    with Progress(what, len(images), "images") as progress:
        for i in range(0, len(images), 250):
            results.append(job(torch.from_numpy(images[i : i + 250]).to(device)))
            progress.advance(len(results[-1].scores))
    return results


def calibrate_model(
    repository: Path,
    name: str,
    version: int | None = None,
    data: Path | None = None,
    device: str = "auto",
    train: Path | None = None,
    test: Path | None = None,
    extra: tuple[float, ...] = (),
) -> tuple[Calibration, list[Path]]:
    """Fits and writes a version's screening; returns the calibration and the files written.

    The served tiers are the policy's (``config.pbtxt``); their realised FPRs are measured, and
    so are the ``extra`` rates and every rate of ``GRID`` the data supports, so a tier moved in
    the config later still has a measured rate. Raises ``ConfigError`` for a model that does not
    screen or data that does not fit it, and ``UnsupportedTarget`` when a tier or an extra rate
    needs more clean calibration images than given.
    """
    config = ModelRepository(repository).config(name)
    policy = from_config(config)
    if policy is None or config.backend != "pytorch":
        raise ConfigError(f"model {name!r} does not screen its inputs (parameter screening: on)")
    version = version or max(config.versions)
    folder = config.version_path(version)
    target = torch.device(pick_device(device))
    backend = TorchBackend(config, folder, str(target), policy=None)
    dims = config.inputs[0].dims
    block = policy.block_fpr
    images, _, source = clean_images(data, dims, "calibration")
    asked = {policy.block_fpr: "screening_block_fpr", policy.review_fpr: "screening_review_fpr"}
    asked |= {fpr: "--report-fpr" for fpr in extra if fpr not in asked}
    for fpr, what in asked.items():
        try:
            check_target(fpr, len(images), what)
        except UnsupportedTarget as exc:
            raise UnsupportedTarget(
                f"{exc} (from {source}); pass more with --data FILE.npz, or ask for a rate of "
                f"at least {smallest_fpr(len(images)):.2g}"
            ) from None
    rates = sorted(set(asked) | {a for a in GRID if samples_needed(a) <= len(images)})
    gaussian, train_source = None, None
    if "mahalanobis" in policy.detectors:
        classes = config.outputs[0].dims[-1]
        gaussian, train_source = fit_gaussian(
            backend.module, policy.mahalanobis_layer, train, dims, classes, target
        )
    job = ScreenedClassifier(
        backend.module, policy.detectors, policy.squeeze, None, target, gaussian
    )
    results = run_job(job, images, target, f"calibrate {name}: clean images")
    scores = np.concatenate([r.scores.cpu().numpy() for r in results]).astype(np.float64)
    meta = {"model": name, "version": version, "data": source, "device": str(target)}
    if train_source:
        meta["train"] = train_source
    calibration = fit(
        scores,
        policy.detectors,
        policy.squeeze.bits,
        policy.squeeze.medians,
        tuple(rates),
        rule=policy.combiner,
        meta=meta,
    )
    if test is not None or dims == (1, 28, 28):  # a held-out split to measure the tiers on
        test_images, _, test_source = clean_images(test, dims, "test")
        tested = run_job(job, test_images, target, f"calibrate {name}: test images")
        test_scores = np.concatenate([r.scores.cpu().numpy() for r in tested]).astype(np.float64)
        report = held_out(calibration, test_scores, tuple(rates))
        meta = {**calibration.meta, "test": test_source}
        calibration = replace(calibration, test=report, meta=meta)
    embeddings = [r.embedding for r in results]
    profile = build_profile(
        torch.from_numpy(images),
        torch.cat([r.probs for r in results]).cpu(),
        torch.cat(embeddings).cpu() if all(e is not None for e in embeddings) else None,
        flag_rate=block,
        meta={"model": name, "version": version, "data": source},
    )
    paths = [calibration.save(folder), profile.save(folder)]
    if gaussian is not None:
        paths.append(gaussian.save(folder))
    if all(e is not None for e in embeddings):  # the stateful defence's k-NN detector
        classes = torch.cat([r.probs for r in results]).argmax(1).cpu().numpy()
        try:
            spec = knn.calibrate(torch.cat(embeddings).float().cpu().numpy(), classes, KNN_FPR)
        except ValueError as exc:
            raise UnsupportedTarget(f"the k-NN detector: {exc} (from {source})") from None
        paths.append(spec.save(folder))
    return calibration, paths
