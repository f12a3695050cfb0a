"""An optional compiler for the defence's per-item loops (numba, the ``fast`` extra).

The loops are written as plain Python over arrays; with numba installed they are compiled to
machine code (cached on disk beside the module), without it they run as written. Either way
the plain function stays the reference the tests compare the compiled one against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:  # pip install 'bastion-gateway[fast]'
    from numba import njit
except ImportError:  # pragma: no cover - depends on the install
    njit = None

JIT = njit is not None


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """The numba-compiled twin of ``function`` (cached on disk), or ``function`` itself."""
    return njit(cache=True, nogil=True)(function) if JIT else function
