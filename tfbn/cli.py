"""The `tfbn` command. Thin: each subcommand parses its flags, calls one library
function, prints its result and returns the exit code (0 ok, 1 findings/failure,
2 bad usage).

Every subcommand is one `Command` row in `COMMANDS`: its options (a table of
`opt(...)` rows), an optional TensorFlow-free `validate(args)` and the `run(args)`
handler. `tfbn --help`, `tfbn CMD --help`, `--version` and every argument error
are answered before TensorFlow is imported (library modules are imported inside
the handlers); TensorFlow's start-up logs are silenced unless `--verbose`.

Flag style: tfbn's own options are kebab-case (`--num-examples`). Options that are
tensorflow_model_server's own flags keep TF Serving's spelling (`--model_name`,
`--model_base_path`, `--rest_api_port`, `--enable_batching`, ...), on every command
that takes them. Old spellings still parse, with a deprecation warning on stderr
(`opt(..., deprecated=("--old",))`). `--json PATH` means the same everywhere:
write the JSON report to PATH; `-` (or `--json` alone) prints the JSON to stdout
instead of the table.

To add a subcommand: write its `_run_<name>(args)` handler and a `Command` row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import os
import signal
import sys
import tempfile
from collections.abc import Callable

from tfbn.report import Report, dumps  # TensorFlow-free
from tfbn.serving import _flags as _serving_flags  # the flag table only: no TensorFlow

# --- argument types (TensorFlow-free) -----------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"a shape is positive integers separated by commas, e.g. 32,56,56,64; got {text!r}"
        )
    return dims


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _batch_sizes(text: str) -> tuple[int | None, ...]:
    sizes: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            sizes.append(None)
            continue
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size <= 0:
            raise argparse.ArgumentTypeError(
                f"batch sizes are positive integers or 'all', comma-separated; got {text!r}"
            )
        sizes.append(size)
    return tuple(sizes)


# --- the option table ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One `add_argument` call: flags (canonical first), argparse keywords, and
    old spellings that still parse with a deprecation warning."""

    flags: tuple[str, ...]
    kwargs: dict
    deprecated: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Options of which at most one may be given (argparse mutually exclusive group)."""

    options: tuple[Option, ...]


def opt(*flags: str, deprecated: tuple[str, ...] = (), **kwargs) -> Option:
    return Option(flags, kwargs, deprecated)


def one_of(*options: Option) -> OneOf:
    return OneOf(options)


JSON = opt(
    "--json",
    dest="json_path",
    nargs="?",
    const="-",
    metavar="PATH",
    help="write the report as JSON to PATH; '-' or --json alone: print the JSON to "
    "stdout instead of the table",
)


def _quiet(what: str) -> Option:
    return opt(
        "--quiet",
        action="store_true",
        help=f"no progress on stderr ({what}; shown after 2 s, only on a terminal)",
    )


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    options: tuple[Option | OneOf, ...]
    run: Callable[[argparse.Namespace], int]
    validate: Callable[[argparse.Namespace], None] | None = None
    # options kept in a table of their own module (TensorFlow-free), e.g. serve's
    add_options: Callable[[argparse.ArgumentParser], None] | None = None


class _DeprecatedAlias(argparse.Action):
    """An old spelling: stores into the canonical option's dest and warns once."""

    def __init__(self, option_strings, dest, canonical: str, **kwargs):
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated; use {self.canonical}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _add_option(container, option: Option) -> None:
    action = container.add_argument(*option.flags, **option.kwargs)
    if not option.deprecated:
        return
    kwargs = {
        k: v
        for k, v in option.kwargs.items()
        if k in ("type", "nargs", "const", "choices", "metavar")
    }
    container.add_argument(
        *option.deprecated,
        dest=action.dest,
        action=_DeprecatedAlias,
        canonical=option.flags[0],
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **kwargs,
    )


def _add_command(sub, command: Command, parents) -> None:
    p = sub.add_parser(
        command.name, help=command.help, description=command.description, parents=parents
    )
    for item in command.options:
        if isinstance(item, OneOf):
            group = p.add_mutually_exclusive_group()
            for option in item.options:
                _add_option(group, option)
        else:
            _add_option(p, item)
    if command.add_options is not None:
        command.add_options(p)
    p.set_defaults(command_row=command)


