"""The `tfbn` command. Thin: each subcommand parses its flags, calls one library
function, prints its result and returns the exit code (0 ok, 1 findings/failure,
2 bad usage). Library modules are imported inside the handlers so `tfbn --help`
stays fast.

To add a subcommand: write `_add_<name>(subparsers)` that registers its flags and
sets `func`, and list it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys


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


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time tfbn against keras.layers.BatchNormalization and the raw fused op",
        description="Training-step and inference timings (medians, ratios vs tfbn, one run).",
    )
    p.add_argument("--shape", type=_shape, action="append", dest="shapes",
                   help="input shape (repeatable); default: the four README shapes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per implementation")
    p.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    _add_bench_sync_flags(p)
    p.set_defaults(func=_run_bench)


def _add_bench_sync_flags(p) -> None:
    p.add_argument("--sync", action="store_true",
                   help="synchronised BN under MirroredStrategy on logical CPU replicas: tfbn "
                        "sync/local vs Keras synchronized=True/local (--shape is per replica)")
    p.add_argument("--replicas", type=int, default=4,
                   help="with --sync or --model: logical CPU devices (replicas) to split the CPU into")
    p.add_argument("--model", dest="models", action="append",
                   help="whole-model training steps of this model (repeatable): resnet, "
                        "mobilenetv2 (small), resnet50, mobilenetv2_app, efficientnetb0 "
                        "(Keras Applications); single device and MirroredStrategy")
    p.add_argument("--batch", type=int, default=16, help="with --model: global batch size")
    p.add_argument("--single-only", action="store_true",
                   help="with --model: only the single-device table")


def _run_bench(args) -> int:
    from tfbn import bench

    if args.models:
        if args.replicas < 2 and not args.single_only:
            raise ValueError(f"--replicas must be at least 2. Received: {args.replicas}")
        if not args.single_only:
            bench.split_cpu(args.replicas)
        bench.main_model(tuple(m for ms in args.models for m in ms.split(",")), args.batch,
                         args.repeats, args.replicas, args.json_path, not args.single_only)
        return 0
    if args.sync:
        if args.replicas < 2:
            raise ValueError(f"--replicas must be at least 2. Received: {args.replicas}")
        bench.main_sync(tuple(args.shapes) if args.shapes else bench.SYNC_SHAPES,
                        args.repeats, args.replicas, args.json_path)
        return 0
    bench.main(tuple(args.shapes) if args.shapes else bench.DEFAULT_SHAPES,
               args.repeats, args.json_path)
    return 0


def _add_gpu_check(sub) -> None:
    from tfbn import gpu_check

    p = sub.add_parser(
        "gpu-check",
        help="check tfbn's GPU assumptions on this machine's GPUs (PASS/FAIL table + JSON)",
        description="Fused vs unfused vs Keras on the GPU, cuDNN epsilon floor, NCCL sync "
                    "parity and collective counts, XLA fit, benchmarks. Exit 0 without a GPU.",
    )
    gpu_check.add_arguments(p)
    p.set_defaults(func=gpu_check.run_from_args)


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
                f"batch sizes are positive integers or 'all', comma-separated; got {text!r}")
        sizes.append(size)
    return tuple(sizes)


def _add_serve(sub) -> None:
    from tfbn.serving import _flags

    p = sub.add_parser(
        "serve",
        help="run the TF-Serving-protocol development server (not TF Serving)",
        description="A development server speaking TF Serving's gRPC and REST protocols over "
                    "SavedModels, with every flag of tensorflow_model_server 2.21 (names and "
                    "defaults); flags with no meaning here are accepted and logged once. For "
                    "local checks and tests, not production. Binds 127.0.0.1 unless --host says "
                    "otherwise.",
    )
    _flags.add_arguments(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    import logging

    from tfbn.serving import _flags, _loading

    if args.version:
        import tensorflow as tf

        import tfbn

        print(f"tfbn development server {tfbn.__version__} (not TF Serving)\n"
              f"TensorFlow Library: {tf.__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _flags.log_ignored(args)
    # The thread pools must be sized before TensorFlow runs its first op.
    intra, inter = _loading.configure_threads(args.tensorflow_intra_op_parallelism,
                                              args.tensorflow_inter_op_parallelism,
                                              args.tensorflow_session_parallelism)
    from tfbn.serving import _config, _metrics, server

    models = server.models_from_flags(args.model_name, args.model_base_path, args.model_config_file)
    batching = None
    if args.enable_batching:
        batching = (_config.load_batching_parameters(args.batching_parameters_file)
                    if args.batching_parameters_file else _config.BatchingParameters())
    elif args.batching_parameters_file:
        raise ValueError("--batching_parameters_file is set without setting --enable_batching to true")
    monitoring = (_metrics.load_monitoring_config(args.monitoring_config_file)
                  if args.monitoring_config_file else None)
    load_options = _loading.LoadOptions(
        saved_model_tags=_flags.parse_saved_model_tags(args.saved_model_tags),
        prefer_tflite_model=args.prefer_tflite_model,
        enable_model_warmup=args.enable_model_warmup,
        num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        session_intra_op_threads=intra, session_inter_op_threads=inter)
    try:
        return _serve(server, args, models, batching, monitoring, load_options)
    except server.ServingError as err:  # e.g. a version label no version can satisfy
        print(f"tfbn serve: Failed to start server. Error: {err}", file=sys.stderr)
        return 1


def _serve(server, args, models, batching, monitoring, load_options) -> int:
    from tfbn.serving import _flags

    return server.serve(
        models, port=args.port, rest_api_port=args.rest_api_port or None,
        host=args.host, batching=batching,
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
        monitoring=monitoring, load_options=load_options,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        model_config_file=args.model_config_file or None,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        enable_profiler=args.enable_profiler)


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check that predictions do not depend on the batch (deployment gate)",
        description="Re-runs the same examples in batches of several sizes and orders (and, with "
                    "--concurrent, as simultaneous single-row requests) and compares every answer "
                    "with the golden outputs (else the full-batch answer). Exits 0 if invariant, "
                    "1 if not (or the server failed), 2 on bad usage.",
    )
    p.add_argument("model_path", nargs="?",
                   help="SavedModel version directory or base path (in-process backend)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--rest", metavar="URL", help="TF Serving REST API, e.g. http://localhost:8501")
    where.add_argument("--grpc", metavar="HOST:PORT", help="TF Serving gRPC API, e.g. localhost:8500")
    p.add_argument("--model_name", help="served model name (with --rest / --grpc)")
    version = p.add_mutually_exclusive_group()
    version.add_argument("--model_version", type=int, help="pin a version on the server")
    version.add_argument("--model_version_label", help="pin a version label on the server")
    p.add_argument("--signature_name", default="serving_default")
    p.add_argument("--golden", help="golden .npz or version directory (default: the model's own)")
    p.add_argument("--inputs", dest="inputs_file", help=".npz of named input arrays")
    p.add_argument("--num_examples", type=int, default=64,
                   help="synthetic examples when there is no golden file or --inputs (default 64)")
    p.add_argument("--batch_sizes", type=_batch_sizes, default=(1, 2, 3, 7, None),
                   help="comma-separated, 'all' for one request (default 1,2,3,7,all)")
    p.add_argument("--orders", type=int, default=3, help="orders per batch size (default 3)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="absolute slack added to rtol * max|reference| (default 0)")
    p.add_argument("--rtol", type=float, default=None,
                   help="max |answer - reference| / max |reference| per output (default: the "
                        "export gate's, from the golden file; else 1.95e-3 for float16 and "
                        "1.56e-2 for bfloat16 outputs; else 1e-4)")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="count identical NaN/Inf answers as equal instead of failing")
    p.add_argument("--max_batch_size", type=int, default=None,
                   help="largest request the server accepts (default: the batching "
                        "parameters', or what the server says when it refuses a batch)")
    p.add_argument("--concurrent", action="store_true",
                   help="also send all examples as simultaneous single-row requests")
    p.add_argument("--concurrent_rounds", type=int, default=1)
    p.add_argument("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False,
                   help="in-process backend only: emulate TF Serving's server-side batching")
    p.add_argument("--batching_parameters_file", help="BatchingParameters text proto")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path",
                   help="also write the report as JSON here (always, failures included)")
    _add_quiet_flag(p, "requests sent / planned")
    p.set_defaults(func=_run_check)


def _add_quiet_flag(p, what: str) -> None:
    p.add_argument("--quiet", action="store_true",
                   help=f"no progress on stderr ({what}; shown after 2 s, only on a terminal)")


USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError)


def _run_check(args) -> int:
    """0 invariant, 1 not invariant or the server failed/misbehaved, 2 used wrongly; the
    --json report is written in every case."""
    import json

    report, code, error = None, 2, None
    try:
        from tfbn.serving import _config, invariance
        from tfbn.serving.client import TFServingError

        batching = None
        if args.enable_batching:
            batching = (_config.load_batching_parameters(args.batching_parameters_file)
                        if args.batching_parameters_file else _config.BatchingParameters())
        elif args.batching_parameters_file:
            raise ValueError("--batching_parameters_file needs --enable_batching")
        report = invariance.run_check(
            args.model_path, rest=args.rest, grpc=args.grpc, model_name=args.model_name,
            version=args.model_version, label=args.model_version_label,
            signature_name=args.signature_name, golden=args.golden, inputs_file=args.inputs_file,
            num_examples=args.num_examples, batch_sizes=args.batch_sizes, orders=args.orders,
            atol=args.atol, rtol=args.rtol, concurrent=args.concurrent,
            concurrent_rounds=args.concurrent_rounds, batching=batching, timeout=args.timeout,
            seed=args.seed, allow_nonfinite=args.allow_nonfinite,
            max_batch_size=args.max_batch_size, progress=False if args.quiet else None)
        code = 0 if report.passed else 1
    except (TFServingError, invariance.CheckError) as err:
        code, error = 1, f"the server failed: {err}"
    except USAGE_ERRORS as err:
        code, error = 2, f"error: {err}"
    if error is not None:
        print(f"tfbn check: {error}", file=sys.stderr)
    else:
        print(report.table())
    if args.json_path:
        doc = report.to_dict() if report is not None else {
            "passed": False, "verdict": "server_error" if code == 1 else "usage_error",
            "summary": error, "error": error, "rows": []}
        doc["exit_code"] = code
        doc["compared"] = {
            "backend": "rest" if args.rest else "grpc" if args.grpc else "in-process",
            "target": args.rest or args.grpc or args.model_path, "model_name": args.model_name,
            "model_version": args.model_version, "model_version_label": args.model_version_label,
            "signature_name": args.signature_name, "golden": args.golden,
            "inputs": args.inputs_file}
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    return code


def _add_json_flag(p) -> None:
    p.add_argument("--json", dest="json_path", nargs="?", const="-", metavar="PATH",
                   help="print the report as JSON instead of the table (--json), "
                        "or also write it to PATH (--json PATH)")


def _emit(report, json_path: str | None) -> None:
    if json_path == "-":
        print(report.to_json())
        return
    print(report.format() if hasattr(report, "format") else report.table())
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(report.to_json())


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="report on a model: BN statistics table (.keras) or training-mode lint (SavedModel)",
        description="For a .keras file: a table of every BatchNormalization layer (momentum, "
                    "epsilon, batches tracked, min/median/max of moving mean, variance, gamma, "
                    "beta) flagging never-updated statistics, NaN/Inf, dead channels and "
                    "variance collapse. For a SavedModel directory (or TF Serving base path): "
                    "BatchNorm in training mode, state updates and random ops on the serving "
                    "path. Exit 0 if nothing was found, 1 otherwise, 2 on bad usage.",
    )
    p.add_argument("path", help="a .keras model file, a SavedModel directory or a base path")
    _add_json_flag(p)
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from tfbn import inspect

    if inspect.is_keras_model_file(args.path):
        report = inspect.inspect_model(args.path)
    else:
        report = inspect.lint_saved_model(args.path)
    _emit(report, args.json_path)
    return 0 if report.ok else 1


def _add_lint(sub) -> None:
    p = sub.add_parser(
        "lint",
        help="find model wiring that keeps BatchNormalization from working (.keras)",
        description="Bias before BN, BN in/after recurrent layers, BN after dropout, and, "
                    "given the training batch size, BN statistics over fewer than 8 examples "
                    "per replica (unsynchronised BN under a strategy). Each finding says why "
                    "and what to do. Exit 0 if nothing was found, 1 otherwise, 2 on bad usage.",
    )
    p.add_argument("path", help="a .keras model file")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help="global training batch size (enables the small-batch checks)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas in sync under a tf.distribute strategy (default 1)")
    _add_json_flag(p)
    p.set_defaults(func=_run_lint)


def _run_lint(args) -> int:
    from tfbn import inspect

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer; got {args.batch_size}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be a positive integer; got {args.replicas}")
    report = inspect.lint_model(args.path, batch_size=args.batch_size, strategy=args.replicas)
    _emit(report, args.json_path)
    return 0 if report.ok else 1


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a .keras model as a TF Serving SavedModel version (BN folded, gated)",
        description="Folds BatchNorm into the preceding kernels (other BN frozen), writes "
                    "BASE_PATH/VERSION/ with a serving_default signature named after the model's "
                    "inputs and outputs, warm-up requests and a golden file, and renames it into "
                    "place only after parity with Keras, batch-size invariance and the lint "
                    "passed. Exit 0 on success, 1 if the gate failed (nothing written), 2 on bad "
                    "usage.",
    )
    p.add_argument("model", help="a .keras model file")
    p.add_argument("base_path", help="the model's base path (TF Serving model_base_path)")
    p.add_argument("--version", dest="model_version", metavar="N",
                   help="integer version in [0, 2**63 - 1], TF Serving's int64 (default: one "
                        "more than the highest existing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="export the model as it is (inference mode) instead of folding BN")
    p.add_argument("--samples", metavar="FILE",
                   help="sample inputs: .npy (one input) or .npz keyed by input name "
                        "(default: N(0,1) rows)")
    p.add_argument("--model-name", help="model name in the warm-up requests (default: base dir name)")
    p.add_argument("--rtol", type=float, default=None,
                   help="gate tolerance, max |export - reference| / max |reference| (default: "
                        "the compute dtype's: 1e-4 float32, 1.95e-3 float16, 1.56e-2 bfloat16)")
    p.add_argument("--allow", action="append", default=[], metavar="CHECK",
                   help="lift one refusal (repeatable): never_updated, nonfinite, "
                        "negative_variance (BN statistics) or nonfinite_outputs")
    _add_quiet_flag(p, "the gate's steps")
    p.add_argument("--no-statistics-signature", dest="statistics_signature", action="store_false",
                   help="leave out the BN statistics probe signatures used by `tfbn drift`")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import keras
    import numpy as np

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for loading
    from tfbn import export

    if not os.path.isfile(args.model) or not args.model.endswith(".keras"):
        raise FileNotFoundError(f"MODEL must be an existing .keras file; got {args.model!r}")
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
        return 1
    print(result.format())
    return 0


def _add_drift(sub) -> None:
    p = sub.add_parser(
        "drift",
        help="do the BN running statistics still describe live traffic? (drift report)",
        description="Sends traffic to the export's tfbn_batch_norm_statistics signature (in "
                    "process, or a live TF Serving over REST/gRPC), adds up every BN layer's input "
                    "moments and compares them with its running statistics: per layer the mean "
                    "|standardised shift|, the largest channels, the log variance ratio and a "
                    "score (RMS over channels of sqrt(2 KL)); a layer drifts above --threshold. "
                    "Exit 0 if the statistics describe the traffic, 1 on drift, 2 on bad usage or "
                    "when nothing could be measured.",
    )
    p.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="SavedModel version directory or base path, or a .keras model (in process)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--rest", metavar="URL", help="TF Serving REST API, e.g. http://localhost:8501")
    where.add_argument("--grpc", metavar="HOST:PORT", help="TF Serving gRPC API, e.g. localhost:8500")
    p.add_argument("--model_name", help="served model name (with --rest / --grpc)")
    version = p.add_mutually_exclusive_group()
    version.add_argument("--model_version", type=int, help="pin a version on the server")
    version.add_argument("--model_version_label", help="pin a version label on the server")
    p.add_argument("--inputs", nargs="+", required=True, metavar="FILE",
                   help="traffic: .npz (arrays by input name), .npy (one-input models) or "
                        "TFRecord PredictionLog files (warm-up file, request log)")
    p.add_argument("--keras", dest="keras_model", metavar="MODEL.keras",
                   help="compute the statistics from this .keras model in process when the "
                        "SavedModel / served model has no statistics signature")
    p.add_argument("--batch_size", type=int,
                   help="examples per request (default tfbn.serving.drift.DEFAULT_BATCH_SIZE, 32)")
    p.add_argument("--threshold", type=float,
                   help="a layer drifts when its score exceeds this "
                        "(default tfbn.serving.drift.DEFAULT_THRESHOLD, 0.5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--png", dest="png_path", metavar="PATH", help="also plot the report here")
    _add_json_flag(p)
    p.set_defaults(func=_run_drift)


def _run_drift(args) -> int:
    from tfbn.serving import drift
    from tfbn.serving.client import TFServingError

    try:
        report = drift.run_drift(
            args.model_path, inputs=args.inputs, rest=args.rest, grpc=args.grpc,
            model_name=args.model_name, version=args.model_version,
            label=args.model_version_label, keras_model=args.keras_model,
            batch_size=drift.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
            threshold=drift.DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
            timeout=args.timeout)
    except TFServingError as err:
        print(f"tfbn drift: error: the server did not answer the statistics request: {err}",
              file=sys.stderr)
        return 2
    _emit(report, args.json_path)
    if args.png_path:
        report.plot(args.png_path)
    return 1 if report.drift else 0


def _add_recalibrate(sub) -> None:
    p = sub.add_parser(
        "recalibrate",
        help="set every BN layer's running statistics from traffic (precise BN) and save",
        description="Recomputes every BatchNormalization layer's moving mean and variance as the "
                    "exact statistics of its inputs over the traffic (tfbn.recalibrate, one pass "
                    "per layer in forward order, inference mode), and saves the model to --out. "
                    "Export it as a new version with `tfbn export`. Exit 0 on success, 2 on bad "
                    "usage.",
    )
    p.add_argument("model", help="a .keras model file")
    p.add_argument("--inputs", nargs="+", required=True, metavar="FILE",
                   help="traffic: .npz (arrays by input name), .npy or TFRecord PredictionLog files")
    p.add_argument("--out", required=True, metavar="NEW.keras", help="where to save the model")
    p.add_argument("--batch_size", type=int, default=64, help="examples per batch (default 64)")
    p.set_defaults(func=_run_recalibrate)


def _run_recalibrate(args) -> int:
    import keras

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for loading
    from tfbn.serving import drift

    if not os.path.isfile(args.model) or not args.model.endswith(".keras"):
        raise FileNotFoundError(f"MODEL must be an existing .keras file; got {args.model!r}")
    if not args.out.endswith(".keras"):
        raise ValueError(f"--out must end in .keras; got {args.out!r}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer; got {args.batch_size}")
    model = keras.saving.load_model(args.model, compile=False)
    from tfbn.export import io_specs

    traffic = drift.load_traffic(args.inputs, list(io_specs(model)[0]))
    result = drift.recalibrate_on_traffic(model, traffic, args.batch_size)
    model.save(args.out)
    print(f"{result}\nsaved {args.out}")
    return 0


SUBCOMMANDS = (
    _add_bench, _add_serve, _add_check, _add_inspect, _add_lint, _add_export, _add_gpu_check,
    _add_drift, _add_recalibrate,
)


def build_parser() -> argparse.ArgumentParser:
    from tfbn import __version__

    parser = argparse.ArgumentParser(
        prog="tfbn", description="Batch Normalization for TensorFlow/Keras 3, to TF Serving."
    )
    parser.add_argument("--version", action="version", version=f"tfbn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"tfbn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
