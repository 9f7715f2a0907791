"""tensorflow_model_server's command-line flags: one table, the only definition of them.

Every flag of `tensorflow_model_server` 2.21 (tensorflow_serving/model_servers/main.cc,
defaults from server.h) is listed here with its name, type and default, and with what
`tfbn serve` does with it:

- ``SAME``: implemented with TF Serving's meaning;
- ``DIFFERS``: implemented, with the difference stated in `note`;
- ``NO_EFFECT`` ("not applicable"): accepted (so a Kubernetes / Docker argument list
  runs unchanged) and logged once as "accepted, has no effect in the development server".

A flag tensorflow_model_server does not have is still an error (argparse's
"unrecognized arguments"). tfbn's own extra flags (`--host`, `--max-request-bytes`)
are listed separately in `EXTRA_FLAGS`.

The table also feeds the README's feature table (`markdown_table()`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

__all__ = [
    "EXTRA_FLAGS",
    "FLAGS",
    "Flag",
    "argument_specs",
    "log_ignored",
    "markdown_table",
    "parse_bool",
    "parse_grpc_channel_arguments",
    "parse_saved_model_tags",
]

log = logging.getLogger("tfbn.serving.flags")

SAME, DIFFERS, NO_EFFECT = "same", "differs", "not applicable"
_CPUS = os.cpu_count() or 1


def parse_bool(text: str | bool) -> bool:
    """TensorFlow's flag parser: true/false/1/0 (case-insensitive)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0; got {text!r}")


