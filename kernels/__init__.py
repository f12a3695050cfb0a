"""Fused GPU kernels (Triton language) and their pure-torch CPU references."""
