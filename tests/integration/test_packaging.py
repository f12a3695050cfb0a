"""The built wheel installs everything under one ``bastion`` namespace and nothing else.

Builds a wheel from a copy of the checkout's files (tracked and untracked-but-not-ignored, as
``git`` lists them), installs it into an empty target folder and imports from there with the
checkout off ``sys.path``, so a module missing from the wheel, package data left out, or a
generic top-level package such as ``models`` fails here rather than on a user's machine.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("gateway", "models", "kernels", "benchmarks")

pytestmark = pytest.mark.slow


def _checkout_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in _checkout_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        timeout=240,
    )
    (built,) = out.glob("*.whl")
    return built


def _repository_packages() -> set[str]:
    return {
        "bastion/" + str(init.parent.relative_to(ROOT))
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
        if "results" not in init.parts
    }


def test_wheel_puts_only_the_bastion_namespace_at_the_top(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"bastion"}
    assert "bastion/__init__.py" not in names, "the checkout shim must not ship"


def test_wheel_holds_every_package_and_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = {pkg for pkg in _repository_packages() if f"{pkg}/__init__.py" not in names}
    assert not missing
    assert any(
        n.startswith("bastion/models/repository/") and n.endswith("config.pbtxt") for n in names
    )
    assert any(n.startswith("bastion/models/samples/") and n.endswith(".npz") for n in names)
    assert any(n.startswith("bastion/gateway/monitoring/static/") for n in names)
    assert any(n.startswith("bastion/gateway/incidents/") and n.endswith(".html") for n in names)
    assert any(
        n.startswith("bastion/gateway/state/migrations/") and n.endswith(".sql") for n in names
    )


def test_installed_wheel_imports_and_runs_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=120,
    )
    # -S skips site's .pth files, so a development install's editable finder cannot answer
    # for ``bastion``; the dependencies still come from this interpreter's site-packages.
    path = [str(target), *site.getsitepackages()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    probe = (
        "import importlib.util, bastion.models, bastion.gateway.cli;"
        "from bastion.models import digits, samples;"
        "print(bastion.models.__file__);"
        "print(importlib.util.find_spec('models'))"
    )
    shown = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    assert shown[0].startswith(str(target))
    assert shown[1] == "None"
    helped = subprocess.run(
        [sys.executable, "-S", "-m", "bastion.gateway", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout
