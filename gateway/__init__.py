"""Bastion: a Triton-compatible inference gateway."""

__version__ = "0.1.0"
