"""SavedModel export for TF Serving: frozen/folded BatchNorm, atomic versions, a parity gate.

`export_saved_model(model, base_path)` writes `<base_path>/<version>/` exactly as
TF Serving's file-system source loads it:

1. The model is rewritten for inference (`tfbn.convert.fold_batch_norm`: BN folded
   into the preceding kernels, any other BN frozen), unless `fold=False`.
2. It is saved through a `tf.Module` with explicit signatures (as TF Model Garden
   does): `serving_default` (method `tensorflow/serving/predict`) with the model's
   own input and output names, a dynamic batch dimension, calling the model with
   `training=False`; plus optional extra signatures.
3. `assets.extra/tf_serving_warmup_requests` (PredictionLog records TF Serving
   replays on load) and `assets.extra/tfbn_golden.npz` (sample inputs and the
   expected outputs, read by the serving check) are written next to it.
4. The gate: the SavedModel is reloaded in-process and must (a) match the Keras
   model called with `training=False`, (b) give the same rows for the full sample
   batch, batches of 1 and batches of 3, (c) pass `tfbn.inspect.lint_saved_model`.

Everything happens in a temporary non-numeric directory under `base_path`, which
TF Serving ignores; only a SavedModel that passed the gate is renamed to its
integer version, so a polling server never sees a half-written or unchecked
version. Bad input raises before anything is written.

Golden file contract (`<version>/assets.extra/tfbn_golden.npz`): a NumPy .npz with
arrays `inputs/<input name>` and `outputs/<output name>`, named as in the
`serving_default` signature and in its dtypes, one sample per row (axis 0). The
outputs are the Keras model's, `model(inputs, training=False)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from tfbn import _compat, convert
from tfbn.inspect import SavedModelReport, lint_saved_model

SERVING_KEY = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
GOLDEN_FILE = "tfbn_golden.npz"
TMP_PREFIX = ".tfbn-export-"
DEFAULT_NUM_SAMPLES = 8
DEFAULT_RTOL = 1e-4
INVARIANCE_BATCH_SIZES = (1, 3)


class ExportGateError(RuntimeError):
    """The exported SavedModel failed the gate; nothing was left in the base path."""

    def __init__(self, report: GateReport):
        super().__init__(f"export gate failed, nothing written:\n{report.format()}")
        self.report = report


@dataclass
class GateReport:
    """The checks a SavedModel passed (or not) before it became a version."""

    rtol: float
    parity: dict[str, float] = field(default_factory=dict)
    invariance: dict[str, dict[int, float]] = field(default_factory=dict)
    lint: SavedModelReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = []
        for name, err in self.parity.items():
            lines.append(f"parity with Keras (training=False), '{name}': max rel. error {err:.2e}")
        for name, errs in self.invariance.items():
            got = ", ".join(f"batches of {b}: {e:.2e}" for b, e in errs.items())
            lines.append(f"batch-size invariance, '{name}': {got}")
        if self.lint is not None:
            lines.append(
                "lint: " + ("OK" if self.lint.ok else f"{len(self.lint.findings)} finding(s)")
            )
        lines.append(f"tolerance (max rel. error): {self.rtol:.0e}")
        if self.problems:
            lines.append("FAILED:")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class ExportResult:
    """Where the version went, what was folded, and the gate it passed."""

    path: str
    version: int
    inputs: dict[str, tuple]
    outputs: dict[str, tuple]
    fold_report: convert.FoldReport | None
    gate: GateReport

    @property
    def nothing_folded(self) -> bool:
        return self.fold_report is None or self.fold_report.nothing_folded

    def format(self) -> str:
        fold = "not folded (fold=False)" if self.fold_report is None else str(self.fold_report)
        sig = lambda d: ", ".join(f"{k} {list(v)}" for k, v in d.items())  # noqa: E731
        return "\n".join(
            [
                f"exported version {self.version} to {self.path}",
                f"signature {SERVING_KEY}: inputs {sig(self.inputs)} -> outputs {sig(self.outputs)}",
                fold,
                self.gate.format(),
            ]
        )

    __str__ = format


# ----------------------------------------------------------------- helpers --


def _graph(model: keras.Model):
    return model._functional if isinstance(model, keras.Sequential) else model


def _check_model(model) -> None:
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    if not model.built or (
        isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is None
    ):
        raise ValueError(
            f"Model '{model.name}' is not built: give it an Input (keras.Input(shape)) or "
            "call model.build(input_shape) before exporting."
        )
    if not isinstance(_graph(model), Functional):
        raise ValueError(
            "export_saved_model needs a Sequential or Functional model (its inputs name "
            f"the signature). Received: {type(model).__name__}"
        )


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}_{n}")
    return out


def io_specs(model: keras.Model) -> tuple[dict[str, tf.TensorSpec], list[str]]:
    """The serving signature of a model: `{input name: spec (batch dim None)}` and
    the output names, the model's own (input layer names, output layer names or
    the keys of dict inputs/outputs)."""
    graph = _graph(model)
    if isinstance(graph._inputs_struct, dict):
        inputs = dict(graph._inputs_struct)
    else:
        inputs = {kt._keras_history.operation.name: kt for kt in graph.inputs}
    if isinstance(graph._outputs_struct, dict):
        out_names = list(graph._outputs_struct)
    else:
        out_names = _unique(list(graph.output_names))
    specs = {}
    for name, kt in inputs.items():
        shape = (None,) + tuple(kt.shape[1:])
        specs[name] = tf.TensorSpec(shape, tf.as_dtype(kt.dtype), name=name)
    return specs, out_names


def _channels_first(model: keras.Model) -> bool:
    layers = model._flatten_layers(include_self=False, recursive=True)
    return any(getattr(layer, "data_format", None) == "channels_first" for layer in layers)


def _check_shapes(model, specs, have_samples: bool) -> None:
    channel_axis = 1 if _channels_first(model) else -1
    for name, spec in specs.items():
        dims = spec.shape.as_list()
        if len(dims) >= 2 and dims[channel_axis] is None:
            raise ValueError(
                f"Input '{name}' has an unknown channel dimension (shape {tuple(dims)}, channel "
                f"axis {channel_axis}); BatchNorm and folding need it. Give the model an Input "
                "with a known channel dimension."
            )
        if not have_samples and any(d is None for d in dims[1:]):
            raise ValueError(
                f"Input '{name}' has unknown dimensions (shape {tuple(dims)}), so sample inputs "
                "cannot be generated. Pass sample_inputs= (a batch of real inputs)."
            )


def _validate_version(version) -> int | None:
    if version is None:
        return None
    if isinstance(version, str) and version.strip().isdigit():
        version = int(version.strip())
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(
            "`version` must be a non-negative integer (TF Serving loads integer version "
            f"directories) or None for the next one. Received: version={version!r}"
        )
    return int(version)


def _existing_versions(base_path: str) -> list[int]:
    if not os.path.isdir(base_path):
        return []
    return sorted(
        int(d)
        for d in os.listdir(base_path)
        if d.isdigit() and os.path.isdir(os.path.join(base_path, d))
    )


def _check_target(base_path: str, version: int, overwrite: bool) -> None:
    if os.path.exists(base_path) and not os.path.isdir(base_path):
        raise FileExistsError(f"`base_path` {base_path!r} exists and is not a directory")
    existing = base_path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write under {existing!r} (for base_path={base_path!r})")
    target = os.path.join(base_path, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(
            f"Version {version} already exists at {target!r}; pass overwrite=True "
            "(CLI: --overwrite) to replace it, or version=None for the next version."
        )


def _samples(specs, sample_inputs, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    if sample_inputs is None:
        rng = np.random.default_rng(seed)
        out = {}
        for name, spec in specs.items():
            shape = (num_samples, *spec.shape[1:])
            if spec.dtype.is_floating:
                out[name] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
            else:
                out[name] = np.zeros(shape, spec.dtype.as_numpy_dtype)
        return out
    if isinstance(sample_inputs, Mapping):
        missing = set(specs) - set(sample_inputs)
        if missing:
            raise ValueError(
                f"`sample_inputs` lacks input(s) {sorted(missing)}; expected keys {list(specs)}. "
                f"Received keys: {list(sample_inputs)}"
            )
        values = [sample_inputs[name] for name in specs]
    elif isinstance(sample_inputs, (list, tuple)) and len(specs) > 1:
        values = list(sample_inputs)
    else:
        values = [sample_inputs]
    if len(values) != len(specs):
        raise ValueError(
            f"`sample_inputs` must give {len(specs)} arrays (inputs {list(specs)}). "
            f"Received: {len(values)}"
        )
    out = {}
    for (name, spec), value in zip(specs.items(), values, strict=True):
        array = np.asarray(value).astype(spec.dtype.as_numpy_dtype)
        if not spec.shape.is_compatible_with(array.shape):
            raise ValueError(
                f"Sample input '{name}' has shape {array.shape}; the model expects "
                f"{tuple(spec.shape.as_list())}."
            )
        out[name] = array
    rows = {a.shape[0] for a in out.values()}
    if len(rows) != 1 or min(rows) < 2:
        raise ValueError(
            "`sample_inputs` must hold the same number (>= 2) of rows for every input, to "
            f"check batch-size invariance. Received rows: {sorted(rows)}"
        )
    return out


def _pack(model: keras.Model, specs, tensors: list):
    graph = _graph(model)
    if isinstance(graph._inputs_struct, dict):
        return dict(zip(specs, tensors, strict=True))
    return tensors[0] if len(tensors) == 1 else list(tensors)


def _named_outputs(model: keras.Model, out_names: list[str], outputs) -> dict:
    if isinstance(outputs, Mapping):
        return {name: outputs[name] for name in out_names}
    return dict(zip(out_names, keras.tree.flatten(outputs), strict=True))


class _ServingModule(tf.Module):
    """What is saved: the model, its variables and the serving functions."""

    def __init__(self, model: keras.Model, specs, out_names):
        super().__init__()
        self.model = model
        self.model_variables = [getattr(v, "value", v) for v in model.variables]

        def serve(*tensors):
            outputs = model(_pack(model, specs, list(tensors)), training=False)
            return _named_outputs(model, out_names, outputs)

        self.serve = tf.function(serve, input_signature=list(specs.values()), autograph=False)


def _extra_concrete(name, fn, serving_model):
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        return fn
    if isinstance(fn, tf.types.experimental.PolymorphicFunction):
        try:
            return fn.get_concrete_function()
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Extra signature '{name}' is a tf.function without an input_signature: {err}"
            ) from err
    if callable(fn):
        return _extra_concrete(name, fn(serving_model), None)
    raise TypeError(
        f"Extra signature '{name}' must be a ConcreteFunction, a tf.function with an "
        "input_signature, or a callable taking the exported model and returning one. "
        f"Received: {type(fn).__name__}"
    )


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 for exact equality; inf on shape mismatch)."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(got - want)
    if not np.all(np.isfinite(diff)):
        return 0.0 if np.array_equal(got, want, equal_nan=True) else float("inf")
    scale = np.max(np.abs(want), initial=0.0)
    worst = np.max(diff, initial=0.0)
    return 0.0 if worst == 0 else float(worst / max(scale, np.finfo(np.float32).tiny))


def _tolerance(rtol: float, dtypes) -> float:
    low = any(tf.as_dtype(d) in (tf.float16, tf.bfloat16) for d in dtypes)
    return max(rtol, 1e-2) if low else rtol


def _write_warmup(path: str, model_name: str, samples: dict[str, np.ndarray]) -> None:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rows = next(iter(samples.values())).shape[0]
    with tf.io.TFRecordWriter(path) as writer:
        for batch in sorted({1, rows}):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SERVING_KEY)
            )
            for name, array in samples.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(array[:batch]))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def _gate(export_dir, samples, reference, out_names, rtol) -> GateReport:
    report = GateReport(rtol=rtol)
    loaded = tf.saved_model.load(export_dir)
    if SERVING_KEY not in loaded.signatures:
        report.problems.append(f"no '{SERVING_KEY}' signature in the reloaded SavedModel")
        return report
    fn = loaded.signatures[SERVING_KEY]

    def predict(lo, hi):
        result = fn(**{k: tf.constant(v[lo:hi]) for k, v in samples.items()})
        return {k: result[k].numpy() for k in out_names}

    rows = next(iter(samples.values())).shape[0]
    full = predict(0, rows)
    for name in out_names:
        err = _rel_error(full[name], reference[name])
        report.parity[name] = err
        if not err <= rtol:
            report.problems.append(
                f"output '{name}' differs from model(x, training=False): max rel. error {err:.2e}"
            )
    for size in INVARIANCE_BATCH_SIZES:
        parts = [predict(lo, lo + size) for lo in range(0, rows, size)]
        for name in out_names:
            err = _rel_error(np.concatenate([p[name] for p in parts]), full[name])
            report.invariance.setdefault(name, {})[size] = err
            if not err <= rtol:
                report.problems.append(
                    f"output '{name}' changes with the batch: batches of {size} vs the full batch "
                    f"of {rows} differ by max rel. error {err:.2e} (batch statistics in inference?)"
                )
    report.lint = lint_saved_model(export_dir)
    report.problems += [f"lint: {f}" for f in report.lint.findings]
    return report


# ------------------------------------------------------------------ export --


def export_saved_model(
    model: keras.Model,
    base_path: str | os.PathLike,
    version: int | None = None,
    sample_inputs=None,
    fold: bool = True,
    overwrite: bool = False,
    extra_signatures: Mapping[str, Callable] | None = None,
    model_name: str | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> ExportResult:
    """Exports `model` as `<base_path>/<version>/` for TF Serving, after a parity gate.

    Args:
        model: A built Sequential or Functional Keras model.
        base_path: The model's base path (TF Serving's `model_base_path`).
        version: Integer version, or None for one more than the highest existing.
        sample_inputs: Inputs for the gate, the golden file and the warm-up
            requests: an array (one input), a list in input order or a dict by input
            name, >= 2 rows. None draws `num_samples` rows from N(0, 1) (needs fully
            known input shapes).
        fold: Fold BN into the preceding kernels (`tfbn.convert.fold_batch_norm`;
            other BN frozen). False exports the model as it is, in inference mode.
        overwrite: Replace an existing version directory.
        extra_signatures: `{name: fn}` exported next to `serving_default`; `fn` is a
            ConcreteFunction, a tf.function with an input_signature, or a callable
            taking the exported (folded) Keras model and returning one of those.
            They are linted like `serving_default`.
        model_name: The name in the warm-up requests' ModelSpec (default: the base
            path's directory name).
        num_samples: Rows drawn when `sample_inputs` is None.
        rtol: Gate tolerance, for parity (max |SavedModel - Keras| / max |Keras|
            per output) and batch-size invariance alike; at least 1e-2 for
            float16/bfloat16 outputs. The default, 1e-4, is float32 rounding of a
            deep network (a ResNet50 with random statistics measured 1e-5 for the
            fold and 2.4e-5 between batch 1 and batch 8, from the convolution
            kernels TensorFlow picks per batch size) with room to spare, and
            orders of magnitude below what batch statistics do (~1).
        seed: Seed of the drawn sample inputs.

    Returns:
        An `ExportResult` (`result.fold_report` says what was folded).

    Raises:
        ValueError, TypeError: bad model, version or sample inputs (nothing written).
        FileExistsError, PermissionError: the target exists or is not writable.
        ExportGateError: the SavedModel failed the gate (nothing left behind).
    """
    _check_model(model)
    version = _validate_version(version)
    base_path = os.path.abspath(os.fspath(base_path))
    if os.path.exists(base_path) and not os.path.isdir(base_path):
        raise FileExistsError(f"`base_path` {base_path!r} exists and is not a directory")
    if version is None:
        version = (_existing_versions(base_path) or [0])[-1] + 1
    _check_target(base_path, version, overwrite)
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"`num_samples` must be an integer >= 2. Received: {num_samples!r}")
    specs, out_names = io_specs(model)
    _check_shapes(model, specs, sample_inputs is not None)
    samples = _samples(specs, sample_inputs, num_samples, seed)
    extra_signatures = dict(extra_signatures or {})
    if SERVING_KEY in extra_signatures:
        raise ValueError(f"`extra_signatures` must not redefine '{SERVING_KEY}'")

    fold_report = None
    serving_model = model
    if fold:
        serving_model, fold_report = convert.fold_batch_norm(model, return_report=True)
    reference = _named_outputs(
        model, out_names, model(_pack(model, specs, [tf.constant(v) for v in samples.values()]),
                                training=False)
    )  # fmt: skip
    reference = {k: keras.ops.convert_to_numpy(v) for k, v in reference.items()}

    module = _ServingModule(serving_model, specs, out_names)
    serve = module.serve.get_concrete_function()
    out_specs = {k: serve.structured_outputs[k] for k in out_names}
    signatures = {SERVING_KEY: serve}
    for name, fn in extra_signatures.items():
        signatures[name] = _extra_concrete(name, fn, serving_model)
    module.extra_functions = list(signatures.values())[1:]
    if extra_signatures:
        module.source_model = model  # extra functions may close over the original model

    first_created = None  # the highest directory this export creates, removed on failure
    probe = base_path
    while not os.path.exists(probe):
        first_created, probe = probe, os.path.dirname(probe)
    os.makedirs(base_path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=base_path)
    target = os.path.join(base_path, str(version))
    try:
        export_dir = os.path.join(tmp, "model")
        tf.saved_model.save(module, export_dir, signatures=signatures)
        extra_dir = os.path.join(export_dir, ASSETS_EXTRA)
        os.makedirs(extra_dir, exist_ok=True)
        _write_warmup(
            os.path.join(extra_dir, WARMUP_FILE),
            model_name or os.path.basename(base_path),
            samples,
        )
        golden = {f"inputs/{k}": v for k, v in samples.items()}
        golden.update(
            {
                f"outputs/{k}": reference[k].astype(out_specs[k].dtype.as_numpy_dtype)
                for k in out_names
            }
        )
        np.savez(os.path.join(extra_dir, GOLDEN_FILE), **golden)
        tol = _tolerance(rtol, [s.dtype for s in out_specs.values()])
        gate = _gate(export_dir, samples, reference, out_names, tol)
        if not gate.ok:
            raise ExportGateError(gate)
        if os.path.exists(target):
            if not overwrite:
                raise FileExistsError(f"Version directory {target!r} appeared during the export")
            old = os.path.join(tmp, "replaced")
            os.rename(target, old)
        os.rename(export_dir, target)
    except BaseException:
        old = os.path.join(tmp, "replaced")
        if os.path.isdir(old) and not os.path.exists(target):
            os.rename(old, target)  # put the replaced version back
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(base_path, first_created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        path=target,
        version=version,
        inputs={k: tuple(s.shape.as_list()) for k, s in specs.items()},
        outputs={k: tuple(s.shape.as_list()) for k, s in out_specs.items()},
        fold_report=fold_report,
        gate=gate,
    )


def _remove_created(path: str, first_created: str | None) -> None:
    """Removes the empty directories from `path` up to `first_created` (inclusive)."""
    if first_created is None:
        return
    while not os.listdir(path):
        os.rmdir(path)
        if path == first_created:
            return
        path = os.path.dirname(path)
