"""The model repository: Triton's config format, versions and policies, and bad configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bastion.gateway.backends import load_backend
from bastion.gateway.errors import NotFound
from bastion.gateway.registry import run_batch
from bastion.gateway.repository import ConfigError, ModelRepository, parse_version, read_config

BENCH_REPOSITORY = Path(__file__).parents[2] / "benchmarks" / "repository"


def test_bundled_config_is_read_with_tritons_schema(repository: Path) -> None:
    config = ModelRepository(repository).config("digits")
    assert config.backend == "pytorch" and config.max_batch_size == 64
    inputs = [(t.name, t.datatype, t.dims) for t in config.inputs]
    assert inputs == [("images", "FP32", (1, 28, 28))]
    assert config.outputs[1].labels == tuple(str(i) for i in range(10))
    assert config.batching.preferred_batch_sizes == (16, 32, 64)
    assert config.batching.max_queue_delay_us == 1000
    assert config.raw["input"][0]["dims"] == [1, 28, 28]  # numbers, as Triton's /config writes


def test_version_policy_chooses_the_versions_served(repository: Path) -> None:
    folder = repository / "digits"
    for version in (2, 5):
        shutil.copytree(folder / "1", folder / str(version))
    assert read_config(folder).versions == (5,)
    config_file = folder / "config.pbtxt"
    text = config_file.read_text()
    config_file.write_text(text.replace("latest { num_versions: 1 }", "all { }"))
    assert read_config(folder).versions == (1, 2, 5)
    config_file.write_text(text.replace("latest { num_versions: 1 }", "specific { versions: [2] }"))
    assert read_config(folder).versions == (2,)


def test_json_config_works_like_pbtxt(repository: Path) -> None:
    folder = repository / "digits_onnx"
    (folder / "config.pbtxt").unlink()
    (folder / "config.json").write_text(
        '{"name": "digits_onnx", "backend": "onnxruntime", "max_batch_size": 8,'
        ' "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}],'
        ' "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]}'
    )
    config = read_config(folder)
    assert config.max_batch_size == 8 and config.outputs[0].name == "logits"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name: "digits"', 'name: "other"'), "folder is"),
        (lambda t: t.replace("TYPE_FP32", "TYPE_BF16", 1), "unsupported data type"),
        (lambda t: t.replace("max_batch_size", "max_batch_sighs"), "invalid model configuration"),
        (lambda t: t.replace('"labels.txt"', '"../../etc/passwd"', 1), "outside the model"),
    ],
    ids=["name-mismatch", "unsupported-dtype", "syntax", "label-path-escape"],
)
def test_bad_config_is_a_clear_config_error(repository: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = repository / "digits" / "config.pbtxt"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        read_config(repository / "digits")


def test_unknown_or_unsafe_model_names_are_not_found(repository: Path) -> None:
    repo = ModelRepository(repository)
    assert repo.names() == ["digits", "digits_onnx"]
    for name in ("nope", "../digits", ".hidden"):
        with pytest.raises(NotFound):
            repo.config(name)


def test_version_segment_must_be_a_number() -> None:
    assert parse_version(None) is None and parse_version("") is None and parse_version("3") == 3
    with pytest.raises(Exception, match="positive integer"):
        parse_version("-1")


def test_benchmark_resnet_builds_the_same_weights_from_its_seed() -> None:
    config = read_config(BENCH_REPOSITORY / "resnet18")
    batch = {"images": np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)}
    first, _ = run_batch(load_backend(config, 1, "cpu", threads=1), [batch])
    second, _ = run_batch(load_backend(config, 1, "cpu", threads=1), [batch])
    assert first["probabilities"].shape == (2, 1000)
    np.testing.assert_allclose(first["logits"], second["logits"], rtol=1e-4, atol=1e-4)
    resnet50 = read_config(BENCH_REPOSITORY / "resnet50")
    assert load_backend(resnet50, 1, "cpu", threads=1).device == "cpu"
