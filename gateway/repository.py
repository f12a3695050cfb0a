"""A model repository laid out like Triton's: ``<repo>/<model>/config.pbtxt`` and
``<repo>/<model>/<version>/`` folders holding the weights.

``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (shipped in tritonclient), so
an existing Triton configuration reads unchanged; ``config.json`` in the same schema works too.
Adding a model or a version is adding a folder: no code changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from bastion.gateway.errors import InvalidInput, NotFound
from bastion.gateway.protocol.dtypes import BY_CONFIG

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_MAX_QUEUE_SIZE = 1024
# ASCII digits only: str.isdigit() accepts "²", which int() then refuses
_VERSION = re.compile(r"[0-9]{1,18}")


class ConfigError(ValueError):
    """A model's configuration cannot be served."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # v2 name
    dims: tuple[int, ...]  # without the batch dimension; -1 is variable
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    max_queue_size: int
    default_timeout_us: int
    allow_timeout_override: bool


@dataclass(frozen=True)
class ModelConfig:
    """What a model folder declares; ``raw`` is Triton's JSON form, served at ``/config``."""

    name: str
    path: Path
    backend: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingSpec
    parameters: dict[str, str]
    versions: tuple[int, ...]  # the versions the version policy makes available, ascending
    raw: dict[str, Any] = field(compare=False)

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    def version_path(self, version: int) -> Path:
        return self.path / str(version)


class ModelRepository:
    """Reads model configurations from a folder; knows nothing of loaded models."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a folder")

    def names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir()
            and _NAME.match(p.name)
            and any((p / f).is_file() for f in ("config.pbtxt", "config.json"))
        )

    def config(self, name: str) -> ModelConfig:
        if not _NAME.match(name) or not (self.root / name).is_dir():
            raise NotFound(f"model {name!r} is not in the repository")
        return read_config(self.root / name)


def read_config(folder: Path) -> ModelConfig:
    proto = model_config_pb2.ModelConfig()
    pbtxt, js = folder / "config.pbtxt", folder / "config.json"
    try:
        if pbtxt.is_file():
            text_format.Parse(pbtxt.read_text(), proto)
        elif js.is_file():
            json_format.ParseDict(json.loads(js.read_text()), proto)
        else:
            raise ConfigError(f"{folder} has no config.pbtxt or config.json")
    except (text_format.ParseError, json_format.ParseError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder}: invalid model configuration: {exc}") from None
    if not proto.name:
        proto.name = folder.name
    if proto.name != folder.name:
        raise ConfigError(f"{folder}: config names model {proto.name!r}, folder is {folder.name!r}")
    return _from_proto(proto, folder)


def _from_proto(proto: model_config_pb2.ModelConfig, folder: Path) -> ModelConfig:
    if not proto.input or not proto.output:
        raise ConfigError(f"{folder}: a model needs at least one input and one output")
    batching = _batching(proto)
    return ModelConfig(
        name=proto.name,
        path=folder,
        backend=proto.backend or _backend_from_platform(proto.platform, folder),
        platform=proto.platform,
        inputs=tuple(_tensor(t, folder, with_labels=False) for t in proto.input),
        outputs=tuple(_tensor(t, folder, with_labels=True) for t in proto.output),
        batching=batching,
        parameters={k: v.string_value for k, v in proto.parameters.items()},
        versions=_versions(proto, folder),
        raw=_ints(json_format.MessageToDict(proto, preserving_proto_field_name=True)),
    )


_TEXT_KEYS = {"name", "string_value", "label_filename", "backend", "platform"}


def _ints(value: Any, key: str = "") -> Any:
    """Protobuf's JSON writes int64 as strings; Triton's /config writes numbers."""
    if isinstance(value, dict):
        return {k: _ints(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v, key) for v in value]
    if isinstance(value, str) and key not in _TEXT_KEYS and re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


def _backend_from_platform(platform: str, folder: Path) -> str:
    known = {"pytorch_libtorch": "pytorch", "onnxruntime_onnx": "onnxruntime"}
    if platform not in known:
        raise ConfigError(f"{folder}: set backend to one of {sorted(set(known.values()))}")
    return known[platform]


def _tensor(t: Any, folder: Path, with_labels: bool) -> TensorSpec:
    dtype = BY_CONFIG.get(model_config_pb2.DataType.Name(t.data_type))
    if dtype is None:
        raise ConfigError(f"{folder}: tensor {t.name!r} has an unsupported data type")
    labels: tuple[str, ...] = ()
    if with_labels and t.label_filename:
        label_path = (folder / t.label_filename).resolve()
        if folder.resolve() not in label_path.parents:
            raise ConfigError(f"{folder}: label file {t.label_filename!r} is outside the model")
        labels = tuple(line.strip() for line in label_path.read_text().splitlines())
    return TensorSpec(t.name, dtype.v2, tuple(int(d) for d in t.dims), labels)


def _batching(proto: model_config_pb2.ModelConfig) -> BatchingSpec:
    db = proto.dynamic_batching
    policy = db.default_queue_policy
    return BatchingSpec(
        max_batch_size=max(0, proto.max_batch_size),
        preferred_batch_sizes=tuple(sorted(int(s) for s in db.preferred_batch_size)),
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        max_queue_size=int(policy.max_queue_size) or DEFAULT_MAX_QUEUE_SIZE,
        default_timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=bool(policy.allow_timeout_override)
        or not db.HasField("default_queue_policy"),
    )


def _versions(proto: model_config_pb2.ModelConfig, folder: Path) -> tuple[int, ...]:
    present = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    policy = proto.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return tuple(present)
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return tuple(v for v in present if v in wanted)
    keep = policy.latest.num_versions if kind == "latest" else 1
    return tuple(present[-max(1, keep) :])


def parse_version(version: str | None) -> int | None:
    """A URL's version segment: absent or empty means the model's latest available version."""
    if version is None or version == "":
        return None
    if _VERSION.fullmatch(version) is None:
        shown = version if len(version) <= 32 else version[:32] + "..."
        raise InvalidInput(f"model version {shown!r} is not a positive integer (1 to 18 digits)")
    return int(version)
