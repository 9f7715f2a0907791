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
4. The gate (`GateReport`), every check run and every failure listed:
   (a) the model's running statistics pass `tfbn.inspect.inspect_model`'s checks
       (never updated, NaN/Inf, negative variance);
   (b) no output is NaN/Inf for the (finite) sample inputs;
   (c) parity: float32/float64 models: the reloaded SavedModel matches the Keras
       model called with `training=False` within `rtol` (1e-4). Mixed-precision
       models (any layer computing in float16/bfloat16): the reference is the
       float32 truth, the same model with every layer computing in float32, and the
       export must be no further from it than the Keras model itself is, times
       `1 + fold_margin`, plus the compute dtype's rtol (`tfbn.tolerance`);
   (d) the same rows for the full sample batch, batches of 1 and batches of 3,
       within the compute dtype's rtol;
   (e) `tfbn.inspect.lint_saved_model` finds nothing (no BN in training mode, ...).
   `allow=` lifts (a)'s and (b)'s refusals by name; the report lists what was allowed.

Everything happens in a temporary non-numeric directory under `base_path`
(`.tfbn-export-<pid>-*`), which TF Serving ignores; only a SavedModel that passed
the gate becomes its integer version, so a polling server never sees a
half-written or unchecked version. `overwrite=True` swaps the new version with the
old one in one `renameat2(RENAME_EXCHANGE)` call, so the version directory always
holds the old or the new SavedModel, never neither. Temporary directories left by
exporters that were killed are removed by the next export; SIGTERM cleans up like
Ctrl-C. Bad input raises before anything is written.

Golden file contract (`<version>/assets.extra/tfbn_golden.npz`): a NumPy .npz with
arrays `inputs/<input name>` and `outputs/<output name>`, named as in the
`serving_default` signature, one sample per row (axis 0), plus `meta`, a JSON
string: `{"format": 2, "compute_dtype": ..., "rtol": ..., "dtypes": {...}}`. The
outputs are the exported SavedModel's answers for the full sample batch, which the
gate held to the Keras model (float32) or the float32 truth (mixed precision);
`tfbn check` compares a server with them at `rtol`. bfloat16 arrays are stored as
float32 (exact) with their dtype in `meta["dtypes"]`; `load_golden` restores it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from tfbn import _compat, convert, graph, layout, tolerance
from tfbn.inspect import FLAG_ADVICE, SavedModelReport, inspect_model, lint_saved_model
from tfbn.layout import ASSETS_EXTRA, GOLDEN_FILE, TMP_PREFIX, WARMUP_FILE  # noqa: F401
from tfbn.report import Report, json_safe
from tfbn.statistics_signature import statistics_signatures, write_asset

SERVING_KEY = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
DEFAULT_NUM_SAMPLES = 8
DEFAULT_RTOL = tolerance.FLOAT32_RTOL
INVARIANCE_BATCH_SIZES = (1, 3)
# A mixed-precision export may be at most this much further (relatively) from the
# float32 truth than the Keras model itself is, on top of one compute-dtype rtol.
FOLD_MARGIN = 0.5
# inspect_model's flags that refuse an export, and the output check; `allow=` names them.
STATISTICS_FLAGS = ("never_updated", "nonfinite", "negative_variance")
NONFINITE_OUTPUTS = "nonfinite_outputs"
ALLOWABLE = (*STATISTICS_FLAGS, NONFINITE_OUTPUTS)
GOLDEN_FORMAT = 2


class ExportGateError(RuntimeError):
    """The exported SavedModel failed the gate; nothing was left in the base path."""

    def __init__(self, report: GateReport):
        super().__init__(f"export gate failed, nothing written:\n{report.format()}")
        self.report = report


