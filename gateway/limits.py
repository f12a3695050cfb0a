"""What one model version can take, derived from its config and the settings.

The global limits (``max_body_bytes``, ``max_json_bytes``, ``max_image_bytes``) are for the
largest model a gateway might serve; for most models the largest *legitimate* request is far
smaller, and everything past it is work an attacker makes the gateway do for nothing. So each
version gets bounds of its own: the most elements per input (its max batch size times a row),
the most bytes an encoded image of its input size can need, and the most bytes a whole request
can need in its largest encoding (JSON text, or base64 images in JSON). A body, an inflated body
or a JSON part past the version's bound is refused (413) before it is read, inflated or parsed.
Models with a variable dimension or a BYTES input keep the global limits. A model's config can
set its own bounds (parameters ``max_request_bytes``, ``max_image_bytes``; bytes), which replace
the derived ones but never exceed the global settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bastion.gateway.inputs import ImageLimits
from bastion.gateway.protocol.bounds import InputBound, Limits
from bastion.gateway.repository import ConfigError, ModelConfig
from bastion.gateway.settings import Settings

JSON_CHARS_PER_ELEMENT = 32  # "-1.2345678901234567e-308, " is 26; the rest for indentation
IMAGE_SLACK_BYTES = 16 << 10  # headers and metadata chunks of a PNG/JPEG beyond its pixels
REQUEST_SLACK_BYTES = 64 << 10  # the JSON around the tensors: names, shapes, parameters, id
JSON_TOKEN_SLACK = 16_384  # commas and brackets of that JSON around the tensors


@dataclass(frozen=True, slots=True)
class ModelLimits:
    codec: Limits
    images: ImageLimits


def model_limits(config: ModelConfig, settings: Settings) -> ModelLimits:
    """Raises ``ConfigError`` for a bound parameter that is not a positive integer."""
    image_model = config.parameters.get("input_range") == "0,1"
    bounds: dict[str, InputBound] = {}
    request_bytes: int | None = 0
    image_bytes = settings.max_image_bytes
    for spec in config.inputs:
        row = math.prod(spec.dims) if all(d > 0 for d in spec.dims) else 0
        rows = config.max_batch_size
        bounds[spec.name] = InputBound(spec.datatype, rows, rows * row)
        if row == 0 or spec.datatype == "BYTES" or request_bytes is None:
            request_bytes = None  # element sizes unbounded: only the global limits hold
            continue
        need = rows * row * JSON_CHARS_PER_ELEMENT
        if image_model and len(spec.dims) == 3:
            # an uncompressed PNG is about its pixel bytes; twice that, plus metadata, is ample
            image_bytes = min(image_bytes, IMAGE_SLACK_BYTES + 2 * row)
            image_bytes = min(
                settings.max_image_bytes, _parameter(config, "max_image_bytes", image_bytes)
            )
            need = max(need, rows * (4 * math.ceil(image_bytes / 3) + 8))  # base64 + prefix
        request_bytes += need
    body = settings.max_body_bytes
    if request_bytes is not None:
        body = min(body, request_bytes + REQUEST_SLACK_BYTES)
    body = min(settings.max_body_bytes, _parameter(config, "max_request_bytes", body))
    json_bytes = min(settings.max_json_bytes, body)
    # commas and brackets a legitimate JSON request needs: one per element (flat or nested
    # data, a data: URI's comma), plus the JSON around the tensors
    tokens = 0
    if request_bytes is not None:
        tokens = 2 * sum(b.max_elements for b in bounds.values()) + JSON_TOKEN_SLACK
    codec = Limits(
        body, json_bytes, settings.max_elements, settings.max_request_id_chars, bounds, tokens
    )
    return ModelLimits(codec, ImageLimits(image_bytes, settings.max_image_pixels))


def _parameter(config: ModelConfig, name: str, default: int) -> int:
    text = config.parameters.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"model {config.name!r}: parameter {name} must be a positive integer")
    return int(text)
