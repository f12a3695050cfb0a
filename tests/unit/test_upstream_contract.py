"""A remote Triton model's parameters, its upstream's errors as protocol statuses, and the
check that the upstream's model can take the config's batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.gateway.backends.triton_upstream import (
    BadGateway,
    check_compatible,
    response_cap,
    upstream_error,
    upstream_spec,
)
from bastion.gateway.errors import DeadlineExceeded, InvalidInput, Unavailable, Unsupported
from bastion.gateway.repository import ConfigError, ModelConfig, read_config


def config(tmp_path: Path, **params: str) -> ModelConfig:
    folder = tmp_path / "remote"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    lines = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    (folder / "config.pbtxt").write_text(
        'name: "remote"\nbackend: "triton"\nmax_batch_size: 16\n'
        'input [ { name: "images" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] } ]\n'
        'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] } ]\n' + lines
    )
    return read_config(folder)


def test_the_upstream_url_names_protocol_address_and_the_rest_defaults(tmp_path: Path) -> None:
    spec = upstream_spec(config(tmp_path, upstream_url="grpc://10.0.0.7:8001"), 10.0, 16, 2.0)
    assert (spec.protocol, spec.address, spec.model, spec.version) == (
        "grpc",
        "10.0.0.7:8001",
        "remote",
        "",
    )
    assert (spec.timeout_s, spec.connections) == (10.0, 16)
    spec = upstream_spec(
        config(
            tmp_path,
            upstream_url="http://[::1]:8000/",
            upstream_model="resnet",
            upstream_version="3",
            upstream_timeout_s="0.5",
            upstream_connections="4",
        ),
        10.0,
        16,
        2.0,
    )
    assert (spec.address, spec.model, spec.version, spec.timeout_s, spec.connections) == (
        "[::1]:8000",
        "resnet",
        "3",
        0.5,
        4,
    )


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"upstream_url": "https://triton:8000"},
        {"upstream_url": "grpc://triton"},
        {"upstream_url": "grpc://triton:99999"},
        {"upstream_url": "http://user:pw@triton:8000"},
        {"upstream_url": "http://triton:8000/v2/models/x"},
        {"upstream_url": "grpc://triton:8001", "upstream_version": "latest"},
        {"upstream_url": "grpc://triton:8001", "upstream_version": "²"},
        {"upstream_url": "grpc://triton:8001", "upstream_timeout_s": "0"},
        {"upstream_url": "grpc://triton:8001", "upstream_timeout_s": "nan"},
        {"upstream_url": "grpc://triton:8001", "upstream_connections": "many"},
    ],
    ids=lambda params: ",".join(f"{k}={v}" for k, v in params.items()) or "none",
)
def test_a_malformed_upstream_is_a_config_error_that_does_not_echo_it(
    tmp_path: Path, params: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as err:
        upstream_spec(config(tmp_path, **params), 10.0, 16, 2.0)
    assert "pw" not in str(err.value)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidInput),
        ("400", InvalidInput),
        ("StatusCode.UNAVAILABLE", Unavailable),
        ("StatusCode.NOT_FOUND", Unavailable),
        ("503", Unavailable),
        ("StatusCode.RESOURCE_EXHAUSTED", Unavailable),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceeded),
        ("504", DeadlineExceeded),
        ("StatusCode.UNIMPLEMENTED", Unsupported),
        ("StatusCode.INTERNAL", BadGateway),
        ("500", BadGateway),
        (None, BadGateway),
    ],
)
def test_upstream_errors_become_protocol_errors(status: str | None, kind: type) -> None:
    error = upstream_error(status, "/srv/triton/models/x/model.py line 3: boom")
    assert type(error) is kind
    # the upstream's text may name its model, hosts and files: logged, never echoed
    assert "/srv" not in error.message and "boom" not in error.message
    assert BadGateway("x").status == 502


def test_an_answer_is_bounded_by_what_the_largest_batch_of_outputs_can_take(
    tmp_path: Path,
) -> None:
    fixed = config(tmp_path)  # 16 rows of 10 FP32: 640 bytes, four times, plus framing
    assert response_cap(fixed, 64 << 20) == 4 * 16 * 40 + (1 << 20)
    assert response_cap(fixed, 1000) == 1000  # never above the setting


METADATA = {
    "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
    ],
}


def test_an_upstream_model_with_the_configs_tensors_and_room_for_its_batches_is_accepted(
    tmp_path: Path,
) -> None:
    check_compatible(config(tmp_path), METADATA, 64)
    variable = {**METADATA, "inputs": [{**METADATA["inputs"][0], "shape": [-1, 1, -1, -1]}]}
    check_compatible(config(tmp_path), variable, 16)  # -1: the upstream takes any size


@pytest.mark.parametrize(
    ("metadata", "max_batch", "says"),
    [
        (METADATA, 8, "max_batch_size is 8"),
        (METADATA, 0, "max_batch_size is 0"),
        ({**METADATA, "inputs": []}, 64, "no input 'images'"),
        ({**METADATA, "outputs": METADATA["outputs"][1:]}, 64, "no output 'probabilities'"),
        (
            {**METADATA, "inputs": [{**METADATA["inputs"][0], "datatype": "FP16"}]},
            64,
            "FP16",
        ),
        (
            {**METADATA, "inputs": [{**METADATA["inputs"][0], "shape": [-1, 3, 28, 28]}]},
            64,
            "[3, 28, 28]",
        ),
    ],
)
def test_an_upstream_model_that_cannot_serve_the_config_is_refused(
    tmp_path: Path, metadata: dict, max_batch: int, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_compatible(config(tmp_path), metadata, max_batch)
    assert says in str(err.value)
