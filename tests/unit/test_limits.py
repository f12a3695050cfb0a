"""Per-model bounds: derived from the config, overridable per model, never past the settings."""

from __future__ import annotations

import dataclasses

import pytest

from bastion.gateway.limits import model_limits
from bastion.gateway.repository import ConfigError, ModelRepository
from bastion.gateway.settings import DEFAULT_REPOSITORY, Settings


@pytest.fixture
def digits():  # type: ignore[no-untyped-def]
    return ModelRepository(DEFAULT_REPOSITORY).config("digits")


def test_the_digits_bounds_fit_its_largest_legitimate_request(digits) -> None:  # type: ignore[no-untyped-def]
    limits = model_limits(digits, Settings())
    assert limits.codec.inputs["images"].max_rows == 64
    assert limits.codec.inputs["images"].max_elements == 64 * 784
    # 64 images as JSON numbers, 32 characters each, plus the JSON around them
    assert limits.codec.max_body_bytes >= 64 * 784 * 25
    assert limits.codec.max_body_bytes < 2 << 20  # far below the 64 MiB global limit
    assert 2 * 784 < limits.images.max_bytes < 64 << 10
    assert limits.codec.max_json_bytes == limits.codec.max_body_bytes


def test_config_parameters_replace_the_derived_bounds_but_not_the_settings(digits) -> None:  # type: ignore[no-untyped-def]
    params = {**digits.parameters, "max_request_bytes": "9000000", "max_image_bytes": "200000"}
    raised = dataclasses.replace(digits, parameters=params)
    limits = model_limits(raised, Settings())
    assert limits.codec.max_body_bytes == 9_000_000 and limits.images.max_bytes == 200_000
    capped = model_limits(raised, Settings(max_body_bytes=5_000_000, max_image_bytes=100_000))
    assert capped.codec.max_body_bytes == 5_000_000 and capped.images.max_bytes == 100_000


@pytest.mark.parametrize("value", ["0", "-1", "1e6", "²", "lots"])
def test_a_bound_parameter_that_is_not_a_positive_integer_is_a_config_error(
    digits, value: str  # type: ignore[no-untyped-def]
) -> None:
    bad = dataclasses.replace(digits, parameters={**digits.parameters, "max_request_bytes": value})
    with pytest.raises(ConfigError, match="max_request_bytes"):
        model_limits(bad, Settings())
