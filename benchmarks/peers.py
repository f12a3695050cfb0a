"""PyTriton's own virtual environment, made once and kept outside the checkout.

PyTriton pins numpy < 2 and wants a torch of its own; installing it beside Bastion would change the
environment being measured, so it lives in ``~/.cache/bastion/pytriton-venv`` (override with
``BASTION_PEERS_DIR``). The torch wheel (2.13.0, CPU) comes from this machine's wheel folder; no
torchvision. A marker file keyed by the requirement list rebuilds the environment when it changes.

Run ``python -m bastion.benchmarks.peers`` to build it ahead of a benchmark (about 40 s, 1.2 GB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PYTRITON_REQUIREMENTS = ("torch==2.13.0", "nvidia-pytriton==0.7.0", "safetensors", "numpy")
INSTALL_TIMEOUT_S = 900
CHECK = "import numpy, pytriton, safetensors, torch; print(torch.__version__)"


def peers_dir() -> Path:
    """Where peer environments live, outside the repository."""
    default = Path.home() / ".cache" / "bastion"
    return Path(os.environ.get("BASTION_PEERS_DIR", default))


def _key() -> str:
    return hashlib.sha256(" ".join(PYTRITON_REQUIREMENTS).encode()).hexdigest()[:16]


def _run(command: list[str], timeout_s: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{tail}")
    return done.stdout


def ensure_pytriton_venv() -> Path:
    """The Python of a working PyTriton environment, building it if missing or stale."""
    venv = peers_dir() / "pytriton-venv"
    python = venv / "bin" / "python"
    marker = venv / ".bastion-key"
    if marker.exists() and marker.read_text().strip() == _key() and python.exists():
        return python
    print(f"peers: building PyTriton environment in {venv} (about a minute)", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], timeout_s=120)
    _run(
        [str(python), "-m", "pip", "install", "-q", *PYTRITON_REQUIREMENTS],
        timeout_s=INSTALL_TIMEOUT_S,
    )
    _run([str(python), "-c", CHECK], timeout_s=120)
    marker.write_text(_key())
    return python


def library_dir(python: Path) -> str:
    """``LIBDIR`` of an interpreter: where its own ``libpython`` lives.

    Triton's Python-backend stub links ``libpython3.x.so``; without this on ``LD_LIBRARY_PATH`` it
    loads the system's older copy and the model fails to load with
    ``'_thread.RLock' object has no attribute '_recursion_count'`` (pytriton#51).
    """
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    return _run([str(python), "-c", code], timeout_s=60).strip()


def pytriton_env(python: Path) -> dict[str, str]:
    """Environment additions that make PyTriton's model load on this machine."""
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    libdir = library_dir(python)
    return {"LD_LIBRARY_PATH": f"{libdir}:{inherited}" if inherited else libdir}


def installed_version(python: Path, distribution: str) -> str:
    """A distribution's version inside another environment, for the results' provenance."""
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return _run([str(python), "-c", code], timeout_s=60).strip()


if __name__ == "__main__":
    built = ensure_pytriton_venv()
    print(built)
    print("nvidia-pytriton", installed_version(built, "nvidia-pytriton"))
    print("LD_LIBRARY_PATH", pytriton_env(built)["LD_LIBRARY_PATH"])