@dataclass
class GateReport(Report):
    """The checks a SavedModel passed (or not) before it became a version.

    `parity[name]`: the export's max rel. error against `reference` ("keras": the
    Keras model, training=False; "float32 truth": the model computing in float32).
    `truth[name]` (mixed precision only): `{"model": the Keras model's error against
    the float32 truth, "export": the export's, "bound": the export's limit}`.
    """

    rtol: float
    compute_dtype: str = "float32"
    reference: str = "keras"
    tolerance_source: str = "float32 default"
    parity: dict[str, float] = field(default_factory=dict)
    truth: dict[str, dict[str, float]] = field(default_factory=dict)
    invariance: dict[str, dict[int, float]] = field(default_factory=dict)
    statistics: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    lint: SavedModelReport | None = None
    allowed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"compute dtype {self.compute_dtype}; reference: {self.reference}"]
        for name, err in self.parity.items():
            lines.append(f"parity with the {self.reference}, '{name}': max rel. error {err:.2e}")
        for name, t in self.truth.items():
            lines.append(
                f"distance to the float32 truth, '{name}': Keras model {t['model']:.2e}, "
                f"export {t['export']:.2e} (bound {t['bound']:.2e})"
            )
        for name, errs in self.invariance.items():
            got = ", ".join(f"batches of {b}: {e:.2e}" for b, e in errs.items())
            lines.append(f"batch-size invariance, '{name}': {got}")
        lines.append(
            "statistics: " + ("OK" if not self.statistics else f"{len(self.statistics)} finding(s)")
        )
        lines.append(
            "outputs: "
            + ("finite" if not self.nonfinite else "NaN/Inf in " + ", ".join(self.nonfinite))
        )
        if self.lint is not None:
            lines.append(
                "lint: " + ("OK" if self.lint.ok else f"{len(self.lint.findings)} finding(s)")
            )
        lines.append(f"tolerance (max rel. error): {self.rtol:.3g} ({self.tolerance_source})")
        if self.allowed:
            lines.append("allowed: " + ", ".join(self.allowed))
        if self.problems:
            lines.append("FAILED:")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "ok": self.ok,
                "compute_dtype": self.compute_dtype,
                "rtol": self.rtol,
                "tolerance_source": self.tolerance_source,
                "reference": self.reference,
                "parity": self.parity,
                "truth": self.truth,
                "invariance": self.invariance,  # batch sizes become string keys
                "statistics": self.statistics,
                "nonfinite_outputs": self.nonfinite,
                "lint": None if self.lint is None else self.lint.to_dict(),
                "allowed": self.allowed,
                "problems": self.problems,
            }
        )


@dataclass
class ExportResult(Report):
    """Where the version went, what was folded, and the gate it passed (`ok`: the gate's)."""

    path: str
    version: int
    inputs: dict[str, tuple]
    outputs: dict[str, tuple]
    fold_report: convert.FoldReport | None
    gate: GateReport

    @property
    def nothing_folded(self) -> bool:
        return self.fold_report is None or self.fold_report.nothing_folded

    @property
    def ok(self) -> bool:
        return self.gate.ok

    def format(self) -> str:
        fold = "not folded (fold=False)" if self.fold_report is None else self.fold_report.format()
        sig = lambda d: ", ".join(f"{k} {list(v)}" for k, v in d.items())  # noqa: E731
        return "\n".join(
            [
                f"exported version {self.version} to {self.path}",
                f"signature {SERVING_KEY}: inputs {sig(self.inputs)} -> outputs {sig(self.outputs)}",
                fold,
                self.gate.format(),
            ]
        )

    def to_dict(self) -> dict:
        return json_safe(
            {
                "ok": self.ok,
                "path": self.path,
                "version": self.version,
                "signature": SERVING_KEY,
                "inputs": self.inputs,  # shapes as lists, None for the batch dimension
                "outputs": self.outputs,
                "fold": None if self.fold_report is None else self.fold_report.to_dict(),
                "gate": self.gate.to_dict(),
            }
        )


# ----------------------------------------------------------------- helpers --


def _graph(model: keras.Model):
    return graph.graph_of(model)


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
    functional = _graph(model)
    if isinstance(functional._inputs_struct, dict):
        inputs = dict(functional._inputs_struct)
    else:
        inputs = {kt._keras_history.operation.name: kt for kt in functional.inputs}
    if isinstance(functional._outputs_struct, dict):
        out_names = list(functional._outputs_struct)
    else:
        out_names = _unique(list(functional.output_names))
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
    return None if version is None else layout.validate_version(version)


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
            outputs = model(graph.pack_inputs(model, specs, list(tensors)), training=False)
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


