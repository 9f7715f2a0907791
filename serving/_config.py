"""TF Serving's text-format configuration files, parsed the way tensorflow_model_server does.

Two files matter to the development server:

- `--model_config_file`: a `tensorflow.serving.ModelServerConfig` text proto
  (`model_config_list { config { name: ... base_path: ... } }`), parsed with the
  official proto from `tensorflow_serving.config`.
- `--batching_parameters_file`: a `tensorflow.serving.BatchingParameters` text proto
  (`max_batch_size { value: 128 }` ...). The pip package `tensorflow-serving-api`
  does not ship that message, so it is declared here with the same field names,
  numbers and wrapper types, and parsed with `google.protobuf.text_format`: unknown
  fields are errors, exactly as in TF Serving.
"""

from __future__ import annotations

import dataclasses
import os

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,  # noqa: F401  (registers wrappers.proto in the pool)
)

__all__ = [
    "BatchingParameters",
    "ModelConfig",
    "load_batching_parameters",
    "load_model_config_file",
    "parse_batching_parameters",
    "parse_model_config",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model: `name`, `base_path` (holding integer version directories) and
    the version policy: `policy` is "latest" (the `num_versions` highest), "all", or
    "specific" (exactly `versions`). `labels` maps version labels to versions."""

    name: str
    base_path: str
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.name:
            raise ValueError("a model needs a non-empty name; Received: name=''")
        if not self.base_path:
            raise ValueError(f"model {self.name!r} needs a base_path; Received: base_path=''")
        if self.policy not in ("latest", "all", "specific"):
            raise ValueError(
                f"policy must be 'latest', 'all' or 'specific'; Received: {self.policy!r}"
            )
        if self.policy == "latest" and self.num_versions < 1:
            raise ValueError(f"latest.num_versions must be >= 1; Received: {self.num_versions}")
        if self.policy == "specific" and not self.versions:
            raise ValueError(f"model {self.name!r}: a specific version policy needs versions")

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy aspires to, given the version directories on disk."""
        available = sorted(set(available))
        if self.policy == "all":
            return available
        if self.policy == "specific":
            return sorted(set(self.versions))
        return available[-self.num_versions :]


def parse_model_config(text: str, source: str = "<string>") -> list[ModelConfig]:
    """Parse a ModelServerConfig text proto into `ModelConfig`s."""
    from tensorflow_serving.config import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(
            f"Error parsing text-format tensorflow.serving.ModelServerConfig: "
            f"Invalid protobuf file: '{source}': {err}"
        ) from None
    if proto.WhichOneof("config") != "model_config_list":
        raise ValueError(
            f"{source}: only model_config_list is supported; Received: "
            f"{proto.WhichOneof('config') or 'an empty config'}"
        )
    models = []
    for cfg in proto.model_config_list.config:
        if cfg.model_platform not in ("", "tensorflow"):
            raise ValueError(
                f"{source}: model {cfg.name!r}: model_platform must be 'tensorflow'; "
                f"Received: {cfg.model_platform!r}"
            )
        which = cfg.model_version_policy.WhichOneof("policy_choice")
        kwargs: dict = {}
        if which == "all":
            kwargs["policy"] = "all"
        elif which == "specific":
            kwargs["policy"] = "specific"
            kwargs["versions"] = tuple(int(v) for v in cfg.model_version_policy.specific.versions)
        elif which == "latest":
            kwargs["num_versions"] = cfg.model_version_policy.latest.num_versions or 1
        models.append(
            ModelConfig(
                name=cfg.name,
                base_path=cfg.base_path,
                labels={k: int(v) for k, v in cfg.version_labels.items()},
                **kwargs,
            )
        )
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: model names must be unique; Received: {names}")
    if not models:
        raise ValueError(f"{source}: the model_config_list is empty")
    return models


def load_model_config_file(path: str | os.PathLike) -> list[ModelConfig]:
    """Read and parse `--model_config_file`."""
    with open(path, encoding="utf-8") as f:
        return parse_model_config(f.read(), source=os.fspath(path))


# --- BatchingParameters -------------------------------------------------------------

_INT64 = ".google.protobuf.Int64Value"
_BATCHING_FIELDS = (  # (name, number, type name or scalar type, repeated)
    ("max_batch_size", 1, _INT64, False),
    ("batch_timeout_micros", 2, _INT64, False),
    ("max_enqueued_batches", 3, _INT64, False),
    ("num_batch_threads", 4, _INT64, False),
    ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
    ("allowed_batch_sizes", 6, descriptor_pb2.FieldDescriptorProto.TYPE_INT64, True),
    ("pad_variable_length_inputs", 7, descriptor_pb2.FieldDescriptorProto.TYPE_BOOL, False),
    ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue", False),
    ("max_execution_batch_size", 9, _INT64, False),
)


def _batching_message_class():
    pool = descriptor_pool.Default()
    full_name = "tfbn.serving.BatchingParameters"
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    except KeyError:
        pass
    fd = descriptor_pb2.FileDescriptorProto(
        name="tfbn/serving/batching_parameters.proto",
        package="tfbn.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fd.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for name, number, kind, repeated in _BATCHING_FIELDS:
        field = msg.field.add(
            name=name, number=number, label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        )
        if isinstance(kind, str):
            field.type, field.type_name = F.TYPE_MESSAGE, kind
        else:
            field.type = kind
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """Server-side batching, with TF Serving's defaults for fields the file leaves out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; Received: {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            raise ValueError(
                f"batch_timeout_micros must be >= 0; Received: {self.batch_timeout_micros}"
            )
        if self.num_batch_threads < 1 or self.max_enqueued_batches < 1:
            raise ValueError(
                "num_batch_threads and max_enqueued_batches must be >= 1; Received: "
                f"{self.num_batch_threads}, {self.max_enqueued_batches}"
            )
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] < 1:
                raise ValueError(
                    "allowed_batch_sizes must be positive and increase monotonically; "
                    f"Received: {list(sizes)}"
                )
            if sizes[-1] != self.max_batch_size:
                raise ValueError(
                    "the last entry in allowed_batch_sizes must equal max_batch_size; "
                    f"Received: {list(sizes)} with max_batch_size={self.max_batch_size}"
                )

    def padded_size(self, n: int) -> int:
        """The batch size a batch of `n` rows is padded to."""
        for size in self.allowed_batch_sizes:
            if size >= n:
                return size
        return n


def parse_batching_parameters(text: str, source: str = "<string>") -> BatchingParameters:
    """Parse a BatchingParameters text proto (TF Serving's --batching_parameters_file)."""
    proto = _batching_message_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(
            f"Error parsing text-format tensorflow.serving.BatchingParameters in '{source}': {err}"
        ) from None
    kwargs: dict = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "enable_large_batch_splitting",
    ):
        if proto.HasField(name):
            kwargs[name] = getattr(proto, name).value
    kwargs["allowed_batch_sizes"] = tuple(int(v) for v in proto.allowed_batch_sizes)
    kwargs["pad_variable_length_inputs"] = bool(proto.pad_variable_length_inputs)
    return BatchingParameters(**kwargs)


def load_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    """Read and parse `--batching_parameters_file`."""
    with open(path, encoding="utf-8") as f:
        return parse_batching_parameters(f.read(), source=os.fspath(path))