# --- shared helpers for handlers ----------------------------------------------


def _emit(report: Report, json_path: str | None) -> None:
    """Print a report (`tfbn.report.Report`) and its JSON as `--json` asks: '-' prints
    the JSON instead of the text, a path writes it there too."""
    if json_path != "-":
        print(report.format())
    _write_json(report.to_json(), json_path)


def _write_json(text: str, json_path: str | None) -> None:
    """JSON text to `json_path` as `--json` says: '-' stdout, None nowhere."""
    if json_path == "-":
        print(text)
    elif json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text)


def _positional_from_json(args, name: str) -> None:
    """`tfbn inspect --json model.keras`: with the positional missing, the value that
    `--json` took was the positional, and the JSON goes to stdout."""
    if getattr(args, name) is None and args.json_path not in (None, "-"):
        setattr(args, name, args.json_path)
        args.json_path = "-"


class MissingExtraError(Exception):
    """A subcommand needs an optional dependency group that is not installed."""


_EXTRAS = {"serving": ("grpc", "tensorflow_serving")}


def _require_extra(extra: str, what: str) -> None:
    missing = [m for m in _EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'tfbn[{extra}]'"
        )


# --- bench --------------------------------------------------------------------


def _validate_bench(args) -> None:
    if args.profile and not args.models:
        raise ValueError("--profile needs --model NAME (the model whose training step to profile)")
    if args.models and args.profile:
        return
    if (args.sync or (args.models and not args.single_only)) and args.replicas < 2:
        raise ValueError(f"--replicas must be at least 2. Received: {args.replicas}")


def _run_bench(args) -> int:
    from tfbn import bench

    progress = False if args.quiet else None
    models = tuple(m for ms in args.models or () for m in ms.split(","))

    def run(json_path):
        if models and args.profile:
            return bench.main_profile(models, args.batch, json_path=json_path)
        if models:
            if not args.single_only:
                bench.split_cpu(args.replicas)
            return bench.main_model(
                models,
                args.batch,
                args.repeats,
                args.replicas,
                json_path,
                not args.single_only,
                progress=progress,
            )
        if args.sync:
            return bench.main_sync(
                tuple(args.shapes) if args.shapes else bench.SYNC_SHAPES,
                args.repeats,
                args.replicas,
                json_path,
                progress=progress,
            )
        return bench.main(
            tuple(args.shapes) if args.shapes else bench.DEFAULT_SHAPES,
            args.repeats,
            json_path,
            progress=progress,
        )

    if args.json_path != "-":
        run(args.json_path)
        return 0
    with tempfile.TemporaryDirectory() as tmp:  # the JSON instead of the table
        path = os.path.join(tmp, "bench.json")
        with contextlib.redirect_stdout(io.StringIO()):
            run(path)
        with open(path, encoding="utf-8") as f:
            sys.stdout.write(f.read() + "\n")
    return 0


BENCH = Command(
    "bench",
    help="time tfbn against keras.layers.BatchNormalization and the raw fused op",
    description="Training-step and inference timings (medians, ratios vs tfbn, one run).",
    options=(
        opt(
            "--shape",
            type=_shape,
            action="append",
            dest="shapes",
            help="input shape (repeatable); default: the README grid (bench.DEFAULT_SHAPES, with --sync bench.SYNC_SHAPES)",
        ),
        opt(
            "--repeats",
            type=_positive_int,
            default=20,
            help="timed calls per implementation (default 20)",
        ),
        JSON,
        opt(
            "--sync",
            action="store_true",
            help="synchronised BN under MirroredStrategy on logical CPU replicas: tfbn "
            "sync/local vs Keras synchronized=True/local (--shape is per replica)",
        ),
        opt(
            "--replicas",
            type=_positive_int,
            default=4,
            help="with --sync or --model: logical CPU devices (replicas) to split the CPU "
            "into (default 4)",
        ),
        opt(
            "--model",
            dest="models",
            action="append",
            help="whole-model training steps of this model (repeatable): resnet, "
            "mobilenetv2 (small), resnet50, mobilenetv2_app, efficientnetb0 "
            "(Keras Applications); single device and MirroredStrategy",
        ),
        opt(
            "--batch",
            type=_positive_int,
            default=16,
            help="with --model: global batch size (default 16)",
        ),
        opt(
            "--single-only", action="store_true", help="with --model: only the single-device table"
        ),
        opt(
            "--profile",
            action="store_true",
            help="with --model: instead of timing, profile 5 training steps of Keras's and "
            "tfbn's BN (TensorFlow profiler) and print the BN layers' op time per op type",
        ),
        _quiet("shapes or models done"),
    ),
    run=_run_bench,
    validate=_validate_bench,
)


