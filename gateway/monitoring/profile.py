"""``bastion profile``: the drift reference profile of any torch model, screened or not.

``bastion calibrate`` writes the profile of a screened model along with its thresholds; this
builds it alone, from the same clean images, for a model that does not screen its inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bastion.gateway.backends.torch_backend import TorchBackend
from bastion.gateway.monitoring.reference import build_profile
from bastion.gateway.registry import pick_device
from bastion.gateway.repository import ConfigError, ModelRepository
from bastion.gateway.screening.calibrate import clean_images
from bastion.gateway.screening.calibration import Calibration
from bastion.gateway.screening.policy import from_config


def profile_model(
    repository: Path,
    name: str,
    version: int | None = None,
    data: Path | None = None,
    device: str = "auto",
    batch_size: int = 250,
) -> Path:
    config = ModelRepository(repository).config(name)
    if config.backend != "pytorch":
        raise ConfigError(f"model {name!r}: drift monitoring needs the pytorch backend")
    version = version or max(config.versions)
    folder = config.version_path(version)
    target = torch.device(pick_device(device))
    module = TorchBackend(config, folder, str(target), policy=None).module
    images, _, source = clean_images(data, config.inputs[0].dims)
    probs, embeddings = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[i : i + batch_size]).to(target)
            _, p, e = module.forward_embedded(batch)
            probs.append(p.cpu())
            embeddings.append(None if e is None else e.cpu())
    policy = from_config(config)
    calibrated = policy is not None and Calibration.load(folder) is not None
    profile = build_profile(
        torch.from_numpy(images),
        torch.cat(probs),
        None if any(e is None for e in embeddings) else torch.cat(embeddings),
        flag_rate=policy.block_fpr if policy is not None and calibrated else None,
        meta={"model": name, "version": version, "data": source},
    )
    return profile.save(folder)
