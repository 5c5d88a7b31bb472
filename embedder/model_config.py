"""TF Serving's configuration files: the model config (``--model_config_file``) and batching parameters.

The model config is parsed with protobuf's text format straight into TF Serving's own
``ModelServerConfig`` message (from tensorflow-serving-api), so a file accepted here is accepted by
``tensorflow_model_server`` and vice versa. The batching parameters and the monitoring config live in
protos that the pip package does not ship (session_bundle_config.proto, which drags in TensorFlow's
config protos, and monitoring_config.proto), so protos/cbir/tfserving/ declares the same messages
with TF Serving's field names, numbers and wrapper types, and ``make protos`` generates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from cbir.errors import InvalidInput
from cbir.tfserving import batching_parameters_pb2, monitoring_config_pb2

# tensorflow-serving-api ships no types: its messages are Any to the type checker.
ModelServerConfig: TypeAlias = model_server_config_pb2.ModelServerConfig
ModelConfig: TypeAlias = model_server_config_pb2.ModelConfig

POLICY_LATEST = "latest"
POLICY_ALL = "all"
POLICY_SPECIFIC = "specific"


# --------------------------------------------------------------------------- model config


@dataclass(frozen=True)
class VersionPolicy:
    """Which numeric versions under a base path are served (FileSystemStoragePathSourceConfig)."""

    kind: str = POLICY_LATEST
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions to serve out of the loadable ``available`` ones."""
        present = sorted(set(available))
        if self.kind == POLICY_ALL:
            return set(present)
        if self.kind == POLICY_SPECIFIC:
            return set(self.versions) & set(present)
        return set(present[-self.num_versions :]) if present else set()

    def describe(self) -> str:
        if self.kind == POLICY_LATEST:
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == POLICY_SPECIFIC:
            return f"specific {{ versions: {list(self.versions)} }}"
        return "all {}"


@dataclass(frozen=True)
class ModelEntry:
    """One model of the config: where its versions live, which ones to serve, and version labels."""

    name: str
    base_path: str
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: Mapping[str, int] = field(default_factory=dict)
    platform: str = "tensorflow"


def parse_model_server_config(text: str, *, source: str = "model config") -> ModelServerConfig:
    """Parses TF Serving's text-format ``model_config_list`` and checks what TF Serving checks.

    Raises InvalidInput naming the line and column of a syntax error, a duplicate model name, a
    model without name/base_path, a bad version policy or an unsupported platform.
    """
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise InvalidInput(f"{source}: {exc}") from exc
    if config.WhichOneof("config") == "custom_model_config":
        raise InvalidInput(f"{source}: custom_model_config is not supported, use model_config_list")
    model_entries(config, source=source)
    return config


def model_entries(config: ModelServerConfig, *, source: str = "model config") -> list[ModelEntry]:
    """The models of a parsed config as plain values, validated."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for index, model in enumerate(config.model_config_list.config):
        where = f"{source}: config #{index}"
        if not model.name:
            raise InvalidInput(f"{where} has no name")
        if model.name in seen:
            raise InvalidInput(f"{source}: model name {model.name!r} appears more than once")
        seen.add(model.name)
        if not model.base_path:
            raise InvalidInput(f"{where} ({model.name!r}) has no base_path")
        platform = model.model_platform or "tensorflow"
        if platform != "tensorflow":
            raise InvalidInput(
                f"{where} ({model.name!r}): model_platform {platform!r} is not supported (only 'tensorflow')"
            )
        policy_proto = model.model_version_policy
        which = policy_proto.WhichOneof("policy_choice")
        if which == "all":
            policy = VersionPolicy(POLICY_ALL)
        elif which == "specific":
            versions = tuple(sorted(set(int(v) for v in policy_proto.specific.versions)))
            if not versions:
                raise InvalidInput(f"{where} ({model.name!r}): specific version policy lists no versions")
            policy = VersionPolicy(POLICY_SPECIFIC, versions=versions)
        else:
            num = int(policy_proto.latest.num_versions) if which == "latest" else 0
            if num < 0:
                raise InvalidInput(f"{where} ({model.name!r}): latest num_versions must be positive")
            policy = VersionPolicy(POLICY_LATEST, num_versions=num or 1)
        labels = {str(k): int(v) for k, v in model.version_labels.items()}
        for label, version in labels.items():
            if not label:
                raise InvalidInput(f"{where} ({model.name!r}): empty version label")
            if version <= 0:
                raise InvalidInput(
                    f"{where} ({model.name!r}): label {label!r} points to invalid version {version}"
                )
        entries.append(ModelEntry(model.name, model.base_path, policy, labels, platform))
    return entries


def load_model_server_config(path: str | os.PathLike[str]) -> list[ModelEntry]:
    """Reads and parses a ``--model_config_file``; relative base paths resolve against the CWD as
    in TF Serving."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read model config file {str(path)!r}: {exc.strerror or exc}") from exc
    source = f"model config file {str(path)!r}"
    return model_entries(parse_model_server_config(text, source=source), source=source)


