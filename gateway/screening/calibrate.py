"""``bastion calibrate``: score clean calibration images; write ``calibration.json`` and the
drift reference profile (``reference.safetensors``) beside the weights.

The images come from the project's documented split for the digits model, or from an ``.npz``
file (array ``images``: uint8 pixels or floats in [0, 1], shaped like the model's input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gateway.backends.torch_backend import TorchBackend
from gateway.monitoring.reference import build_profile
from gateway.registry import pick_device
from gateway.repository import ConfigError, ModelRepository
from gateway.screening.calibration import Calibration, fit
from gateway.screening.pipeline import ScreenedClassifier
from gateway.screening.policy import from_config


def clean_images(data: Path | None, dims: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Clean float32 images in [0, 1] and a description of where they came from."""
    if data is not None:
        with np.load(data, allow_pickle=False) as archive:
            images = archive["images"]
        source = str(data)
    elif dims == (1, 28, 28):
        from models.data import load_split

        images, _ = load_split("calibration")
        source = "models.data calibration split (1,000 MNIST digits, seed 0)"
    else:
        raise ConfigError("this model has no bundled calibration split; pass --data FILE.npz")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if tuple(images.shape[1:]) != dims:
        raise ConfigError(f"calibration images are {images.shape[1:]}, the model takes {dims}")
    return np.ascontiguousarray(images, dtype=np.float32), source


def calibrate_model(
    repository: Path,
    name: str,
    version: int | None = None,
    fpr: float = 0.05,
    data: Path | None = None,
    device: str = "auto",
    batch_size: int = 250,
) -> tuple[Calibration, list[Path]]:
    config = ModelRepository(repository).config(name)
    policy = from_config(config)
    if policy is None or config.backend != "pytorch":
        raise ConfigError(f"model {name!r} does not screen its inputs (parameter screening: on)")
    version = version or max(config.versions)
    folder = config.version_path(version)
    target = torch.device(pick_device(device))
    backend = TorchBackend(config, folder, str(target), policy=None)
    job = ScreenedClassifier(backend.module, policy.detectors, policy.squeeze, None, target)
    images, source = clean_images(data, config.inputs[0].dims)
    results = [
        job(torch.from_numpy(images[i : i + batch_size]).to(target))
        for i in range(0, len(images), batch_size)
    ]
    scores = [r.scores.cpu().numpy() for r in results]
    calibration = fit(
        np.concatenate(scores),
        policy.detectors,
        policy.squeeze.bits,
        policy.squeeze.medians,
        fpr,
        meta={"model": name, "version": version, "data": source, "device": str(target)},
    )
    embeddings = [r.embedding for r in results]
    profile = build_profile(
        torch.from_numpy(images),
        torch.cat([r.probs for r in results]).cpu(),
        torch.cat(embeddings).cpu() if all(e is not None for e in embeddings) else None,
        flag_rate=calibration.target_fpr,
        meta={"model": name, "version": version, "data": source},
    )
    return calibration, [calibration.save(folder), profile.save(folder)]
