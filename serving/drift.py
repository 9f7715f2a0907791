"""Running-statistics drift: do the frozen BN statistics still describe live traffic?

`measure_drift(probe, traffic)` sends real traffic, in batches, to a model's
statistics probe (the `tfbn_batch_norm_statistics` signature of a tfbn export, see
`tfbn.statistics_signature`), adds up the float64 moment sums of every BN layer's
input exactly, and compares them with the layer's running statistics. The probe
is a SavedModel in process (`SavedModelProbe`), TF Serving over REST or gRPC
(`ClientProbe`, on `tfbn.serving.client`) or a `.keras` model in process
(`KerasProbe`: the same numbers, for SavedModels exported without the signature,
e.g. by Keras's own `model.export()`).

Per layer, with `m`, `v` the traffic's mean and (biased) variance of a channel's
BN input, and `mu`, `var`, `eps` the layer's running statistics:

    shift      d   = (m - mu) / sqrt(var + eps)          (standardised shift)
    log ratio  l   = log((v + eps) / (var + eps))        (log variance ratio)
    channel    k   = d**2 + exp(l) - 1 - l               (= 2 KL(N(m, v+eps) || N(mu, var+eps)))
    score          = sqrt(mean of k over the layer's observable channels)

`k` is 0 exactly when the traffic has the mean and variance the layer assumes;
with the variance right, the score is the root-mean-square standardised shift, so
it reads in standard deviations. `eps` on both sides of the ratio keeps a constant
channel finite and compares the variances BN actually divides by. A layer drifts
when its score exceeds the threshold; the verdict is DRIFT when any layer does.

DEFAULT_THRESHOLD = 0.5: half a standard deviation, root-mean-square over a layer,
fixed before the experiment below was run. examples/experiments/drift_detection.py
measures it (README, "Running-statistics drift"): on unshifted digits traffic the
worst-layer score stayed <= 0.27 (800 random samples of 64 or 256 examples, no
false alarm), shifts in contrast, brightness and noise that cost accuracy crossed
it, and translations by 1-2 pixels, which cost 30-60 accuracy points, did not
(a translation barely changes per-channel statistics). A lower --threshold (0.3)
catches more, at a smaller margin over the unshifted scores.

Channels of folded layers with |gamma| < tfbn.inspect.DEAD_GAMMA have n = 0 in the
probe (their input cannot be recovered from the folded output, and their output
is ~beta whatever comes in): they are left out and counted as unobservable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tfbn.report import Report, deprecated_alias, json_safe
from tfbn.statistics_signature import (
    ASSET_FILE,
    REFERENCE_SIGNATURE,
    STATISTICS_SIGNATURE,
    parse_key,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "ClientProbe",
    "DriftReport",
    "KerasProbe",
    "LayerDrift",
    "MissingStatisticsSignature",
    "SavedModelProbe",
    "drift_report",
    "load_traffic",
    "measure_drift",
    "recalibrate_on_traffic",
    "redeploy_if_drifted",
    "run_drift",
]

DEFAULT_THRESHOLD = 0.5
DEFAULT_BATCH_SIZE = 32
MIN_EXAMPLES = 2
TOP_CHANNELS = 3

Arrays = dict[str, np.ndarray]


class MissingStatisticsSignature(ValueError):
    """The model has no statistics signature (exported without it, or not by tfbn)."""


# ---------------------------------------------------------------- traffic --


def _read_prediction_logs(path: str) -> Arrays:
    """Inputs of the Predict requests in a TFRecord file of PredictionLog records
    (TF Serving's warm-up file format, or a request log)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2
    from tfbn.serving import _tensor

    parts: dict[str, list[np.ndarray]] = {}
    try:
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(raw)
            if not log.HasField("predict_log"):
                continue
            for name, proto in log.predict_log.request.inputs.items():
                parts.setdefault(name, []).append(_tensor.from_tensor_proto(proto))
    except (tf.errors.DataLossError, tf.errors.OpError) as err:
        raise ValueError(
            f"--inputs {path!r} is neither .npz/.npy nor a TFRecord file of PredictionLog "
            f"records (TF Serving's warm-up / request-log format): {err.message.splitlines()[0]}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a record that is not a PredictionLog
        raise ValueError(
            f"--inputs {path!r}: a record is not a PredictionLog ({type(err).__name__}: {err})"
        ) from None
    if not parts:
        raise ValueError(f"--inputs {path!r} holds no Predict request (no predict_log records)")
    try:
        return {name: np.concatenate(arrays) for name, arrays in parts.items()}
    except ValueError as err:
        raise ValueError(f"--inputs {path!r}: requests of different shapes: {err}") from None


def _read_one(path: str) -> Arrays | np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inputs file {path!r} does not exist")
    if path.endswith((".npz", ".npy")):
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"--inputs {path!r} is not a readable .npz/.npy file: {err}") from None
        if isinstance(data, np.ndarray):
            return data
        with data:
            return {k.removeprefix("inputs/"): data[k] for k in data.files
                    if not k.startswith("outputs/")}  # fmt: skip
    return _read_prediction_logs(path)


def load_traffic(paths: str | Sequence[str], input_names: Sequence[str]) -> Arrays:
    """Traffic from .npz (arrays by input name; a golden file works too), .npy (a
    one-input model) or TFRecord PredictionLog files (warm-up file, request log),
    concatenated in order. Raises ValueError naming what does not fit."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    if not paths:
        raise ValueError("no traffic: pass at least one --inputs file")
    names = list(input_names)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path in paths:
        data = _read_one(path)
        if isinstance(data, np.ndarray):
            if len(names) != 1:
                raise ValueError(
                    f"--inputs {path!r} is a single array but the model has {len(names)} inputs "
                    f"{names}; pass an .npz keyed by input name"
                )
            data = {names[0]: data}
        elif set(data) == {"arr_0"} and len(names) == 1:  # np.savez(path, array)
            data = {names[0]: next(iter(data.values()))}
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(
                f"--inputs {path!r} has arrays {sorted(data)}, but the model's inputs are "
                f"{names}: missing {missing}"
            )
        for n in names:
            parts[n].append(np.asarray(data[n]))
    try:
        return {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()}
    except ValueError as err:
        raise ValueError(f"--inputs files do not agree on the input shapes: {err}") from None


def check_traffic(traffic: Mapping[str, np.ndarray], spec: Mapping[str, tuple]) -> int:
    """Validates traffic against `{input name: (numpy dtype, shape with -1/None)}`;
    returns the number of examples. Zero examples, a wrong shape or dtype kind and
    NaN/Inf all raise ValueError saying which input and what was expected."""
    missing = sorted(set(spec) - set(traffic))
    extra = sorted(set(traffic) - set(spec))
    if missing or extra:
        raise ValueError(
            f"traffic does not match the signature: inputs {sorted(spec)} expected; "
            f"missing {missing}, unexpected {extra}"
        )
    rows = set()
    for name, (dtype, shape) in spec.items():
        array = np.asarray(traffic[name])
        if array.ndim == 0:
            raise ValueError(f"traffic input {name!r} is a scalar; it needs a first (example) axis")
        if shape is not None:
            want = [None if (d is None or d < 0) else int(d) for d in shape]
            got = list(array.shape)
            if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want[1:], got[1:], strict=False)
            ):
                raise ValueError(
                    f"traffic input {name!r} has shape {tuple(got)}; the signature expects "
                    f"{tuple(-1 if d is None else d for d in want)} (-1: any)"
                )
        if np.dtype(dtype).kind == "f" and array.dtype.kind not in "fiu":
            raise ValueError(
                f"traffic input {name!r} has dtype {array.dtype}; the signature expects {dtype}"
            )
        if array.dtype.kind == "f" and len(array):
            bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            if bad.any():
                where = np.flatnonzero(bad)
                raise ValueError(
                    f"traffic input {name!r} has NaN or Inf in {bad.sum()} of {len(array)} "
                    f"examples (e.g. rows {where[:5].tolist()}); drop or repair them: statistics "
                    "of non-finite values mean nothing"
                )
        rows.add(len(array))
    if len(rows) != 1:
        raise ValueError(f"traffic inputs have different numbers of examples: {sorted(rows)}")
    n = rows.pop()
    if n < MIN_EXAMPLES:
        raise ValueError(
            f"traffic has {n} example(s); at least {MIN_EXAMPLES} are needed for a variance "
            "(a few hundred for a score whose sampling noise is small against the threshold)"
        )
    return n


# ----------------------------------------------------------------- probes --


class SavedModelProbe:
    """The statistics signature of a SavedModel, in process."""

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf
        from tfbn.serving import _tensor

        from tfbn.inspect import resolve_saved_model_dir

        self.path = resolve_saved_model_dir(path)
        loaded = tf.saved_model.load(self.path)
        self._keep = loaded
        if STATISTICS_SIGNATURE not in loaded.signatures:
            raise MissingStatisticsSignature(
                f"{self.path} has no '{STATISTICS_SIGNATURE}' signature (signatures: "
                f"{sorted(loaded.signatures)}): it was exported without it (--no-statistics-"
                "signature) or not by tfbn (e.g. Keras's model.export()), or its model has no "
                "BatchNormalization layer (nothing to drift). Pass --keras MODEL.keras (the "
                "model it was exported from) to compute the statistics in process, or re-export "
                "it with `tfbn export`."
            )
        self._stats = loaded.signatures[STATISTICS_SIGNATURE]
        self._ref = loaded.signatures[REFERENCE_SIGNATURE]
        kwargs = self._stats.structured_input_signature[1]
        self.spec = {
            name: (_tensor.numpy_dtype(s.dtype.as_datatype_enum),
                   None if s.shape.rank is None else [-1 if d is None else d for d in s.shape])
            for name, s in kwargs.items()
        }  # fmt: skip
        self.source = self.path
        self._tf = tf

    def statistics(self, batch: Arrays) -> Arrays:
        out = self._stats(**{k: self._tf.constant(v) for k, v in batch.items()})
        return {k: v.numpy() for k, v in out.items()}

    def reference(self, batch: Arrays) -> Arrays:
        one = {k: self._tf.constant(v[:1]) for k, v in batch.items()}
        return {k: v.numpy()[0] for k, v in self._ref(**one).items()}


class ClientProbe:
    """The statistics signature of a model served by TF Serving (REST or gRPC client)."""

    def __init__(self, client):
        self.client = client
        meta = client.metadata()
        if STATISTICS_SIGNATURE not in meta.signatures:
            raise MissingStatisticsSignature(
                f"model '{client.model_name}' version {meta.version} at {client.target} has no "
                f"'{STATISTICS_SIGNATURE}' signature (signatures: {sorted(meta.signatures)}): it "
                "was exported without it or not by tfbn (e.g. Keras's model.export()), or its model "
                "has no BatchNormalization layer (nothing to drift). Pass --keras MODEL.keras "
                "(the model it was exported from) to compute the statistics in process, or "
                "re-export it with `tfbn export` and let the server load it."
            )
        sig = meta.signature(STATISTICS_SIGNATURE)
        self.version = meta.version
        self.spec = {k: (v.numpy_dtype, None if v.shape is None else list(v.shape))
                     for k, v in sig.inputs.items()}  # fmt: skip
        self.source = f"{client.target} model '{client.model_name}' version {meta.version}"

    def statistics(self, batch: Arrays) -> Arrays:
        return self.client.predict(batch, signature_name=STATISTICS_SIGNATURE,
                                   version=self.version)  # fmt: skip

    def reference(self, batch: Arrays) -> Arrays:
        one = {k: v[:1] for k, v in batch.items()}
        out = self.client.predict(one, signature_name=REFERENCE_SIGNATURE, version=self.version)
        return {k: np.asarray(v)[0] for k, v in out.items()}


class KerasProbe:
    """The same statistics computed from a Keras model in process (no export needed)."""

    def __init__(self, model):
        import keras
        import tensorflow as tf

        import tfbn.layers  # noqa: F401 - registers tfbn's layers for loading
        from tfbn.export import _check_model, io_specs
        from tfbn.statistics_signature import StatisticsProbe

        source = "a Keras model"
        if isinstance(model, (str, os.PathLike)):
            source = os.fspath(model)
            if not (os.path.isfile(source) and source.endswith(".keras")):
                raise FileNotFoundError(f"--keras must be an existing .keras file; got {source!r}")
            model = keras.saving.load_model(source, compile=False)
        _check_model(model)
        specs, _ = io_specs(model)
        probe = StatisticsProbe(model)
        if not probe.has_batch_norm:
            raise ValueError(
                f"model '{model.name}' has no BatchNormalization layer with running statistics "
                f"(skipped: {probe.skipped or 'none'}): there is nothing to drift"
            )
        functions = probe.functions(specs)
        self._stats = functions[STATISTICS_SIGNATURE]
        self._names = list(specs)
        self._reference = probe.reference()
        self.model = model
        self.spec = {
            n: (s.dtype.as_numpy_dtype, [-1 if d is None else d for d in s.shape])
            for n, s in specs.items()
        }
        self.source = source
        self._tf = tf

    def statistics(self, batch: Arrays) -> Arrays:
        tensors = [self._tf.constant(batch[n], dtype=self._tf.as_dtype(self.spec[n][0]))
                   for n in self._names]  # fmt: skip
        return {k: v.numpy() for k, v in self._stats(*tensors).items()}

    def reference(self, batch: Arrays) -> Arrays:
        return dict(self._reference)


# ---------------------------------------------------------------- scoring --


@dataclasses.dataclass
class LayerDrift:
    """The drift of one BN layer's input."""

    index: int
    name: str
    channels: int
    observed_channels: int
    values_per_channel: float  # n: examples x positions per example
    mean_abs_shift: float
    max_abs_shift: float
    mean_log_var_ratio: float
    max_abs_log_var_ratio: float
    score: float
    drift: bool
    top_channels: list[dict]  # {channel, shift, log_var_ratio, contribution}


@dataclasses.dataclass
class DriftReport(Report):
    """`measure_drift`'s result: one `LayerDrift` per BN layer (`ok`: no layer drifts)."""

    layers: list[LayerDrift]
    threshold: float
    examples: int
    source: str

    @property
    def drift(self) -> bool:
        return any(layer.drift for layer in self.layers)

    @property
    def ok(self) -> bool:
        return not self.drift

    @property
    def worst(self) -> LayerDrift:
        return max(self.layers, key=lambda layer: layer.score)

    @property
    def score(self) -> float:
        """The model's score: its worst layer's."""
        return self.worst.score

    def verdict(self) -> str:
        worst = self.worst
        drifted = [layer.name for layer in self.layers if layer.drift]
        if drifted:
            return (
                f"DRIFT: {len(drifted)} of {len(self.layers)} BN layer(s) above the threshold "
                f"{self.threshold:g} (worst: '{worst.name}', score {worst.score:.3g}) over "
                f"{self.examples} examples from {self.source}: the running statistics no "
                "longer describe the traffic; recalibrate (`tfbn recalibrate`) and re-export"
            )
        return (
            f"OK: every BN layer below the threshold {self.threshold:g} (worst: '{worst.name}', "
            f"score {worst.score:.3g}) over {self.examples} examples from {self.source}"
        )

    def format(self) -> str:
        """A markdown table, one line per BN layer, and the verdict."""
        head = (
            "| # | layer | channels | mean abs shift | largest channels (shift) "
            "| mean log var ratio | score | drift |"
        )
        lines = [head, "|" + "---|" * 8]
        for layer in self.layers:
            top = ", ".join(f"{c['channel']} ({c['shift']:+.2f})" for c in layer.top_channels)
            seen = (f"{layer.channels}" if layer.observed_channels == layer.channels
                    else f"{layer.observed_channels}/{layer.channels} observable")  # fmt: skip
            lines.append(
                f"| {layer.index} | {layer.name} | {seen} | {layer.mean_abs_shift:.3f} | {top} "
                f"| {layer.mean_log_var_ratio:+.3f} | {layer.score:.3f} "
                f"| {'DRIFT' if layer.drift else 'ok'} |"
            )
        return "\n".join(lines + ["", self.verdict()])

    table = deprecated_alias("table", "format")

    def to_dict(self) -> dict:
        return json_safe(
            {
                "ok": self.ok,
                "drift": self.drift,
                "score": self.score,
                "threshold": self.threshold,
                "examples": self.examples,
                "source": self.source,
                "verdict": self.verdict(),
                "layers": [dataclasses.asdict(layer) for layer in self.layers],
            }
        )

    def plot(self, path: str | os.PathLike, title: str | None = None) -> str:
        """A PNG: layers (forward order) across, score up, the threshold drawn; the
        mean |shift| and |mean log variance ratio| as markers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [layer.name for layer in self.layers]
        x = np.arange(len(names))
        scores = [layer.score for layer in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 3), 4.2))
        colors = ["tab:red" if layer.drift else "tab:blue" for layer in self.layers]
        ax.bar(x, scores, color=colors, alpha=0.8, label="score (RMS over channels)")
        ax.plot(x, [layer.mean_abs_shift for layer in self.layers], "o", color="black",
                label="mean |standardised shift|")  # fmt: skip
        ax.plot(x, [abs(layer.mean_log_var_ratio) for layer in self.layers], "s",
                color="tab:orange", label="|mean log variance ratio|")  # fmt: skip
        ax.axhline(self.threshold, color="tab:red", linestyle="--",
                   label=f"threshold {self.threshold:g}")  # fmt: skip
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel("drift")
        ax.set_xlabel("BatchNorm layer (forward order)")
        verdict = "DRIFT" if self.drift else "OK"
        ax.set_title(title or f"{verdict}: running-statistics drift, {self.examples} examples")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _ordered(keys) -> list[tuple[int, str, str]]:
    out = []
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            raise ValueError(f"unexpected output {key!r} in the statistics signature")
        out.append((parsed[0], parsed[1], key))
    return sorted(out)


def drift_report(
    totals: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    examples: int,
    threshold: float = DEFAULT_THRESHOLD,
    source: str = "",
) -> DriftReport:
    """Scores summed moment sums (`{key: [3, C]}`) against the reference
    (`{key: [mean, variance, epsilon] as [3, C]}`); see the module docstring."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"--threshold must be a positive number. Received: {threshold!r}")
    layers = []
    for index, name, key in _ordered(totals):
        if key not in reference:
            raise ValueError(f"the reference has no statistics for layer {key!r}")
        n, s1, s2 = np.asarray(totals[key], np.float64)
        mu, var, eps = np.asarray(reference[key], np.float64)
        seen = n > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.where(seen, s1 / np.where(seen, n, 1), 0.0)
            v = np.maximum(np.where(seen, s2 / np.where(seen, n, 1), 0.0) - m * m, 0.0)
            shift = (m - mu) / np.sqrt(var + eps)
            log_ratio = np.log(v + eps) - np.log(var + eps)
        k = shift**2 + np.expm1(log_ratio) - log_ratio
        observed = int(seen.sum())
        if observed == 0:
            score = mean_abs = max_abs = mean_l = max_l = 0.0
            top = []
        else:
            shift_o, l_o, k_o = shift[seen], log_ratio[seen], k[seen]
            score = float(np.sqrt(np.mean(k_o)))
            mean_abs, max_abs = float(np.mean(np.abs(shift_o))), float(np.max(np.abs(shift_o)))
            mean_l, max_l = float(np.mean(l_o)), float(np.max(np.abs(l_o)))
            channels = np.flatnonzero(seen)
            order = channels[np.argsort(-np.abs(shift[channels]), kind="stable")][:TOP_CHANNELS]
            top = [{"channel": int(c), "shift": float(shift[c]), "log_var_ratio": float(log_ratio[c]),
                    "contribution": float(k[c])} for c in order]  # fmt: skip
        if not all(math.isfinite(x) for x in (score, mean_abs, mean_l)):
            raise ValueError(
                f"layer '{name}': the statistics are not finite (the model produced NaN/Inf on "
                "this traffic, or its running statistics are broken; `tfbn inspect MODEL.keras`)"
            )
        layers.append(LayerDrift(
            index=index, name=name, channels=int(n.size), observed_channels=observed,
            values_per_channel=float(n[seen].max()) if observed else 0.0,
            mean_abs_shift=mean_abs, max_abs_shift=max_abs, mean_log_var_ratio=mean_l,
            max_abs_log_var_ratio=max_l, score=score, drift=bool(score > threshold),
            top_channels=top,
        ))  # fmt: skip
    if not layers:
        raise ValueError("the statistics signature reported no BN layer")
    return DriftReport(layers=layers, threshold=float(threshold), examples=int(examples),
                       source=source)  # fmt: skip


def measure_drift(
    probe,
    traffic: Mapping[str, np.ndarray],
    batch_size: int = DEFAULT_BATCH_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
) -> DriftReport:
    """Sends `traffic` to `probe` in batches of `batch_size`, adds the per-example
    moment sums exactly (float64) and scores them (`drift_report`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer. Received: {batch_size!r}")
    examples = check_traffic(traffic, probe.spec)
    traffic = {k: np.asarray(v) for k, v in traffic.items()}
    totals: dict[str, np.ndarray] = {}
    for start in range(0, examples, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in traffic.items()}
        for key, rows in probe.statistics(batch).items():
            rows = np.asarray(rows, np.float64)
            if rows.ndim != 3 or rows.shape[:2] != (len(next(iter(batch.values()))), 3):
                raise ValueError(f"statistics output {key!r} has shape {rows.shape}; expected "
                                 "[examples, 3, channels]")  # fmt: skip
            total = rows.sum(axis=0)
            totals[key] = totals[key] + total if key in totals else total
    reference = probe.reference(traffic)
    return drift_report(totals, reference, examples, threshold, probe.source)


# -------------------------------------------------------- the command line --


def _check_same_model(
    served_predict: Callable[[Arrays], Mapping],
    keras_probe: KerasProbe,
    batch: Arrays,
    rtol: float = 1e-3,
) -> None:
    """Refuses a --keras model whose predictions are not the served model's."""
    import keras

    served = served_predict(batch)
    packed = [batch[n] for n in keras_probe._names]
    outputs = keras_probe.model(packed[0] if len(packed) == 1 else packed, training=False)
    mine = [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(outputs)]
    theirs = [np.asarray(served[k]) for k in sorted(served)]
    ok = len(mine) == len(theirs)
    worst = 0.0
    if ok:
        for a, b in zip(sorted(mine, key=np.shape), sorted(theirs, key=np.shape), strict=True):
            if a.shape != b.shape:
                ok = False
                break
            scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    if not ok or worst > rtol:
        raise ValueError(
            f"--keras {keras_probe.source} is not the served model: its predictions differ from "
            f"serving_default's on the traffic (max rel. error {worst:.2e}, tolerance {rtol:g}"
            f"{'' if ok else '; different outputs'})"
        )


def run_drift(
    model_path: str | None = None,
    *,
    inputs: str | Sequence[str],
    rest: str | None = None,
    grpc: str | None = None,
    model_name: str | None = None,
    version: int | None = None,
    label: str | None = None,
    keras_model: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    timeout: float = 10.0,
) -> DriftReport:
    """What `tfbn drift` does: pick the probe, read the traffic, measure.

    `model_path`: a SavedModel directory or base path (in process), or a `.keras`
    file; or `rest` / `grpc` with `model_name` (and optionally `version`/`label`).
    `keras_model`: a `.keras` model to compute the statistics from in process when
    the SavedModel or served model has no statistics signature (its predictions
    must match the served model's on the first traffic batch).
    """
    if sum(x is not None for x in (model_path, rest, grpc)) != 1:
        raise ValueError("pass exactly one of MODEL (SavedModel or .keras), --rest URL or "
                         "--grpc HOST:PORT")  # fmt: skip
    if model_path is not None and (version is not None or label is not None):
        raise ValueError("--model_version / --model_version_label select versions on a server; "
                         "for a local SavedModel pass its version directory")  # fmt: skip
    if model_path is not None and str(model_path).endswith(".keras"):
        probe = KerasProbe(model_path)
        return measure_drift(probe, load_traffic(inputs, list(probe.spec)), batch_size, threshold)
    served_predict = None
    client = None
    try:
        if model_path is not None:
            if not os.path.exists(model_path):
                raise FileNotFoundError(f"MODEL {model_path!r} does not exist")
            try:
                probe = SavedModelProbe(model_path)
            except MissingStatisticsSignature:
                if keras_model is None:
                    raise
                import tensorflow as tf

                from tfbn.inspect import resolve_saved_model_dir

                fn = tf.saved_model.load(resolve_saved_model_dir(model_path)).signatures[
                    "serving_default"]  # fmt: skip

                def served_predict(batch):
                    return {
                        k: v.numpy()
                        for k, v in fn(**{n: tf.constant(a) for n, a in batch.items()}).items()
                    }
        else:
            if not model_name:
                raise ValueError("--model_name is required with --rest / --grpc")
            from tfbn.serving.client import GrpcClient, RestClient

            cls, address = (RestClient, rest) if rest is not None else (GrpcClient, grpc)
            client = cls(address, model_name, version=version, label=label, timeout=timeout)
            try:
                probe = ClientProbe(client)
            except MissingStatisticsSignature:
                if keras_model is None:
                    raise
                served_predict = client.predict
        if served_predict is not None:
            probe = KerasProbe(keras_model)
            traffic = load_traffic(inputs, list(probe.spec))
            check_traffic(traffic, probe.spec)
            _check_same_model(
                served_predict, probe, {k: v[:batch_size] for k, v in traffic.items()}
            )
            return measure_drift(probe, traffic, batch_size, threshold)
        return measure_drift(probe, load_traffic(inputs, list(probe.spec)), batch_size, threshold)
    finally:
        if client is not None:
            client.close()


# -------------------------------------------------------- closing the loop --


def recalibrate_on_traffic(model, traffic: Mapping[str, np.ndarray], batch_size: int = 64):
    """`tfbn.recalibrate(model, batches of traffic)`: traffic validated as for drift
    (names, shapes, NaN, at least 2 examples). Returns the RecalibrationResult."""
    import tfbn
    from tfbn.export import io_specs
    from tfbn.graph import pack_inputs

    specs, _ = io_specs(model)
    spec = {n: (s.dtype.as_numpy_dtype, [-1 if d is None else d for d in s.shape])
            for n, s in specs.items()}  # fmt: skip
    n = check_traffic(traffic, spec)
    names = list(spec)
    batches = []
    for start in range(0, n, batch_size):
        arrays = [np.asarray(traffic[k][start : start + batch_size], spec[k][0]) for k in names]
        batches.append((pack_inputs(model, specs, arrays),))
    return tfbn.recalibrate(model, batches, progress=False)


@dataclasses.dataclass
class RedeployResult:
    before: DriftReport
    after: DriftReport | None
    new_version: int | None
    recalibrated_model: str | None


def redeploy_if_drifted(
    keras_path: str,
    base_path: str,
    traffic: Mapping[str, np.ndarray],
    *,
    address: str | None = None,
    model_name: str | None = None,
    out_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    wait_seconds: float = 60.0,
) -> RedeployResult:
    """The loop, for the demo and for operators' scripts: measure drift on the served
    model (`address`: an http(s) REST URL or a gRPC host:port, with `model_name`; else
    the latest version under `base_path` in process); if it drifted, recalibrate the
    `.keras` model on the traffic, save it to `out_path` (default
    `<keras_path stem>.recalibrated.keras`), export it as the next version under
    `base_path`, wait until the server serves that version, and measure again."""
    import time

    import keras
    from tfbn.serving.client import connect

    import tfbn

    def measure(version=None):
        if address is None:
            return measure_drift(SavedModelProbe(base_path), traffic, batch_size, threshold)
        with connect(address, model_name, version=version) as client:
            return measure_drift(ClientProbe(client), traffic, batch_size, threshold)

    before = measure()
    if not before.drift:
        return RedeployResult(before, None, None, None)
    model = keras.saving.load_model(keras_path, compile=False)
    recalibrate_on_traffic(model, traffic)
    out_path = out_path or keras_path.removesuffix(".keras") + ".recalibrated.keras"
    model.save(out_path)
    sample = {k: np.asarray(v[:16]) for k, v in traffic.items()}
    exported = tfbn.export_saved_model(model, base_path, sample_inputs=sample)
    if address is not None:
        deadline = time.monotonic() + wait_seconds
        while True:
            with connect(address, model_name) as client:
                try:
                    if client.metadata().version == exported.version:
                        break
                except Exception:  # noqa: BLE001 - not loaded yet
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not load version {exported.version} within "
                                   f"{wait_seconds:g} s")  # fmt: skip
            time.sleep(0.2)
    after = measure(exported.version)
    return RedeployResult(before, after, exported.version, out_path)


def read_asset(version_dir: str) -> dict | None:
    """The export's `assets.extra/tfbn_batch_norm_statistics.json`, or None."""
    path = os.path.join(version_dir, "assets.extra", ASSET_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
