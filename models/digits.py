"""DigitsNet: the small MNIST classifier Bastion serves as its demo and benchmark model.

It takes raw float32 pixels in [0, 1] and normalises them itself, so the gateway, its screening and
the ONNX export all feed the network the very pixels a client sent. It has no batch normalisation,
so ``eval()`` is a pure function of the input (dropout off) and batch composition cannot change a
prediction. 0.42 M parameters; about 4.2 M multiply-adds (8.5 MFLOPs) per image.
"""

from __future__ import annotations

import torch
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DigitsNet(nn.Module):
    """conv(1→32, 3x3) → pool → conv(32→64, 3x3) → pool → fc(3136→128) → fc(128→10)."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for float32 pixels (N, 1, 28, 28) in [0, 1]."""
        return self.classifier(self.features((images - self.mean) / self.std))
