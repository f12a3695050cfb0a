"""Architectures the torch backend can build by name.

A model repository names its architecture in ``config.pbtxt``
(``parameters { key: "architecture" }``) and ships only weights (safetensors), so nothing executable
is ever loaded from the repository. Every architecture takes float32 pixels in [0, 1] (N, C, H, W)
and returns logits; normalisation lives inside the network so that screening squeezes the same
pixels the client sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from bastion.models.digits import DigitsNet


def _resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import resnet18, resnet50

        net = (resnet18 if depth == 18 else resnet50)(weights=None, num_classes=1000)
        return nn.Sequential(_ImageNetNormalize(), net)

    return build


class _ImageNetNormalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits_cnn": DigitsNet,
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
}


class ServedClassifier(nn.Module):
    """The graph a classifier is served as: logits and their softmax, in one pass.

    ``channels_last`` stores the weights and feeds the input as NHWC, which lets oneDNN (CPU) and
    cuDNN (GPU) pick their fast convolution kernels: for the digits CNN on the CPU about 2x per
    image at batch 32 and 3x at batch 1 (benchmarks/RESULTS.md). The outputs are the same.
    """

    def __init__(self, net: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.net = net
        self.channels_last = channels_last
        if channels_last:
            self.net = net.to(memory_format=torch.channels_last)
        self._captured = threading.local()
        head = _last_linear(net)
        self.embedding_width = head.in_features if head is not None else None
        if head is not None:
            head.register_forward_pre_hook(self._capture)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.net(images)
        return logits, torch.softmax(logits, dim=1)

    def forward_embedded(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits, probabilities and the penultimate embedding (the head's input), in one pass.

        The embedding is caught by a hook on the network's last ``Linear`` and kept per thread,
        so batches running concurrently on other threads cannot swap it.
        """
        self._captured.on = True
        try:
            logits, probs = self(images)
            embedding = getattr(self._captured, "value", None)
        finally:
            self._captured.on = False
            self._captured.value = None
        return logits, probs, embedding

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if getattr(self._captured, "on", False):
            self._captured.value = args[0]


def _last_linear(net: nn.Module) -> nn.Linear | None:
    """The classification head of every zoo architecture: its last ``Linear`` module."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def build(name: str) -> nn.Module:
    """Builds an untrained network of a registered architecture."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return factory()