def _int32(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected a 32-bit integer; got {text!r}")
    return value


def _int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a 64-bit integer; got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


_TYPES = {"bool": parse_bool, "int32": _int32, "int64": _int64, "float": _float, "string": str}


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    type: str  # bool, int32, int64, float, string (TensorFlow's flag types)
    default: object
    status: str  # SAME, DIFFERS or NO_EFFECT
    help: str
    note: str = ""  # how it differs, or why it has no effect here
    tfbn_only: bool = False  # not a tensorflow_model_server flag: tfbn's kebab-case spelling

    @property
    def option(self) -> str:
        """The command-line spelling: TF Serving's own, or kebab-case for tfbn's additions."""
        return "--" + (self.name.replace("_", "-") if self.tfbn_only else self.name)

    @property
    def old_spellings(self) -> tuple[str, ...]:
        """Spellings still accepted, with a deprecation warning (tfbn's flags were snake_case)."""
        return (f"--{self.name}",) if self.tfbn_only and "_" in self.name else ()


FLAGS: tuple[Flag, ...] = (
    Flag(
        "port",
        "int32",
        8500,
        DIFFERS,
        "gRPC TCP port (0 picks a free port)",
        "0 picks a free port (tensorflow_model_server: 0 turns TCP gRPC off); binds 127.0.0.1 "
        "unless --host",
    ),
    Flag("grpc_socket_path", "string", "", SAME, "also serve gRPC on this Unix domain socket"),
    Flag(
        "rest_api_port",
        "int32",
        0,
        SAME,
        "REST port (0: REST disabled)",
        "binds 127.0.0.1 unless --host",
    ),
    Flag(
        "rest_api_num_threads",
        "int32",
        4 * _CPUS,
        SAME,
        "threads for REST request processing (default 4 x CPUs)",
    ),
    Flag(
        "rest_api_timeout_in_ms",
        "int32",
        30000,
        DIFFERS,
        "timeout for REST calls",
        "bounds the time a REST request may wait for and run on the model; a request over "
        "it gets HTTP 504 (DEADLINE_EXCEEDED)",
    ),
    Flag(
        "rest_api_enable_cors_support",
        "bool",
        False,
        NO_EFFECT,
        "add CORS headers",
        "no CORS headers are sent",
    ),
    Flag(
        "enable_batching",
        "bool",
        False,
        DIFFERS,
        "server-side batching",
        "emulated in Python (see the batching section)",
    ),
    Flag(
        "allow_version_labels_for_unavailable_models",
        "bool",
        False,
        SAME,
        "allow a version label to point at a version that is not (yet) available",
    ),
    Flag("batching_parameters_file", "string", "", SAME, "BatchingParameters text proto"),
    Flag(
        "enable_per_model_batching_parameters",
        "bool",
        False,
        NO_EFFECT,
        "read batching_params.pbtxt from each SavedModel",
        "the global file is used",
    ),
    Flag("model_config_file", "string", "", SAME, "ModelServerConfig text proto"),
    Flag(
        "model_config_file_poll_wait_seconds",
        "int32",
        0,
        SAME,
        "seconds between re-reads of --model_config_file (0: read once)",
    ),
    Flag("model_name", "string", "default", SAME, "model name (without --model_config_file)"),
    Flag("model_base_path", "string", "", SAME, "directory of integer version directories"),
    Flag(
        "num_load_threads",
        "int32",
        0,
        NO_EFFECT,
        "servable load threads",
        "versions load one at a time",
    ),
    Flag(
        "num_unload_threads",
        "int32",
        0,
        NO_EFFECT,
        "servable unload threads",
        "unloads run on a short-lived thread each",
    ),
    Flag("max_num_load_retries", "int32", 5, SAME, "retries of a failed load"),
    Flag(
        "load_retry_interval_micros", "int64", 60_000_000, SAME, "microseconds between load retries"
    ),
    Flag(
        "file_system_poll_wait_seconds",
        "int32",
        1,
        SAME,
        "seconds between polls for new versions (0: once)",
    ),
    Flag(
        "flush_filesystem_caches",
        "bool",
        True,
        NO_EFFECT,
        "flush file-system caches after loads",
        "nothing to flush in Python",
    ),
    Flag(
        "tensorflow_session_parallelism",
        "int64",
        0,
        SAME,
        "threads for both TensorFlow thread pools (0: automatic)",
    ),
    Flag(
        "tensorflow_session_config_file",
        "string",
        "",
        NO_EFFECT,
        "Session ConfigProto text proto",
        "only the parallelism flags configure TensorFlow",
    ),
    Flag(
        "tensorflow_intra_op_parallelism", "int64", 0, SAME, "threads inside one op (0: automatic)"
    ),
    Flag("tensorflow_inter_op_parallelism", "int64", 0, SAME, "ops run at once (0: automatic)"),
    Flag(
        "use_alts_credentials",
        "bool",
        False,
        NO_EFFECT,
        "Google ALTS credentials",
        "gRPC is insecure (loopback by default)",
    ),
    Flag(
        "ssl_config_file",
        "string",
        "",
        NO_EFFECT,
        "SSLConfig text proto for gRPC TLS",
        "no TLS: gRPC and REST are plain text",
    ),
    Flag(
        "platform_config_file",
        "string",
        "",
        NO_EFFECT,
        "PlatformConfigMap text proto",
        "only the TensorFlow (and TF Lite) platform",
    ),
    Flag(
        "per_process_gpu_memory_fraction",
        "float",
        0.0,
        NO_EFFECT,
        "GPU memory fraction",
        "TensorFlow's default GPU memory growth",
    ),
    Flag(
        "saved_model_tags",
        "string",
        "serve",
        SAME,
        "comma-separated tag set of the MetaGraph to load",
    ),
    Flag(
        "grpc_channel_arguments",
        "string",
        "",
        SAME,
        "comma-separated gRPC server arguments, key=value (integers as int)",
    ),
    Flag(
        "grpc_max_threads",
        "int32",
        4 * _CPUS,
        DIFFERS,
        "gRPC server threads",
        "the size of the gRPC handler thread pool",
    ),
    Flag(
        "enable_model_warmup",
        "bool",
        True,
        SAME,
        "replay assets.extra/tf_serving_warmup_requests before a version is AVAILABLE",
    ),
    Flag(
        "num_request_iterations_for_warmup",
        "int32",
        0,
        SAME,
        "times each warm-up record is replayed (used if > 0)",
    ),
    Flag(
        "version",
        "bool",
        False,
        DIFFERS,
        "print the version and exit",
        "prints tfbn's and TensorFlow's versions",
    ),
    Flag(
        "monitoring_config_file",
        "string",
        "",
        DIFFERS,
        "MonitoringConfig text proto: Prometheus endpoint on the REST port",
        "prometheus_client's text format: counters carry the _total suffix",
    ),
    Flag(
        "remove_unused_fields_from_bundle_metagraph",
        "bool",
        True,
        NO_EFFECT,
        "drop unused MetaGraphDef fields",
        "the MetaGraphDef is kept whole",
    ),
    Flag(
        "prefer_tflite_model",
        "bool",
        False,
        SAME,
        "serve model.tflite from a version directory when present",
    ),
    Flag(
        "num_tflite_pools",
        "int32",
        _CPUS,
        NO_EFFECT,
        "TF Lite interpreter pools",
        "one interpreter per version, calls serialised",
    ),
    Flag(
        "num_tflite_interpreters_per_pool",
        "int32",
        1,
        NO_EFFECT,
        "TF Lite interpreters per pool",
        "one interpreter per version, calls serialised",
    ),
    Flag(
        "enable_signature_method_name_check",
        "bool",
        False,
        SAME,
        "require classify/regress method names on Classify/Regress signatures",
    ),
    Flag(
        "xla_cpu_compilation_enabled",
        "bool",
        False,
        NO_EFFECT,
        "XLA:CPU JIT",
        "TensorFlow's Python defaults",
    ),
    Flag(
        "xla_gpu_compilation_enabled",
        "bool",
        False,
        NO_EFFECT,
        "XLA:GPU JIT",
        "TensorFlow's Python defaults",
    ),
    Flag(
        "enable_profiler",
        "bool",
        True,
        SAME,
        "serve tensorflow.ProfilerService/Profile on the gRPC port",
    ),
    Flag(
        "thread_pool_factory_config_file",
        "string",
        "",
        NO_EFFECT,
        "ThreadPoolConfig text proto",
        "TensorFlow's own thread pools",
    ),
    Flag(
        "mixed_precision",
        "string",
        "",
        NO_EFFECT,
        "mixed precision mode",
        "models run in the precision they were saved in",
    ),
    Flag("skip_initialize_tpu", "bool", False, NO_EFFECT, "skip TPU initialisation", "no TPU"),
    Flag(
        "enable_grpc_healthcheck_service",
        "bool",
        False,
        NO_EFFECT,
        "standard gRPC health service",
        "no health service",
    ),
    Flag(
        "enable_serialization_as_tensor_content",
        "bool",
        False,
        NO_EFFECT,
        "Predict responses in tensor_content",
        "responses use the typed value fields",
    ),
)

EXTRA_FLAGS: tuple[Flag, ...] = (
    Flag(
        "host",
        "string",
        "127.0.0.1",
        DIFFERS,
        "address to bind (tfbn only)",
        "tensorflow_model_server binds every interface",
        tfbn_only=True,
    ),
    Flag(
        "max_request_bytes",
        "int64",
        64 * 1024 * 1024,
        DIFFERS,
        "largest accepted REST body / gRPC message (tfbn only)",
        "tensorflow_model_server has no such cap",
        tfbn_only=True,
    ),
    Flag(
        "rest_idle_timeout_seconds",
        "float",
        30.0,
        DIFFERS,
        "seconds a REST connection may take to send a request's headers, or stay idle between "
        "requests (tfbn only)",
        "tensorflow_model_server has no such limit",
        tfbn_only=True,
    ),
    Flag(
        "rest_body_timeout_seconds",
        "float",
        60.0,
        DIFFERS,
        "seconds a REST request body may take to arrive (tfbn only)",
        "tensorflow_model_server has no such limit",
        tfbn_only=True,
    ),
)

_BY_NAME = {f.name: f for f in FLAGS + EXTRA_FLAGS}


def argument_specs() -> list[tuple[str, dict, tuple[str, ...]]]:
    """`(option, add_argument keywords, deprecated spellings)` for every flag of the table,
    with tensorflow_model_server's spelling: `--name=value`, `--name value`, and bare
    `--name` for booleans (the `tfbn serve` parser turns each into an option)."""
    specs = []
    for flag in FLAGS + EXTRA_FLAGS:
        default = flag.default
        text = f"{flag.help} (default: {default!r})"
        if flag.status == NO_EFFECT:
            text += "; accepted, has no effect in the development server"
        kwargs = dict(type=_TYPES[flag.type], default=default, help=text, dest=flag.name)
        if flag.type == "bool":
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        specs.append((flag.option, kwargs, flag.old_spellings))
    return specs


def log_ignored(args: argparse.Namespace, emit=None) -> list[str]:
    """Log once, per flag given a non-default value, that it has no effect here.
    Returns the names logged (tests read them)."""
    names = []
    for flag in FLAGS:
        if flag.status != NO_EFFECT:
            continue
        value = getattr(args, flag.name, flag.default)
        if value != flag.default:
            names.append(flag.name)
            message = (
                f"--{flag.name}={value}: accepted, has no effect in the development "
                f"server ({flag.note})"
            )
            (emit or log.warning)(message)
    return names


def parse_grpc_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """`--grpc_channel_arguments`: `key=value,key=value`; a value that parses as a 32-bit
    integer is passed as an int, anything else as a string (as TF Serving does)."""
    out: list[tuple[str, int | str]] = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"--grpc_channel_arguments: expected key=value items separated by "
                f"commas; Received: {item!r} in {text!r}"
            )
        key, value = key.strip(), value.strip()
        try:
            number = int(value)
            out.append((key, number) if -(2**31) <= number < 2**31 else (key, value))
        except ValueError:
            out.append((key, value))
    return out


def parse_saved_model_tags(text: str) -> tuple[str, ...]:
    """`--saved_model_tags`: a comma-separated tag set (TF Serving splits on commas)."""
    tags = tuple(t for t in (text or "").split(",") if t)
    if not tags:
        raise ValueError(f"--saved_model_tags needs at least one tag; Received: {text!r}")
    return tags


def markdown_table() -> str:
    """The flag table as Markdown (the README's flags section is this output)."""
    rows = ["| flag | default | in `tfbn serve` |", "|---|---|---|"]
    for flag in FLAGS + EXTRA_FLAGS:
        default = (
            "4 x CPUs"
            if flag.name in ("rest_api_num_threads", "grpc_max_threads")
            else (
                "CPUs"
                if flag.name == "num_tflite_pools"
                else repr(flag.default).replace("|", "\\|")
            )
        )
        what = flag.status + (f": {flag.note}" if flag.note else "")
        if flag.status == NO_EFFECT:
            what += " (accepted, logged once)"
        rows.append(f"| `{flag.option}` | `{default}` | {what} |")
    return "\n".join(rows)
