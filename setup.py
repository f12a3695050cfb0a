"""Installs the repository's top-level folders under one import namespace, ``bastion``.

``gateway/`` becomes ``bastion.gateway``, and so on, so an installed Bastion puts no generic
top-level package (``models``, ``kernels``, ``benchmarks``) into site-packages, where it would
collide with other projects'. Everything else is declared in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

FOLDERS = ("gateway", "models", "kernels", "benchmarks")

setup(
    packages=[
        f"bastion.{name}"
        for folder in FOLDERS
        for name in find_packages(include=[folder, f"{folder}.*"])
    ],
    package_dir={f"bastion.{folder}": folder for folder in FOLDERS},
)
