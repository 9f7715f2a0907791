"""Keras callbacks for running statistics: momentum schedules and TensorBoard histograms.

- `BatchNormMomentumScheduler`: sets every tfbn BN layer's momentum per epoch or
  per step from a schedule (linear, exponential, cosine, or any callable). It
  works inside compiled `model.fit` because tfbn reads its momentum from a
  variable (`tfbn.BatchNormalization.momentum`), not from a constant baked into
  the traced train step.
- `BatchNormStatsCallback`: moving mean/variance, gamma and beta of every BN
  layer as TensorBoard histograms, once per epoch.
- `plot_running_stats`: a PNG of the running mean/variance over steps under a
  static and a scheduled momentum, against the population value.

Why schedule the momentum: with a high momentum (0.99) the running statistics
need hundreds of steps to forget their initial 0/1 and to follow the drifting
activations of early training; a low one (0.9) follows quickly but stays noisy.
Starting low and ending high gets both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from tfbn import stats
from tfbn.convert import batch_norm_layers
from tfbn.layers.batch_norm import BatchNormalization

SCHEDULES = ("linear", "exponential", "cosine")
PER = ("epoch", "step")
KERAS_LAYER_POLICIES = ("raise", "skip")


def momentum_schedule(
    schedule: str | Callable[[int], float],
    start: float = 0.9,
    end: float = 0.99,
    total: int | None = None,
) -> Callable[[int], float]:
    """A function `t -> momentum` (Keras convention unless said otherwise).

    With `p = min(t / (total - 1), 1)` (so `t = 0` gives `start` and
    `t = total - 1` gives `end`):

    - `"linear"`: `start + (end - start) * p`.
    - `"cosine"`: `end + (start - end) * (1 + cos(pi * p)) / 2`.
    - `"exponential"`: the update rate `1 - momentum` changes geometrically,
      `1 - m = (1 - start) * ((1 - end) / (1 - start)) ** p`, e.g. 0.1 -> 0.01
      for 0.9 -> 0.99 (both must be < 1).
    - a callable: used as it is (its values are checked when applied).

    Args:
        schedule: One of `SCHEDULES` or a callable of the epoch/step index.
        start, end: Momentum at the first and the last epoch/step, in [0, 1].
        total: Number of epochs/steps the named schedules run over (>= 1).
    """
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(
            f"`schedule` must be one of {SCHEDULES} or a callable of the epoch/step. "
            f"Received: schedule={schedule!r}"
        )
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be a momentum in [0, 1]. Received: {name}={value!r}")
    if schedule == "exponential" and max(start, end) >= 1:
        raise ValueError(
            "The exponential schedule interpolates the update rate 1 - momentum "
            f"geometrically, so `start` and `end` must be < 1. Received: start={start}, end={end}"
        )
    if total is None or isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(
            f"`total` (epochs or steps the schedule spans) must be a positive integer. "
            f"Received: total={total!r}"
        )
    span = max(total - 1, 1)

    def fn(t: int) -> float:
        p = min(max(t, 0) / span, 1.0)
        if schedule == "linear":
            return start + (end - start) * p
        if schedule == "cosine":
            return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
        return 1.0 - (1.0 - start) * ((1.0 - end) / (1.0 - start)) ** p

    fn.__name__ = f"{schedule}_{start}_to_{end}_over_{total}"
    return fn


def _check_momentum(value, t: int, per: str) -> float:
    try:
        momentum = float(value)
    except (TypeError, ValueError):
        momentum = float("nan")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"The momentum schedule must return a float in [0, 1]. Received: {value!r} at {per} {t}"
        )
    return momentum


class BatchNormMomentumScheduler(keras.callbacks.Callback):
    """Sets the momentum of every tfbn BN layer from a schedule, per epoch or per step.

    Applies inside compiled (and XLA-compiled) `model.fit`: tfbn layers read their
    momentum from a variable that this callback assigns before each epoch/batch.

    `keras.layers.BatchNormalization` bakes its Python-float momentum into the
    traced train step, so assigning it later silently does nothing. By default
    such layers are an error (`keras_layers="raise"`); `"skip"` leaves them at
    their fixed momentum. Convert them with `tfbn.convert.convert_sync_batch_norm` (a
    no-op synchronisation outside a strategy) or build the model with
    `tfbn.BatchNormalization` to schedule them. Layers with `momentum=None`
    (cumulative average) have no momentum to schedule and are an error too.
    For batch-renorm layers (`renorm=True`) the schedule sets `momentum`, which
    drives the inference statistics (`moving_mean`, `moving_stddev` and the
    `moving_variance` derived from it); `renorm_momentum` (the training-time
    `renorm_mean` / `renorm_stddev`) is not scheduled and stays as configured.

    Args:
        schedule: `"linear"`, `"exponential"`, `"cosine"` (see `momentum_schedule`)
            or a callable `f(epoch)` / `f(step)` returning the momentum.
        start, end: Momentum at the first and last epoch/step (named schedules).
        per: `"epoch"` (set at the start of each epoch, `f(epoch)`) or `"step"`
            (before each batch, `f(step)`, the global step counted from 0 over the
            whole `fit`).
        total: Epochs/steps a named schedule spans; default: the `epochs` (or
            `epochs * steps`) of the `fit` call.
        convention: Convention of the schedule's values: `"keras"` (weight of the
            old value, ~0.99) or `"pytorch"` (weight of the new batch, ~0.1). Each
            layer receives the value in its own `momentum_convention`.
        keras_layers: `"raise"` or `"skip"` for `keras.layers.BatchNormalization`.
        verbose: 1 prints the momentum whenever it is set per epoch.

    The momentum in effect is added to the epoch logs as `bn_momentum` (so it is
    in the `History`) and every value set is in `self.history` as `(t, momentum)`.
    """

    def __init__(
        self,
        schedule: str | Callable[[int], float] = "linear",
        start: float = 0.9,
        end: float = 0.99,
        per: str = "epoch",
        total: int | None = None,
        convention: str = stats.KERAS,
        keras_layers: str = "raise",
        verbose: int = 0,
    ):
        super().__init__()
        if per not in PER:
            raise ValueError(f"`per` must be one of {PER}. Received: per={per!r}")
        if convention not in stats.MOMENTUM_CONVENTIONS:
            raise ValueError(
                f"`convention` must be one of {stats.MOMENTUM_CONVENTIONS}. "
                f"Received: convention={convention!r}"
            )
        if keras_layers not in KERAS_LAYER_POLICIES:
            raise ValueError(
                f"`keras_layers` must be one of {KERAS_LAYER_POLICIES}. "
                f"Received: keras_layers={keras_layers!r}"
            )
        if not callable(schedule):
            momentum_schedule(schedule, start, end, 1 if total is None else total)  # validate
        self.schedule, self.start, self.end = schedule, start, end
        self.per, self.total, self.convention = per, total, convention
        self.keras_layers, self.verbose = keras_layers, verbose
        self.history: list[tuple[int, float]] = []
        self._fn: Callable[[int], float] | None = None
        self._layers: list[BatchNormalization] = []
        self._step = 0
        self._current: float | None = None

    def on_train_begin(self, logs=None):
        layers = batch_norm_layers(self.model)
        keras_bn = [layer.name for layer in layers if not isinstance(layer, BatchNormalization)]
        if keras_bn and self.keras_layers == "raise":
            raise TypeError(
                "BatchNormMomentumScheduler cannot schedule keras.layers.BatchNormalization "
                f"{keras_bn}: its momentum is a Python float baked into the compiled train "
                "step, so a new value would silently not apply. Use tfbn.BatchNormalization "
                "(e.g. model = tfbn.convert.convert_sync_batch_norm(model)), or pass "
                "keras_layers='skip' to leave them at their fixed momentum."
            )
        self._layers = [layer for layer in layers if isinstance(layer, BatchNormalization)]
        cumulative = [layer.name for layer in self._layers if layer.momentum is None]
        if cumulative:
            raise ValueError(
                f"Layers {cumulative} use momentum=None (a cumulative average): there is "
                "no momentum to schedule. Give them a float momentum."
            )
        if not self._layers:
            raise ValueError(
                "BatchNormMomentumScheduler found no tfbn.BatchNormalization layer in "
                f"model '{self.model.name}' to schedule."
            )
        self._fn = momentum_schedule(self.schedule, self.start, self.end, self._total())
        self._step = 0
        self._current = None  # re-apply on every fit: the layers may have been changed since

    def _total(self) -> int | None:
        if callable(self.schedule) or self.total is not None:
            return self.total
        epochs = (self.params or {}).get("epochs")
        if self.per == "epoch":
            return epochs
        steps = (self.params or {}).get("steps")
        if not epochs or not steps:
            raise ValueError(
                "A per-step named schedule needs `total` when fit does not know the "
                "number of steps per epoch (pass steps_per_epoch or total=...)."
            )
        return epochs * steps

    def _apply(self, t: int) -> None:
        momentum = _check_momentum(self._fn(t), t, self.per)
        if momentum != self._current:
            for layer in self._layers:
                same = layer.momentum_convention == self.convention
                layer.momentum = momentum if same else 1.0 - momentum
            self._current = momentum
        self.history.append((t, momentum))

    def on_epoch_begin(self, epoch, logs=None):
        if self.per == "epoch":
            self._apply(epoch)
            if self.verbose:
                print(
                    f"\nEpoch {epoch + 1}: BatchNormMomentumScheduler set momentum to {self._current:.6g}."
                )

    def on_train_batch_begin(self, batch, logs=None):
        if self.per == "step":
            self._apply(self._step)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs["bn_momentum"] = self._current


class BatchNormStatsCallback(keras.callbacks.Callback):
    """Writes BN statistics to TensorBoard as histograms, once every `freq` epochs.

    For every Keras and tfbn BN layer: `<layer path>/moving_mean`,
    `/moving_variance`, `/gamma`, `/beta` (those that exist) as histograms, and
    for tfbn layers `/num_batches_tracked` and `/num_skipped_updates` as scalars.
    Non-finite values are left out of a histogram and counted in a
    `/nonfinite_values` scalar (written only when there are any).

    The histograms are written in TensorBoard's histogram format with
    `tf.summary.write`, so the callback works without the `tensorboard` package
    installed (TensorBoard itself reads them).

    Args:
        log_dir: Directory of the event files (e.g. the same as
            `keras.callbacks.TensorBoard`'s, plus a subdirectory).
        freq: Write after every `freq`-th epoch (epochs `e` with `(e + 1) % freq == 0`).
        buckets: Histogram buckets.
    """

    def __init__(self, log_dir: str, freq: int = 1, buckets: int = 30):
        super().__init__()
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"`freq` must be a positive integer. Received: freq={freq!r}")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"`buckets` must be a positive integer. Received: buckets={buckets!r}")
        self.log_dir = os.fspath(log_dir)
        self.freq, self.buckets = freq, buckets
        self._writer = None

    def on_train_begin(self, logs=None):
        if not batch_norm_layers(self.model):
            raise ValueError(
                f"BatchNormStatsCallback: model '{self.model.name}' has no BatchNormalization "
                "layer to log."
            )
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.freq:
            return
        self.write(epoch)

    def write(self, step: int) -> None:
        """Writes the current statistics of every BN layer at `step`."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for layer in batch_norm_layers(self.model):
                tag = getattr(layer, "path", layer.name)
                for name in ("moving_mean", "moving_variance", "gamma", "beta"):
                    variable = getattr(layer, name, None)
                    if variable is None:
                        continue
                    values = np.asarray(variable.numpy(), np.float64).ravel()
                    finite = values[np.isfinite(values)]
                    write_histogram(f"{tag}/{name}", finite, step, self.buckets)
                    if finite.size != values.size:
                        write_scalar(
                            f"{tag}/{name}/nonfinite_values", values.size - finite.size, step
                        )
                for name in ("num_batches_tracked", "num_skipped_updates"):
                    counter = getattr(layer, name, None)
                    if counter is not None:
                        write_scalar(f"{tag}/{name}", int(counter.numpy()), step)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def histogram_buckets(values: np.ndarray, buckets: int = 30) -> np.ndarray:
    """TensorBoard's histogram tensor: `[k, 3]` rows of (left edge, right edge, count)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return np.zeros((0, 3), np.float64)
    low, high = float(values.min()), float(values.max())
    if low == high:
        return np.array([[low - 0.5, high + 0.5, float(values.size)]])
    counts, edges = np.histogram(values, bins=buckets, range=(low, high))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def _metadata(plugin: str):
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def write_histogram(tag: str, values: np.ndarray, step: int, buckets: int = 30) -> None:
    """`tf.summary.histogram` without the tensorboard package (same on-disk format)."""
    tensor = tf.constant(histogram_buckets(values, buckets))
    tf.summary.write(tag, tensor, step=step, metadata=_metadata("histograms"))


def write_scalar(tag: str, value: float, step: int) -> None:
    """`tf.summary.scalar` without the tensorboard package (same on-disk format)."""
    tensor = tf.constant(float(value), tf.float32)
    tf.summary.write(tag, tensor, step=step, metadata=_metadata("scalars"))


# --------------------------------------------------------------- plotting --


def plot_running_stats(
    path: str,
    batches: Iterable,
    schedule: str | Callable[[int], float] = "linear",
    static_momentum: float = 0.99,
    start: float = 0.9,
    end: float = 0.99,
    total: int | None = None,
    channel: int = 0,
    title: str | None = None,
) -> dict[str, np.ndarray]:
    """Saves a PNG of a running mean/variance over steps: static vs scheduled momentum.

    Feeds the batches (channels-last arrays, e.g. the inputs a BN layer sees)
    through the moving-average update (`tfbn.stats.ema_update`, Keras
    convention, starting from mean 0 / variance 1 as a fresh layer does) once
    with `static_momentum` and once with `momentum_schedule(schedule, start,
    end, total)` per step, and plots both, for one channel, against the
    population mean/variance of all the batches (dashed).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    Args:
        path: Where to write the PNG.
        batches: Iterable of arrays `[batch, ..., channels]`.
        schedule, start, end, total: The schedule (`total` defaults to the
            number of batches).
        static_momentum: The fixed momentum to compare with.
        channel: The channel to plot.
        title: Figure title.

    Returns:
        The trajectories: `steps`, `momentum` (scheduled), `static_mean`,
        `static_variance`, `scheduled_mean`, `scheduled_variance` (values after
        each step), and `population_mean`, `population_variance`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is an extra
        raise ImportError(
            "plot_running_stats needs matplotlib: pip install tfbn[examples]"
        ) from err
    arrays = [np.asarray(b) for b in batches]
    if not arrays:
        raise ValueError("`batches` is empty: there is nothing to plot.")
    channels = arrays[0].shape[-1]
    if not 0 <= channel < channels:
        raise ValueError(f"`channel` must be in [0, {channels - 1}]. Received: channel={channel}")
    fn = momentum_schedule(schedule, start, end, total or len(arrays))
    moments = []
    sums = 0.0
    for array in arrays:
        x = tf.convert_to_tensor(array, tf.float32)
        mean, var, count = stats.moments(x, list(range(len(x.shape) - 1)))
        moments.append((mean, var))
        sums = sums + stats.moment_sums(mean, var, count)
    pop_mean, pop_var, _ = stats.moments_from_sums(sums, tf.float64)

    def run(momenta):
        mean = tf.zeros([channels], tf.float32)
        var = tf.ones([channels], tf.float32)
        means, variances = [], []
        for (batch_mean, batch_var), m in zip(moments, momenta, strict=True):
            mean = stats.ema_update(mean, batch_mean, m)
            var = stats.ema_update(var, batch_var, m)
            means.append(float(mean[channel]))
            variances.append(float(var[channel]))
        return np.array(means), np.array(variances)

    steps = np.arange(1, len(arrays) + 1)
    momenta = np.array([_check_momentum(fn(t), t, "step") for t in range(len(arrays))])
    static_mean, static_var = run([float(static_momentum)] * len(arrays))
    sched_mean, sched_var = run(momenta)
    result = {
        "steps": steps,
        "momentum": momenta,
        "static_mean": static_mean,
        "static_variance": static_var,
        "scheduled_mean": sched_mean,
        "scheduled_variance": sched_var,
        "population_mean": float(pop_mean[channel]),
        "population_variance": float(pop_var[channel]),
    }
    label = fn.__name__ if not callable(schedule) else getattr(schedule, "__name__", "schedule")
    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    for ax, key, name in (
        (axes[0], "mean", "running mean"),
        (axes[1], "variance", "running variance"),
    ):
        ax.plot(steps, result[f"static_{key}"], label=f"static momentum {static_momentum}")
        ax.plot(steps, result[f"scheduled_{key}"], label=f"scheduled ({label})")
        ax.axhline(result[f"population_{key}"], color="k", linestyle="--", label="population")
        ax.set_ylabel(f"{name} (channel {channel})")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[1].set_xlabel("step")
    figure.suptitle(title or "Running statistics: static vs scheduled momentum")
    figure.savefig(os.fspath(path), format="png")
    result["path"] = os.fspath(path)
    return result