# --- serve --------------------------------------------------------------------


def _validate_batching(args) -> None:
    if args.batching_parameters_file and not args.enable_batching:
        raise ValueError("--batching_parameters_file needs --enable_batching")


def _batching(args):
    from tfbn.serving import _config

    if not args.enable_batching:
        return None
    return (
        _config.load_batching_parameters(args.batching_parameters_file)
        if args.batching_parameters_file
        else _config.BatchingParameters()
    )


def _validate_serve(args) -> None:
    _validate_batching(args)
    _require_extra("serving", "tfbn serve")


def _run_serve(args) -> int:
    import logging

    from tfbn.serving import _flags, _loading

    if args.version:
        import tensorflow as tf

        print(
            f"tfbn development server {_version()} (not TF Serving)\n"
            f"TensorFlow Library: {tf.__version__}"
        )
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _flags.log_ignored(args)
    # The thread pools must be sized before TensorFlow runs its first op.
    intra, inter = _loading.configure_threads(
        args.tensorflow_intra_op_parallelism,
        args.tensorflow_inter_op_parallelism,
        args.tensorflow_session_parallelism,
    )
    from tfbn.serving import _metrics, server

    models = server.models_from_flags(args.model_name, args.model_base_path, args.model_config_file)
    monitoring = (
        _metrics.load_monitoring_config(args.monitoring_config_file)
        if args.monitoring_config_file
        else None
    )
    load_options = _loading.LoadOptions(
        saved_model_tags=_flags.parse_saved_model_tags(args.saved_model_tags),
        prefer_tflite_model=args.prefer_tflite_model,
        enable_model_warmup=args.enable_model_warmup,
        num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        session_intra_op_threads=intra,
        session_inter_op_threads=inter,
    )
    try:
        return server.serve(
            models,
            port=args.port,
            rest_api_port=args.rest_api_port or None,
            host=args.host,
            batching=_batching(args),
            file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
            max_request_bytes=args.max_request_bytes,
            ready=lambda line: print(line, flush=True),
            max_num_load_retries=args.max_num_load_retries,
            load_retry_interval_micros=args.load_retry_interval_micros,
            rest_idle_timeout=args.rest_idle_timeout_seconds,
            rest_body_timeout=args.rest_body_timeout_seconds,
            grpc_workers=args.grpc_max_threads,
            grpc_socket_path=args.grpc_socket_path or None,
            grpc_channel_arguments=_flags.parse_grpc_channel_arguments(args.grpc_channel_arguments),
            rest_api_num_threads=args.rest_api_num_threads,
            rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
            monitoring=monitoring,
            load_options=load_options,
            allow_version_labels_for_unavailable_models=(
                args.allow_version_labels_for_unavailable_models
            ),
            model_config_file=args.model_config_file or None,
            model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
            enable_profiler=args.enable_profiler,
        )
    except server.ServingError as err:  # e.g. a version label no version can satisfy
        print(f"tfbn serve: Failed to start server. Error: {err}", file=sys.stderr)
        return 1


ENABLE_BATCHING = opt(
    "--enable_batching",
    type=_flag_bool,
    nargs="?",
    const=True,
    default=False,
    metavar="BOOL",
    help="emulate TF Serving's server-side batching",
)
BATCHING_PARAMETERS_FILE = opt(
    "--batching_parameters_file",
    metavar="FILE",
    help="BatchingParameters text proto (with --enable_batching)",
)