def _float32_twin(model: keras.Model) -> keras.Model:
    """The same model, weights and all, with every layer computing in float32."""

    def replace(layer):
        if isinstance(layer, keras.Model) or not hasattr(layer, "get_config"):
            return None
        if tolerance.dtype_eps(layer.compute_dtype) <= tolerance.dtype_eps("float32"):
            return None
        config = layer.get_config()
        config["dtype"] = "float32"
        return type(layer).from_config(config)

    return convert.rewrite_layers(model, replace)[0]


def _call_numpy(model, specs, out_names, samples) -> dict[str, np.ndarray]:
    tensors = [tf.constant(v) for v in samples.values()]
    outputs = _named_outputs(
        model, out_names, model(graph.pack_inputs(model, specs, tensors), training=False)
    )
    return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in outputs.items()}


def _statistics_findings(model: keras.Model) -> list[tuple[str, str]]:
    """(flag, message) for each BN layer with statistics the gate refuses."""
    found = []
    for row in inspect_model(model).rows:
        for flag in row.flags:
            if flag in STATISTICS_FLAGS:
                why, fix = FLAG_ADVICE[flag]
                found.append((flag, f"[{flag}] BN layer '{row.name}': {why}; fix: {fix}"))
    return found


def _gate(
    export_dir: str, job: _ExportJob, reference: _Reference, stat_findings
) -> tuple[GateReport, dict[str, np.ndarray]]:
    """Runs every check; returns the report and the export's full-batch outputs."""
    closeness = job.closeness
    report = GateReport(
        rtol=closeness.rtol, compute_dtype=closeness.dtype,
        reference="keras" if reference.truth is None else "float32 truth",
        tolerance_source=closeness.source, allowed=sorted(job.allow),
    )  # fmt: skip
    _gate_statistics(report, stat_findings, job.allow)
    loaded = tf.saved_model.load(export_dir)
    if SERVING_KEY not in loaded.signatures:
        report.problems.append(f"no '{SERVING_KEY}' signature in the reloaded SavedModel")
        return report, {}
    predict = _predictor(loaded.signatures[SERVING_KEY], job.samples, job.out_names)
    rows = next(iter(job.samples.values())).shape[0]
    full = predict(0, rows)
    allow_nonfinite = NONFINITE_OUTPUTS in job.allow
    for name in job.out_names:
        model_out = reference.model[name]
        _gate_finite(report, name, model_out, full[name], allow_nonfinite)
        if reference.truth is None:
            _gate_parity(report, name, full[name], model_out, closeness, allow_nonfinite)
        else:
            truth = reference.truth[name]
            _gate_truth(report, name, full[name], model_out, truth, closeness, job.fold_margin)
    _gate_invariance(report, predict, full, rows, job.out_names, closeness)
    report.lint = lint_saved_model(export_dir)
    report.problems += [f"lint: {f}" for f in report.lint.findings]
    return report, full


def _gate_statistics(report: GateReport, stat_findings, allow) -> None:
    """(a): the model's running statistics."""
    for flag, message in stat_findings:
        report.statistics.append(message)
        if flag not in allow:
            report.problems.append(f"statistics: {message} (allow with allow=['{flag}'])")


def _predictor(fn, samples, out_names):
    """predict(lo, hi): the reloaded signature's outputs for sample rows lo:hi."""

    def predict(lo, hi):
        result = fn(**{k: tf.constant(v[lo:hi]) for k, v in samples.items()})
        return {k: np.asarray(result[k].numpy()) for k in out_names}

    return predict


def _gate_finite(report: GateReport, name, model_out, served, allow_nonfinite: bool) -> None:
    """(b): no NaN/Inf output for the finite samples."""
    where = [
        w
        for w, arr in (("Keras model", model_out), ("export", served))
        if not np.all(np.isfinite(np.asarray(arr, np.float64)))
    ]
    if not where:
        return
    report.nonfinite.append(f"'{name}' ({' and '.join(where)})")
    if not allow_nonfinite:
        report.problems.append(
            f"output '{name}' has NaN/Inf for finite sample inputs ({' and '.join(where)}):"
            f" the model is broken (allow with allow=['{NONFINITE_OUTPUTS}'])"
        )


