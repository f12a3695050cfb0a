"""Bastion's one import namespace: ``bastion.gateway``, ``bastion.models``, ``bastion.kernels``
and ``bastion.benchmarks``.

An installed distribution holds them under ``site-packages/bastion/`` (``setup.py`` maps the
repository's top-level folders there), so no generic name such as ``models`` lands at the top
of site-packages. In a checkout this file stands in for that layout: the namespace's
subpackages are the repository's own folders, one level up.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]
