"""Loads the bundled DigitsNet weights without executing anything from the repository.

Weights are stored as safetensors (plain tensors, no pickle), so loading a model repository can
never run code; ``strict=True`` makes an architecture/weights mismatch fail loudly instead of
silently serving a half-initialised network.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from bastion.models.digits import DigitsNet

DEFAULT_REPOSITORY = Path(__file__).parent / "repository"
DIGITS_MODEL = "digits"
DIGITS_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def digits_weights_path(
    repository: Path = DEFAULT_REPOSITORY, version: int = DIGITS_VERSION
) -> Path:
    """Where a repository keeps the DigitsNet state dict of a given version."""
    return Path(repository) / DIGITS_MODEL / str(version) / WEIGHTS_FILE


def load_digits(repository: Path = DEFAULT_REPOSITORY, version: int = DIGITS_VERSION) -> nn.Module:
    """A trained DigitsNet in eval mode, on the CPU."""
    net = DigitsNet()
    net.load_state_dict(load_file(digits_weights_path(repository, version)), strict=True)
    return net.eval()