def _gate_parity(report: GateReport, name, served, model_out, closeness, allow_nonfinite) -> None:
    """(c), float32/float64: the export matches the Keras model within rtol."""
    cmp = closeness.compare(served, model_out, allow_nonfinite=allow_nonfinite)
    report.parity[name] = cmp.error
    if cmp.ratio > 1:
        report.problems.append(
            f"output '{name}' differs from model(x, training=False): max rel. error "
            f"{cmp.error:.2e} > {closeness.rtol:.3g}"
        )


def _gate_truth(report: GateReport, name, served, model_out, truth, closeness, fold_margin):
    """(c), mixed precision: the export is no further from the float32 truth than the
    Keras model is, times 1 + fold_margin, plus rtol."""
    loose = tolerance.Closeness(rtol=1.0)  # only its error (max rel. error) is used
    model_err = loose.compare(model_out, truth, allow_nonfinite=True).error
    export_err = loose.compare(served, truth, allow_nonfinite=True).error
    bound = (1.0 + fold_margin) * model_err + closeness.rtol
    report.parity[name] = export_err
    report.truth[name] = {"model": model_err, "export": export_err, "bound": bound}
    if not export_err <= bound:
        report.problems.append(
            f"output '{name}' is {export_err:.2e} from the float32 truth, further than the "
            f"Keras model's own {model_err:.2e} allows ((1 + {fold_margin:g}) x "
            f"{model_err:.2e} + rtol {closeness.rtol:.3g} = {bound:.2e}): a wrong fold or "
            "a graph that does not compute what the model does"
        )


def _gate_invariance(report: GateReport, predict, full, rows: int, out_names, closeness) -> None:
    """(d): the same rows in batches of INVARIANCE_BATCH_SIZES as in the full batch."""
    for size in INVARIANCE_BATCH_SIZES:
        parts = [predict(lo, lo + size) for lo in range(0, rows, size)]
        for name in out_names:
            cmp = closeness.compare(
                np.concatenate([p[name] for p in parts]), full[name], allow_nonfinite=True
            )
            report.invariance.setdefault(name, {})[size] = cmp.error
            if cmp.ratio > 1:
                report.problems.append(
                    f"output '{name}' changes with the batch: batches of {size} vs the full batch "
                    f"of {rows} differ by max rel. error {cmp.error:.2e} > {closeness.rtol:.3g} "
                    "(batch statistics in inference?)"
                )


def _golden_arrays(samples, outputs) -> dict[str, np.ndarray]:
    """The golden .npz's arrays; bfloat16 (no NumPy dtype of its own) stored as float32."""
    arrays, dtypes = {}, {}
    for group, values in (("inputs", samples), ("outputs", outputs)):
        for name, value in values.items():
            key = f"{group}/{name}"
            value = np.asarray(value)
            if value.dtype.name == "bfloat16":
                dtypes[key] = "bfloat16"
                value = value.astype(np.float32)
            arrays[key] = value
    return arrays, dtypes


