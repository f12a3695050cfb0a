"""Benchmarks: the bare model's ceiling and Bastion side by side with its peers under load."""