def single_model_config(name: str, base_path: str) -> list[ModelEntry]:
    """The config implied by ``--model_name`` + ``--model_base_path`` (latest version only)."""
    if not name:
        raise InvalidInput("--model_name must not be empty")
    if not base_path:
        raise InvalidInput("--model_base_path must not be empty")
    return [ModelEntry(name, base_path)]


def format_model_server_config(entries: Iterable[ModelEntry]) -> str:
    """The text-format file that ``tensorflow_model_server --model_config_file`` reads."""
    config = ModelServerConfig()
    for entry in entries:
        model = config.model_config_list.config.add(
            name=entry.name, base_path=entry.base_path, model_platform=entry.platform
        )
        policy = model.model_version_policy
        if entry.policy.kind == POLICY_ALL:
            policy.all.SetInParent()
        elif entry.policy.kind == POLICY_SPECIFIC:
            policy.specific.versions.extend(entry.policy.versions)
        else:
            policy.latest.num_versions = entry.policy.num_versions
        for label, version in sorted(entry.labels.items()):
            model.version_labels[label] = version
    return text_format.MessageToString(config)


# --------------------------------------------------------------------------- batching parameters


@dataclass(frozen=True)
class BatchingParameters:
    """Resolved batching settings with TF Serving's defaults for the fields a file leaves out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # 0 = same as max_batch_size
    thread_pool_name: str = "batch_threads"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise InvalidInput("batch_timeout_micros must not be negative")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0:
                raise InvalidInput(
                    "allowed_batch_sizes entries must be positive and "
                    f"monotonically increasing, got {list(sizes)}"
                )
            if sizes[-1] != self.execution_batch_size:
                raise InvalidInput(
                    "the final entry in allowed_batch_sizes must equal max_batch_size "
                    f"({self.execution_batch_size}), got {sizes[-1]}"
                )

    @property
    def execution_batch_size(self) -> int:
        """Largest batch the model runs at once."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size > 0:
            return self.max_execution_batch_size
        return self.max_batch_size

    @property
    def batch_timeout_seconds(self) -> float:
        return self.batch_timeout_micros / 1e6

    def padded_size(self, size: int) -> int:
        """The smallest allowed batch size holding ``size`` items (``size`` when none are set)."""
        for allowed in self.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size


def parse_batching_parameters(text: str, *, source: str = "batching parameters") -> BatchingParameters:
    """Parses TF Serving's ``--batching_parameters_file`` text format, e.g.
    ``max_batch_size { value: 32 } batch_timeout_micros { value: 2000 }``."""
    proto = batching_parameters_pb2.BatchingParameters()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise InvalidInput(f"{source}: {exc}") from exc
    values: dict[str, Any] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "max_execution_batch_size",
    ):
        if proto.HasField(name):
            values[name] = int(getattr(proto, name).value)
    if proto.HasField("enable_large_batch_splitting"):
        values["enable_large_batch_splitting"] = bool(proto.enable_large_batch_splitting.value)
    if proto.HasField("thread_pool_name"):
        values["thread_pool_name"] = proto.thread_pool_name.value
    values["allowed_batch_sizes"] = tuple(int(v) for v in proto.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = bool(proto.pad_variable_length_inputs)
    try:
        return BatchingParameters(**values)
    except InvalidInput as exc:
        raise InvalidInput(f"{source}: {exc.message}") from exc


def load_batching_parameters(path: str | os.PathLike[str]) -> BatchingParameters:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read batching parameters file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    return parse_batching_parameters(text, source=f"batching parameters file {str(path)!r}")


# --------------------------------------------------------------------------- monitoring config

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


@dataclass(frozen=True)
class MonitoringConfig:
    """Whether (and where) the REST port exposes Prometheus metrics."""

    prometheus_enabled: bool = False
    prometheus_path: str = DEFAULT_PROMETHEUS_PATH


def parse_monitoring_config(text: str, *, source: str = "monitoring config") -> MonitoringConfig:
    """Parses ``--monitoring_config_file``, e.g. ``prometheus_config { enable: true }``."""
    proto = monitoring_config_pb2.MonitoringConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise InvalidInput(f"{source}: {exc}") from exc
    path = proto.prometheus_config.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):
        raise InvalidInput(f"{source}: prometheus_config.path must start with '/', got {path!r}")
    return MonitoringConfig(bool(proto.prometheus_config.enable), path)


def load_monitoring_config(path: str | os.PathLike[str]) -> MonitoringConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read monitoring config file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    return parse_monitoring_config(text, source=f"monitoring config file {str(path)!r}")
