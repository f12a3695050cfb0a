"""Adversarial evaluation of Bastion's screening: white-box ART attacks and an adaptive attack.

Run with ``python -m bastion.benchmarks.adversarial.evaluate`` (or ``bastion evaluate``);
results land in ``benchmarks/results/adversarial/``.
"""
