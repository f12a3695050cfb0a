"""``bastion profile``: the reference profile of an unscreened torch model, from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bastion.gateway.cli import app
from bastion.gateway.monitoring.profile import profile_model
from bastion.gateway.monitoring.reference import FILENAME, ReferenceProfile
from bastion.gateway.repository import ConfigError
from bastion.gateway.settings import DEFAULT_REPOSITORY


def test_profile_of_an_unscreened_model_matches_calibrations_but_has_no_flag_rate(
    repository: Path,
) -> None:
    config = repository / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "on"', 'string_value: "off"'))
    (repository / "digits" / "1" / FILENAME).unlink()
    run = CliRunner().invoke(
        app, ["profile", "digits", "--model-repository", str(repository), "--device", "cpu"]
    )
    assert run.exit_code == 0, run.output
    assert f"wrote {repository / 'digits' / '1' / FILENAME}" in run.output
    made = ReferenceProfile.load(repository / "digits" / "1")
    committed = ReferenceProfile.load(DEFAULT_REPOSITORY / "digits" / "1")
    assert made is not None and committed is not None
    torch.testing.assert_close(made.edges, committed.edges, atol=1e-5, rtol=0)
    torch.testing.assert_close(made.classes, committed.classes)
    torch.testing.assert_close(made.embeddings, committed.embeddings, atol=1e-3, rtol=1e-3)
    assert made.flag_rate is None and committed.flag_rate == 0.005


def test_profile_refuses_a_model_without_the_torch_backend(repository: Path) -> None:
    with pytest.raises(ConfigError, match="needs the pytorch backend"):
        profile_model(repository, "digits_onnx", device="cpu")
