"""``bastion serve`` has one flag per setting, and each flag reaches the settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bastion.gateway import server
from bastion.gateway.cli import app
from bastion.gateway.settings import Settings

runner = CliRunner()


def test_every_setting_is_a_serve_flag_with_help() -> None:
    result = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in result.output, flag
        assert f"BASTION_{name.upper()}" in result.output.replace("\n", " ")
    assert "<bool>" not in result.output and "``" not in result.output


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    seen: list[Settings] = []
    monkeypatch.setattr(server, "serve", seen.append)
    monkeypatch.delenv("BASTION_GRPC_PORT", raising=False)
    return seen


def test_flags_reach_the_settings_and_win_over_the_environment(
    captured: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_MAX_QUEUE_SIZE", "3")
    args = [
        "serve",
        "--max-queue-size",
        "7",
        "--no-defence",
        "--grpc-port",
        "9101",
        "--grpc-infer-response-compression",
        "gzip",
        "--fingerprint-salt",
        "5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert settings.max_queue_size == 7 and settings.defence is False
    assert settings.grpc_port == 9101 and settings.grpc_infer_response_compression == "gzip"
    assert settings.fingerprint_salt == 5
    assert runner.invoke(app, ["serve"]).exit_code == 0
    assert captured[1].max_queue_size == 3 and captured[1].defence is True  # env, then default


def test_a_bad_flag_value_is_a_usage_error_in_flag_words(captured: list[Settings]) -> None:
    choice = runner.invoke(app, ["serve", "--device", "tpu"])
    assert choice.exit_code == 2 and "tpu" in choice.output
    bound = runner.invoke(app, ["serve", "--grpc-port", "70000"])
    assert bound.exit_code == 2 and "--grpc-port" in bound.output
    assert not captured


def test_a_port_in_use_is_one_clear_line() -> None:
    import socket

    from bastion.gateway.server import PortInUse, check_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match="--grpc-port"):
            check_ports(Settings(port=0, grpc_port=port))
        result = runner.invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2 and "cannot bind HTTP" in result.output
    assert "Traceback" not in result.output
