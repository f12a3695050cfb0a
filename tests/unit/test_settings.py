"""Settings come from flags, then BASTION_* environment variables, then a config file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bastion.gateway.settings import DEFAULT_REPOSITORY, Settings


def test_defaults_serve_the_bundled_repository_on_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BASTION_CONFIG_FILE", raising=False)
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.model_repository == DEFAULT_REPOSITORY
    assert (DEFAULT_REPOSITORY / "digits" / "config.pbtxt").is_file()


def test_flags_beat_environment_which_beats_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nport = 9001\nmax_body_bytes = 1234\nadmin_token = "file"\n')
    monkeypatch.setenv("BASTION_CONFIG_FILE", str(config))
    monkeypatch.setenv("BASTION_PORT", "9002")
    assert Settings().max_body_bytes == 1234
    assert Settings().port == 9002
    assert Settings(port=9003).port == 9003
    json_config = tmp_path / "bastion.json"
    json_config.write_text('{"admin_token": "json"}')
    monkeypatch.setenv("BASTION_CONFIG_FILE", str(json_config))
    assert Settings().admin_token == "json"


def test_invalid_or_unknown_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_MAX_BODY_BYTES", "-1")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValidationError):
        Settings(no_such_knob=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"drift_hop_images": 100, "drift_min_images": 400}, "no window would ever be scored"),
        ({"drift_mmd_permutations": 200}, "MMD could never raise an alarm"),
        ({"drift_embedding_sample": 20, "drift_window_hops": 3}, "under 20 embeddings"),
    ],
)
def test_drift_settings_under_which_no_alarm_could_fire_are_refused(
    knobs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**knobs)
    Settings(drift_mmd_permutations=200, drift_mmd_alpha=0.01)  # 1/201 <= 0.01: fine


def test_the_client_id_header_is_matched_in_lower_case() -> None:
    from bastion.gateway.settings import Settings

    assert Settings(client_id_header="X-Tenant").client_id_header == "x-tenant"
    with pytest.raises(ValueError, match="not a header name"):
        Settings(client_id_header="tenant 1")


def test_a_misspelt_bastion_variable_is_reported() -> None:
    from bastion.gateway.settings import unknown_environment

    environ = {"BASTION_MAX_BODY_BYTE": "5", "BASTION_MAX_BODY_BYTES": "5", "BASTION_URL": "x"}
    assert unknown_environment(environ) == ["BASTION_MAX_BODY_BYTE"]