SERVE = Command(
    "serve",
    help="run the TF-Serving-protocol development server (not TF Serving)",
    description="A development server speaking TF Serving's gRPC and REST protocols over "
    "SavedModels, with every flag of tensorflow_model_server 2.21 (names and "
    "defaults); flags with no meaning here are accepted and logged once. For local "
    "checks and tests, not production. Binds 127.0.0.1 unless --host says "
    "otherwise. Needs the 'serving' extra.",
    # tensorflow_model_server's flags, from the one table in tfbn.serving._flags (TensorFlow-free)
    options=tuple(
        opt(option, deprecated=old, **kwargs)
        for option, kwargs, old in _serving_flags.argument_specs()
    ),
    run=_run_serve,
    validate=_validate_serve,
)


# Which live model a command talks to: the same options on every command that asks a server.
SERVED_MODEL = (
    one_of(
        opt("--rest", metavar="URL", help="TF Serving REST API, e.g. http://localhost:8501"),
        opt("--grpc", metavar="HOST:PORT", help="TF Serving gRPC API, e.g. localhost:8500"),
    ),
    opt("--model_name", help="served model name (with --rest / --grpc)"),
    one_of(
        opt(
            "--model-version",
            type=int,
            metavar="N",
            deprecated=("--model_version",),
            help="pin a version on the server",
        ),
        opt(
            "--model-version-label",
            metavar="LABEL",
            deprecated=("--model_version_label",),
            help="pin a version label on the server",
        ),
    ),
)


# --- check --------------------------------------------------------------------


def _validate_check(args) -> None:
    if args.rest is None and args.grpc is None:
        _positional_from_json(args, "model_path")
    _validate_batching(args)
    if args.grpc is not None:
        _require_extra("serving", "tfbn check --grpc")


USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError)


def _run_check(args) -> int:
    """0 invariant, 1 not invariant or the server failed/misbehaved, 2 used wrongly; the
    --json report is written in every case."""
    from tfbn.serving import invariance
    from tfbn.serving.client import TFServingError

    report, code, error = None, 2, None
    try:
        report = invariance.run_check(
            args.model_path,
            rest=args.rest,
            grpc=args.grpc,
            model_name=args.model_name,
            version=args.model_version,
            label=args.model_version_label,
            signature_name=args.signature_name,
            golden=args.golden,
            inputs_file=args.inputs_file,
            num_examples=args.num_examples,
            batch_sizes=args.batch_sizes,
            orders=args.orders,
            atol=args.atol,
            rtol=args.rtol,
            concurrent=args.concurrent,
            concurrent_rounds=args.concurrent_rounds,
            batching=_batching(args),
            timeout=args.timeout,
            seed=args.seed,
            allow_nonfinite=args.allow_nonfinite,
            max_batch_size=args.max_batch_size,
            progress=False if args.quiet else None,
        )
        code = 0 if report.ok else 1
    except (TFServingError, invariance.CheckError) as err:
        code, error = 1, f"the server failed: {err}"
    except USAGE_ERRORS as err:
        code, error = 2, f"error: {err}"
    if error is not None:
        print(f"tfbn check: {error}", file=sys.stderr)
    if args.json_path:
        doc = (
            report.to_dict()
            if report is not None
            else {
                "ok": False,
                "passed": False,
                "verdict": "server_error" if code == 1 else "usage_error",
                "summary": error,
                "error": error,
                "rows": [],
            }
        )
        doc["exit_code"] = code
        doc["compared"] = {
            "backend": "rest" if args.rest else "grpc" if args.grpc else "in-process",
            "target": args.rest or args.grpc or args.model_path,
            "model_name": args.model_name,
            "model_version": args.model_version,
            "model_version_label": args.model_version_label,
            "signature_name": args.signature_name,
            "golden": args.golden,
            "inputs": args.inputs_file,
        }
        _write_json(dumps(doc), args.json_path)
        if args.json_path == "-":
            return code
    if report is not None:
        print(report.format())
    return code


