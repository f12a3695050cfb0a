"""Broken or edited repositories: a broken screening file takes down only its own model, and a
reload applies config edits or, when they do not load, keeps the old versions serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.gateway.errors import NotFound, Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.registry import ModelRegistry
from bastion.gateway.repository import ModelRepository
from bastion.gateway.settings import Settings


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("mahalanobis.safetensors", b"version https://git-lfs.github.com/spec/v1\n"),
        ("mahalanobis.safetensors", b""),
        ("calibration.json", b"null"),
        ("calibration.json", b'{"format": 2, "samples": "1000"}'),
    ],
    ids=["lfs-pointer", "empty-gaussian", "json-null", "half-a-calibration"],
)
def test_a_broken_screening_file_leaves_the_other_models_serving(
    repository: Path, name: str, content: bytes
) -> None:
    (repository / "digits" / "1" / name).write_bytes(content)
    registry = ModelRegistry(
        ModelRepository(repository),
        Settings(model_repository=repository, torch_threads=1),
        Metrics(),
    )

    async def scenario() -> None:
        await registry.load_all()
        try:
            ready = {m.config.name for m in registry.loaded()}
            assert "digits" not in ready and "digits_onnx" in ready
            (entry,) = [e for e in registry.index() if e["name"] == "digits"]
            assert entry["state"] == "UNAVAILABLE" and "calibrat" in entry["reason"]
        finally:
            await registry.close()

    asyncio.run(scenario())


def test_a_reload_applies_config_edits_and_a_bad_edit_keeps_the_old_version_serving(
    repository: Path,
) -> None:
    config = repository / "digits" / "config.pbtxt"
    registry = ModelRegistry(
        ModelRepository(repository),
        Settings(model_repository=repository, torch_threads=1),
        Metrics(),
    )

    def targets() -> dict[str, float]:
        return registry.get("digits").backend.screening.targets

    async def scenario() -> None:
        await registry.load_all()
        try:
            assert targets()["suspicious"] == 0.05
            text = config.read_text()
            config.write_text(text.replace('string_value: "0.05"', 'string_value: "0.1"'))
            await registry.load("digits")
            assert targets()["suspicious"] == 0.1  # a tier moved without recalibrating
            config.write_text(text.replace('string_value: "0.05"', 'string_value: "1.5"'))
            with pytest.raises(Unavailable, match="screening_review_fpr"):
                await registry.load("digits")
            assert targets()["suspicious"] == 0.1  # the previous build still serves
            with pytest.raises(NotFound):  # a name the repository lacks is the caller's 404
                await registry.load("no_such_model")
        finally:
            await registry.close()

    asyncio.run(scenario())