# ------------------------------------------------------- on-disk operations --

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> None:
    """Atomically swap two directories (Linux `renameat2(RENAME_EXCHANGE)`).

    Raises OSError (ENOSYS/EINVAL) where the kernel, C library or file system cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(
            errno.ENOSYS, f"atomic exchange needs Linux renameat2 (this is {sys.platform})"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "the C library has no renameat2 (glibc >= 2.28 has)")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a!r} <-> {b!r}: {os.strerror(err)}")


def _replace_version(new_dir: str, target: str, overwrite: bool) -> None:
    """Make `new_dir` the version directory `target`; with `overwrite`, swap it with the
    existing one atomically (the old one ends up at `new_dir`)."""
    if not os.path.exists(target):
        os.rename(new_dir, target)  # atomic; fails if `target` appeared meanwhile and is not empty
        return
    if not overwrite:
        raise FileExistsError(f"Version directory {target!r} appeared during the export")
    try:
        _exchange(new_dir, target)
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot replace version directory {target!r} atomically ({err.strerror}); "
            "a two-step replace would leave TF Serving without that version for a moment, so "
            "nothing was changed: export to a new version instead (version=None) or remove "
            "the old one yourself",
        ) from None


@contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt (so cleanup runs as on Ctrl-C),
    where the process has the default SIGTERM handler and this is the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM) during export")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_stale_temp_dirs(base_path: str) -> list[str]:
    removed = []
    for path in layout.stale_temp_dirs(base_path):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


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
    rtol: float | None = None,
    seed: int = 0,
    allow: Collection[str] = (),
    fold_margin: float = FOLD_MARGIN,
    progress: bool | None = False,
    statistics_signature: bool = True,
) -> ExportResult:
    """Exports `model` as `<base_path>/<version>/` for TF Serving, after a parity gate.

    Args:
        model: A built Sequential or Functional Keras model, or a subclassed one
            built on one input (exported through `tfbn.convert.as_graph_model`: its
            BN layers are frozen, not folded, since its graph is unknown).
        base_path: The model's base path (TF Serving's `model_base_path`).
        version: Integer version in [0, 2**63 - 1], or None for one more than the
            highest existing.
        sample_inputs: Inputs for the gate, the golden file and the warm-up
            requests: an array (one input), a list in input order or a dict by input
            name, >= 2 rows, finite. None draws `num_samples` rows from N(0, 1) (needs
            fully known input shapes).
        fold: Fold BN into the preceding kernels (`tfbn.convert.fold_batch_norm`, in
            float64; other BN frozen). False exports the model as it is, in inference mode.
        overwrite: Replace an existing version directory, atomically (Linux
            `renameat2`); where that is impossible the export fails and changes nothing.
        extra_signatures: `{name: fn}` exported next to `serving_default`; `fn` is a
            ConcreteFunction, a tf.function with an input_signature, or a callable
            taking the exported (folded) Keras model and returning one of those.
            They are linted like `serving_default`.
        model_name: The name in the warm-up requests' ModelSpec (default: the base
            path's directory name).
        num_samples: Rows drawn when `sample_inputs` is None.
        rtol: Gate tolerance (max |export - reference| / max |reference| per output);
            None: the compute dtype's (`tfbn.tolerance.default_rtol`: 1e-4 for
            float32, 1.95e-3 for float16, 1.56e-2 for bfloat16). 1e-4 is float32
            rounding of a deep network (a ResNet50 with random statistics measured
            1e-5 for the fold and 2.4e-5 between batch 1 and batch 8) with room to
            spare, and orders of magnitude below what batch statistics do (~1).
        seed: Seed of the drawn sample inputs.
        allow: Refusals to lift, by name: "never_updated", "nonfinite",
            "negative_variance" (the model's statistics, as `tfbn inspect` flags
            them) and "nonfinite_outputs". The report lists them.
        fold_margin: Mixed precision: how much further (relatively) than the Keras
            model itself the export may be from the float32 truth.
        progress: The export's steps on stderr (`tfbn.progress`): True, False, or None
            for "when stderr is a terminal".
        statistics_signature: Add the `tfbn_batch_norm_statistics` and
            `tfbn_batch_norm_reference` signatures (`tfbn.statistics_signature`:
            what each BN layer's input looks like on live traffic, for `tfbn
            drift`) and their asset file, if the model has BN layers.

    Returns:
        An `ExportResult` (`result.fold_report` says what was folded).

    Raises:
        ValueError, TypeError: bad model, version or sample inputs (nothing written).
        FileExistsError, PermissionError: the target exists or is not writable.
        ExportGateError: the SavedModel failed the gate (nothing left behind).
        OSError: `overwrite` where the version cannot be replaced atomically.
    """
    model = convert.as_graph_model(model)  # a subclassed model: wrapped, its BN frozen
    _check_model(model)
    version = _validate_version(version)
    base_path = os.path.abspath(os.fspath(base_path))
    version = _resolve_target(base_path, version, overwrite)
    _check_num_samples(num_samples)
    allow = _check_allow(allow)
    _check_fold_margin(fold_margin)
    closeness = tolerance.Closeness.for_dtype(tolerance.compute_dtype(model), rtol)
    specs, out_names = io_specs(model)
    _check_shapes(model, specs, sample_inputs is not None)
    samples = _samples(specs, sample_inputs, num_samples, seed)
    _check_finite(samples)
    job = _ExportJob(
        model=model,
        base_path=base_path,
        version=version,
        specs=specs,
        out_names=out_names,
        samples=samples,
        fold=fold,
        overwrite=overwrite,
        extra_signatures=_check_extra_signatures(extra_signatures),
        model_name=model_name or os.path.basename(base_path),
        closeness=closeness,
        allow=allow,
        fold_margin=fold_margin,
        statistics_signature=statistics_signature,
    )

    from tfbn.progress import progress_bar

    with progress_bar(len(EXPORT_STEPS), "tfbn export", progress, unit="step") as bar:
        return _export(job, bar)


EXPORT_STEPS = ("statistics", "fold", "reference", "save", "gate", "version")


# ------------------------------------------------------- export's arguments --


def _resolve_target(base_path: str, version: int | None, overwrite: bool) -> int:
    """The version to write (the next one for None), after checking it can be written."""
    if os.path.exists(base_path) and not os.path.isdir(base_path):
        raise FileExistsError(f"`base_path` {base_path!r} exists and is not a directory")
    if version is None:
        version = layout.next_version(base_path)
    _check_target(base_path, version, overwrite)
    return version


def _check_num_samples(num_samples) -> None:
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"`num_samples` must be an integer >= 2. Received: {num_samples!r}")


def _check_allow(allow) -> frozenset[str]:
    allow = frozenset([allow] if isinstance(allow, str) else allow)
    unknown = sorted(allow - set(ALLOWABLE))
    if unknown:
        raise ValueError(f"`allow` takes {list(ALLOWABLE)}. Received: {unknown}")
    return allow


def _check_fold_margin(fold_margin) -> None:
    if not (isinstance(fold_margin, (int, float)) and 0 <= fold_margin < np.inf):
        raise ValueError(f"`fold_margin` must be a number >= 0. Received: {fold_margin!r}")


def _check_finite(samples: dict[str, np.ndarray]) -> None:
    for name, array in samples.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ValueError(f"Sample input '{name}' holds NaN/Inf; the gate needs finite inputs")


def _check_extra_signatures(extra_signatures) -> dict[str, Callable]:
    extra_signatures = dict(extra_signatures or {})
    if SERVING_KEY in extra_signatures:
        raise ValueError(f"`extra_signatures` must not redefine '{SERVING_KEY}'")
    return extra_signatures


@dataclass(frozen=True)
class _ExportJob:
    """One export, its arguments checked and resolved by `export_saved_model`."""

    model: keras.Model
    base_path: str  # absolute
    version: int
    specs: dict[str, tf.TensorSpec]  # serving_default's inputs
    out_names: list[str]  # serving_default's outputs
    samples: dict[str, np.ndarray]  # finite, >= 2 rows, by input name
    fold: bool
    overwrite: bool
    extra_signatures: dict[str, Callable]
    model_name: str  # in the warm-up requests
    closeness: tolerance.Closeness
    allow: frozenset[str]
    fold_margin: float
    statistics_signature: bool

    @property
    def target(self) -> str:
        return os.path.join(self.base_path, str(self.version))


@dataclass
class _Reference:
    """What the gate compares the export with: the Keras model's outputs for the
    samples, and (mixed precision) the float32 truth's."""

    model: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None


# ------------------------------------------------------------ export's steps --


def _export(job: _ExportJob, bar) -> ExportResult:
    def step(name):
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    stat_findings = _statistics_findings(job.model)
    step("statistics")
    fold_report = None
    serving_model = job.model
    if job.fold:
        serving_model, fold_report = convert.fold_batch_norm(job.model, return_report=True)
    step("fold")
    reference = _reference_outputs(job)
    step("reference")
    module, signatures, stats_asset = _serving_module(job, serving_model)
    gate = _write_version(job, module, signatures, stats_asset, reference, stat_findings, step)
    serve = signatures[SERVING_KEY]
    return ExportResult(
        path=job.target,
        version=job.version,
        inputs={k: tuple(s.shape.as_list()) for k, s in job.specs.items()},
        outputs={k: tuple(serve.structured_outputs[k].shape.as_list()) for k in job.out_names},
        fold_report=fold_report,
        gate=gate,
    )


def _reference_outputs(job: _ExportJob) -> _Reference:
    model_out = _call_numpy(job.model, job.specs, job.out_names, job.samples)
    truth = None
    if tolerance.is_low_precision(job.closeness.dtype):
        truth = _call_numpy(_float32_twin(job.model), job.specs, job.out_names, job.samples)
    return _Reference(model_out, truth)


def _serving_module(job: _ExportJob, serving_model) -> tuple[_ServingModule, dict, dict | None]:
    """The tf.Module to save, its signatures (serving_default first) and the statistics
    signature's asset (None without one)."""
    module = _ServingModule(serving_model, job.specs, job.out_names)
    signatures = {SERVING_KEY: module.serve.get_concrete_function()}
    for name, fn in job.extra_signatures.items():
        signatures[name] = _extra_concrete(name, fn, serving_model)
    stats_functions, stats_asset = ({}, None)
    if job.statistics_signature:
        stats_functions, stats_asset = statistics_signatures(job.model, serving_model, job.specs)
        if set(stats_functions) & set(signatures):
            raise ValueError(f"`extra_signatures` must not redefine {sorted(stats_functions)}")
        signatures.update(stats_functions)
    module.extra_functions = list(signatures.values())[1:]
    if job.extra_signatures:
        module.source_model = job.model  # extra functions may close over the original model
    return module, signatures, stats_asset


def _write_version(
    job: _ExportJob, module, signatures, stats_asset, reference: _Reference, stat_findings, step
) -> GateReport:
    """Saves into a temporary directory under the base path, gates it, and renames it
    into the version directory only if the gate passed; on any failure (or an
    interrupt) nothing is left behind."""
    first_created = _first_missing_dir(job.base_path)
    with _sigterm_as_interrupt():
        os.makedirs(job.base_path, exist_ok=True)
        _remove_stale_temp_dirs(job.base_path)
        tmp = tempfile.mkdtemp(prefix=layout.temp_dir_prefix(), dir=job.base_path)
        try:
            export_dir = os.path.join(tmp, "model")
            _save(job, module, signatures, stats_asset, export_dir)
            step("save")
            gate, served = _gate(export_dir, job, reference, stat_findings)
            step("gate")
            if not gate.ok:
                raise ExportGateError(gate)
            _write_golden(job, export_dir, served)
            _replace_version(export_dir, job.target, job.overwrite)
            step("version")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(job.base_path, first_created)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return gate


def _first_missing_dir(path: str) -> str | None:
    """The highest missing directory on the way to `path` (what an export creates and
    removes again on failure), None if `path` exists."""
    first_created = None
    while not os.path.exists(path):
        first_created, path = path, os.path.dirname(path)
    return first_created


def _save(job: _ExportJob, module, signatures, stats_asset, export_dir: str) -> None:
    """The SavedModel, its warm-up requests and the statistics signature's asset."""
    tf.saved_model.save(module, export_dir, signatures=signatures)
    extra_dir = os.path.join(export_dir, ASSETS_EXTRA)
    os.makedirs(extra_dir, exist_ok=True)
    _write_warmup(os.path.join(extra_dir, WARMUP_FILE), job.model_name, job.samples)
    write_asset(extra_dir, stats_asset)


def _write_golden(job: _ExportJob, export_dir: str, served: dict[str, np.ndarray]) -> None:
    """`assets.extra/tfbn_golden.npz`: the samples and the export's answers (see the
    module docstring for the contract)."""
    golden, dtypes = _golden_arrays(job.samples, served)
    meta = {"format": GOLDEN_FORMAT, "compute_dtype": job.closeness.dtype,
            "rtol": job.closeness.rtol, "dtypes": dtypes}  # fmt: skip
    np.savez(os.path.join(export_dir, ASSETS_EXTRA, GOLDEN_FILE), meta=np.array(json.dumps(meta)),
             **golden)  # fmt: skip


def _remove_created(path: str, first_created: str | None) -> None:
    """Removes the empty directories from `path` up to `first_created` (inclusive)."""
    if first_created is None:
        return
    while not os.listdir(path):
        os.rmdir(path)
        if path == first_created:
            return
        path = os.path.dirname(path)