CHECK = Command(
    "check",
    help="check that predictions do not depend on the batch (deployment gate)",
    description="Re-runs the same examples in batches of several sizes and orders (and, with "
    "--concurrent, as simultaneous single-row requests) and compares every answer "
    "with the golden outputs (else the full-batch answer). Exits 0 if invariant, "
    "1 if not (or the server failed), 2 on bad usage. --grpc needs the 'serving' "
    "extra.",
    options=(
        opt(
            "model_path",
            nargs="?",
            help="SavedModel version directory or base path (in-process backend)",
        ),
        *SERVED_MODEL,
        opt(
            "--signature-name",
            default="serving_default",
            deprecated=("--signature_name",),
            help="signature to call (default serving_default)",
        ),
        opt(
            "--golden",
            metavar="PATH",
            help="golden .npz or version directory (default: the model's own)",
        ),
        opt("--inputs", dest="inputs_file", metavar="NPZ", help=".npz of named input arrays"),
        opt(
            "--num-examples",
            type=_positive_int,
            default=64,
            deprecated=("--num_examples",),
            help="synthetic examples when there is no golden file or --inputs (default 64)",
        ),
        opt(
            "--batch-sizes",
            type=_batch_sizes,
            default=(1, 2, 3, 7, None),
            deprecated=("--batch_sizes",),
            help="comma-separated, 'all' for one request (default 1,2,3,7,all)",
        ),
        opt("--orders", type=_positive_int, default=3, help="orders per batch size (default 3)"),
        opt(
            "--atol",
            type=float,
            default=0.0,
            help="absolute slack added to rtol * max|reference| (default 0)",
        ),
        opt(
            "--rtol",
            type=float,
            default=None,
            help="max |answer - reference| / max |reference| per output (default: the export "
            "gate's, from the golden file; else 1.95e-3 for float16 and 1.56e-2 for "
            "bfloat16 outputs; else 1e-4)",
        ),
        opt(
            "--allow-nonfinite",
            action="store_true",
            deprecated=("--allow_nonfinite",),
            help="count identical NaN/Inf answers as equal instead of failing",
        ),
        opt(
            "--max-batch-size",
            type=_positive_int,
            default=None,
            deprecated=("--max_batch_size",),
            help="largest request the server accepts (default: the batching parameters', or "
            "what the server says when it refuses a batch)",
        ),
        opt(
            "--concurrent",
            action="store_true",
            help="also send all examples as simultaneous single-row requests",
        ),
        opt(
            "--concurrent-rounds",
            type=_positive_int,
            default=1,
            deprecated=("--concurrent_rounds",),
            help="how many times to repeat the --concurrent burst (default 1)",
        ),
        ENABLE_BATCHING,
        BATCHING_PARAMETERS_FILE,
        opt("--timeout", type=float, default=10.0, help="seconds per request (default 10)"),
        opt(
            "--seed",
            type=int,
            default=0,
            help="seed for the orders and the synthetic examples (default 0)",
        ),
        JSON,
        _quiet("requests sent / planned"),
    ),
    run=_run_check,
    validate=_validate_check,
)


# --- inspect, lint --------------------------------------------------------------


def _validate_path(args) -> None:
    _positional_from_json(args, "path")
    if args.path is None:
        raise ValueError("PATH is required (a .keras file, a SavedModel directory or a base path)")


def _run_inspect(args) -> int:
    from tfbn import inspect

    if inspect.is_keras_model_file(args.path):
        report = inspect.inspect_model(args.path)
    else:
        report = inspect.lint_saved_model(args.path)
    _emit(report, args.json_path)
    return 0 if report.ok else 1


INSPECT = Command(
    "inspect",
    help="report on a model: BN statistics table (.keras) or training-mode lint (SavedModel)",
    description="For a .keras file: a table of every BatchNormalization layer (momentum, "
    "epsilon, batches tracked, min/median/max of moving mean, variance, gamma, "
    "beta) flagging never-updated statistics, NaN/Inf, dead channels and "
    "variance collapse. For a SavedModel directory (or TF Serving base path): "
    "BatchNorm in training mode, state updates and random ops on the serving "
    "path. Exit 0 if nothing was found, 1 otherwise, 2 on bad usage.",
    options=(
        opt("path", nargs="?", help="a .keras model file, a SavedModel directory or a base path"),
        JSON,
    ),
    run=_run_inspect,
    validate=_validate_path,
)


def _validate_lint(args) -> None:
    _validate_path(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer; got {args.batch_size}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be a positive integer; got {args.replicas}")


def _run_lint(args) -> int:
    from tfbn import inspect

    report = inspect.lint_model(args.path, batch_size=args.batch_size, strategy=args.replicas)
    _emit(report, args.json_path)
    return 0 if report.ok else 1


LINT = Command(
    "lint",
    help="find model wiring that keeps BatchNormalization from working (.keras)",
    description="Bias before BN, BN in/after recurrent layers, BN after dropout, and, "
    "given the training batch size, BN statistics over fewer than 8 examples "
    "per replica (unsynchronised BN under a strategy). Each finding says why "
    "and what to do. Exit 0 if nothing was found, 1 otherwise, 2 on bad usage.",
    options=(
        opt("path", nargs="?", help="a .keras model file"),
        opt(
            "--batch-size",
            type=int,
            deprecated=("--batch_size",),
            help="global training batch size (enables the small-batch checks)",
        ),
        opt(
            "--replicas",
            type=int,
            default=1,
            help="replicas in sync under a tf.distribute strategy (default 1)",
        ),
        JSON,
    ),
    run=_run_lint,
    validate=_validate_lint,
)


# --- export ---------------------------------------------------------------------


def _validate_export(args) -> None:
    if not os.path.isfile(args.model) or not args.model.endswith(".keras"):
        raise FileNotFoundError(f"MODEL must be an existing .keras file; got {args.model!r}")


def _run_export(args) -> int:
    import keras
    import numpy as np

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for loading
    from tfbn import export

    model = keras.saving.load_model(args.model, compile=False)
    samples = None
    if args.samples:
        data = np.load(args.samples)  # .npy: an array; .npz: arrays by input name
        samples = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else data
    try:
        result = export.export_saved_model(
            model, args.base_path, version=args.model_version, sample_inputs=samples,
            fold=args.fold, overwrite=args.overwrite, model_name=args.model_name, rtol=args.rtol,
            allow=args.allow, progress=False if args.quiet else None,
            statistics_signature=args.statistics_signature,
        )  # fmt: skip
    except export.ExportGateError as err:
        print(f"tfbn export: {err}", file=sys.stderr)
        _write_json(err.report.to_json(), args.json_path)  # the gate's report: what failed
        return 1
    _emit(result, args.json_path)
    return 0


EXPORT = Command(
    "export",
    help="export a .keras model as a TF Serving SavedModel version (BN folded, gated)",
    description="Folds BatchNorm into the preceding kernels (other BN frozen), writes "
    "BASE_PATH/VERSION/ with a serving_default signature named after the model's "
    "inputs and outputs, warm-up requests and a golden file, and renames it into "
    "place only after parity with Keras, batch-size invariance and the lint "
    "passed. Exit 0 on success, 1 if the gate failed (nothing written), 2 on bad "
    "usage.",
    options=(
        opt("model", help="a .keras model file"),
        opt("base_path", help="the model's base path (TF Serving model_base_path)"),
        opt(
            "--model-version",
            metavar="N",
            deprecated=("--version",),
            help="integer version in [0, 2**63 - 1], TF Serving's int64 (default: one more "
            "than the highest existing)",
        ),
        opt("--overwrite", action="store_true", help="replace an existing version"),
        opt(
            "--no-fold",
            dest="fold",
            action="store_false",
            help="export the model as it is (inference mode) instead of folding BN",
        ),
        opt(
            "--samples",
            metavar="FILE",
            help="sample inputs: .npy (one input) or .npz keyed by input name "
            "(default: N(0,1) rows)",
        ),
        opt(
            "--model_name",
            deprecated=("--model-name",),
            help="model name in the warm-up requests (default: base dir name)",
        ),
        opt(
            "--rtol",
            type=float,
            default=None,
            help="gate tolerance, max |export - reference| / max |reference| (default: the "
            "compute dtype's: 1e-4 float32, 1.95e-3 float16, 1.56e-2 bfloat16)",
        ),
        opt(
            "--allow",
            action="append",
            default=[],
            metavar="CHECK",
            help="lift one refusal (repeatable): never_updated, nonfinite, negative_variance "
            "(BN statistics) or nonfinite_outputs",
        ),
        opt(
            "--no-statistics-signature",
            dest="statistics_signature",
            action="store_false",
            help="leave out the BN statistics probe signatures used by `tfbn drift`",
        ),
        _quiet("the gate's steps"),
        JSON,
    ),
    run=_run_export,
    validate=_validate_export,
)


# --- drift, recalibrate ------------------------------------------------------------


def _validate_drift(args) -> None:
    if args.grpc is not None:
        _require_extra("serving", "tfbn drift --grpc")


def _run_drift(args) -> int:
    from tfbn.serving import drift
    from tfbn.serving.client import TFServingError

    try:
        report = drift.run_drift(
            args.model_path,
            inputs=args.inputs,
            rest=args.rest,
            grpc=args.grpc,
            model_name=args.model_name,
            version=args.model_version,
            label=args.model_version_label,
            keras_model=args.keras_model,
            batch_size=drift.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
            threshold=drift.DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
            timeout=args.timeout,
        )
    except TFServingError as err:
        print(
            f"tfbn drift: error: the server did not answer the statistics request: {err}",
            file=sys.stderr,
        )
        return 2
    _emit(report, args.json_path)
    if args.png_path:
        report.plot(args.png_path)
    return 1 if report.drift else 0


TRAFFIC = opt(
    "--inputs",
    nargs="+",
    required=True,
    metavar="FILE",
    help="traffic: .npz (arrays by input name), .npy (one-input models) or TFRecord "
    "PredictionLog files (warm-up file, request log)",
)

DRIFT = Command(
    "drift",
    help="do the BN running statistics still describe live traffic? (drift report)",
    description="Sends traffic to the export's tfbn_batch_norm_statistics signature (in "
    "process, or a live TF Serving over REST/gRPC), adds up every BN layer's input "
    "moments and compares them with its running statistics: per layer the mean "
    "|standardised shift|, the largest channels, the log variance ratio and a "
    "score (RMS over channels of sqrt(2 KL)); a layer drifts above --threshold. "
    "Exit 0 if the statistics describe the traffic, 1 on drift, 2 on bad usage or "
    "when nothing could be measured.",
    options=(
        opt(
            "model_path",
            nargs="?",
            metavar="MODEL",
            help="SavedModel version directory or base path, or a .keras model (in process)",
        ),
        *SERVED_MODEL,
        TRAFFIC,
        opt(
            "--keras",
            dest="keras_model",
            metavar="MODEL.keras",
            help="compute the statistics from this .keras model in process when the "
            "SavedModel / served model has no statistics signature",
        ),
        opt(
            "--batch-size",
            type=int,
            deprecated=("--batch_size",),
            help="examples per request (default tfbn.serving.drift.DEFAULT_BATCH_SIZE, 32)",
        ),
        opt(
            "--threshold",
            type=float,
            help="a layer drifts when its score exceeds this "
            "(default tfbn.serving.drift.DEFAULT_THRESHOLD, 0.5)",
        ),
        opt("--timeout", type=float, default=10.0, help="seconds per request (default 10)"),
        opt("--png", dest="png_path", metavar="PATH", help="also plot the report here"),
        JSON,
    ),
    run=_run_drift,
    validate=_validate_drift,
)


def _validate_recalibrate(args) -> None:
    _validate_export(args)
    if not args.out.endswith(".keras"):
        raise ValueError(f"--out must end in .keras; got {args.out!r}")


def _run_recalibrate(args) -> int:
    import keras

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for loading
    from tfbn.export import io_specs
    from tfbn.serving import drift

    model = keras.saving.load_model(args.model, compile=False)
    traffic = drift.load_traffic(args.inputs, list(io_specs(model)[0]))
    result = drift.recalibrate_on_traffic(model, traffic, args.batch_size)
    model.save(args.out)
    _emit(result, args.json_path)
    print(f"saved {args.out}", file=sys.stderr if args.json_path == "-" else sys.stdout)
    return 0


RECALIBRATE = Command(
    "recalibrate",
    help="set every BN layer's running statistics from traffic (precise BN) and save",
    description="Recomputes every BatchNormalization layer's moving mean and variance as the "
    "exact statistics of its inputs over the traffic (tfbn.recalibrate, one pass "
    "per layer in forward order, inference mode), and saves the model to --out. "
    "Export it as a new version with `tfbn export`. Exit 0 on success, 2 on bad "
    "usage.",
    options=(
        opt("model", help="a .keras model file"),
        TRAFFIC,
        opt("--out", required=True, metavar="NEW.keras", help="where to save the model"),
        opt(
            "--batch-size",
            type=_positive_int,
            default=64,
            deprecated=("--batch_size",),
            help="examples per batch (default 64)",
        ),
        JSON,
    ),
    run=_run_recalibrate,
    validate=_validate_recalibrate,
)


# --- gpu-check --------------------------------------------------------------------


def _run_gpu_check(args) -> int:
    from tfbn import gpu_check

    return gpu_check.run_from_args(args)


def _gpu_check_flags(parser: argparse.ArgumentParser) -> None:
    from tfbn import gpu_check  # TensorFlow-free at import: the checks import it when run

    gpu_check.add_arguments(parser)


GPU_CHECK = Command(
    "gpu-check",
    help="check tfbn's GPU assumptions on this machine's GPUs (PASS/FAIL table + JSON)",
    description="Fused vs unfused vs Keras on the GPU, cuDNN epsilon floor, NCCL sync parity "
    "and collective counts, XLA fit, benchmarks. Exit 0 without a GPU.",
    options=(),
    add_options=_gpu_check_flags,
    run=_run_gpu_check,
)


COMMANDS = (BENCH, SERVE, CHECK, INSPECT, LINT, EXPORT, DRIFT, RECALIBRATE, GPU_CHECK)


# --- the program ------------------------------------------------------------------


def _version() -> str:
    """The installed distribution's version, without importing tfbn's modules."""
    from importlib import metadata

    try:
        return metadata.version("tfbn")
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        from tfbn import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show TensorFlow's start-up and warning logs (hidden by default)",
    )
    parser = argparse.ArgumentParser(
        prog="tfbn",
        description="Batch Normalization for TensorFlow/Keras 3, to TF Serving.",
        parents=[common],
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"tfbn {_version()}",
        help="print tfbn's version and exit",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="run `tfbn COMMAND --help` for its options",
    )
    for command in COMMANDS:
        _add_command(sub, command, [common])
    return parser


def _quiet_tensorflow() -> None:
    """Import TensorFlow with its start-up logs hidden (restored on failure)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)  # C++ logs written before TF reads its log level
        try:
            import tensorflow as tf
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tf.get_logger().setLevel("ERROR")
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Runs `tfbn ARGV`; returns the exit code. A reader that closes the pipe early
    (`tfbn inspect --json - m.keras | head -1`) ends the command quietly, with the
    status of a process killed by SIGPIPE (141), as Unix tools do."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null so the final flush cannot fail again.
        with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.command_row
    try:
        if command.validate is not None:
            command.validate(args)
        if not getattr(args, "verbose", False):
            _quiet_tensorflow()
        return int(command.run(args) or 0)
    except MissingExtraError as err:
        print(f"tfbn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        extra = next(
            (e for e, mods in _EXTRAS.items() if (err.name or "").split(".")[0] in mods), None
        )
        if extra is None:
            raise
        print(
            f"tfbn {args.command}: error: {err.name} is not installed: pip install 'tfbn[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"tfbn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
