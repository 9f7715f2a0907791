"""Recalibration of running statistics over a dataset ("precise BN").

`recalibrate(model, dataset)` replaces every BN layer's moving mean and
variance by the exact population statistics of that layer's inputs over the
dataset, as the model sees them at inference:

    moving_mean = sum_b n_b * mean_b / N
    moving_var  = sum_b n_b * (var_b + mean_b^2) / N - moving_mean^2   (biased)
                  ... * N / (N - 1)                 (moving_variance_estimator="unbiased")

where batch `b` contributes `n_b` values per channel (`N = sum_b n_b`), so the
result is batch-size weighted and exact, not an average of batch statistics.
The sums are `tfbn.stats.moment_sums` in float64; under a `tf.distribute`
strategy each replica sums its shards and one cross-replica SUM per batch
(`tfbn.distribute.run_and_sum`) makes the statistics global.

Why several passes: a layer's inputs at inference depend on the statistics of
every BN layer upstream of it. The layers are recalibrated in the order the
forward pass reaches them, one pass over the dataset each, with the model in
inference mode (`training=False`: dropout off, upstream BN layers already
normalising with their new statistics). Pass `k` fixes layer `k`, so afterwards
each layer's moving statistics are the true mean/variance of the inputs it
receives at inference. The cost is one pass of the dataset per BN layer;
recalibration sets are small (a few hundred batches are plenty).

Nothing is trained: no gradient is computed and no weight other than the
moving statistics (and tfbn's `num_batches_tracked`) is written. If anything
fails (empty dataset, elements that do not fit the model, an interrupt), every
statistic is restored before the error propagates.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import keras
import numpy as np
import tensorflow as tf

from tfbn import _compat, distribute, graph, stats
from tfbn.convert import batch_norm_layers
from tfbn.layers.batch_norm import BatchNormalization
from tfbn.report import Report, json_safe

_STATE = ("moving_mean", "moving_variance", "num_batches_tracked", "num_skipped_updates")
_EXAMPLES = "examples"


@dataclasses.dataclass
class RecalibrationResult(Report):
    """What `recalibrate` did (`ok`: at least one layer was recalibrated).

    Attributes:
        layers: Names of the recalibrated BN layers, in forward order.
        skipped: `{name: reason}` for BN layers left unchanged (not reached by the
            forward pass, or `track_running_stats=False`).
        batches: Batches in one pass over the dataset.
        examples: Examples in one pass over the dataset.
        passes: Passes made over the dataset (one per recalibrated layer).
        replicas: Replicas the statistics were summed over (1 without a strategy).
    """

    layers: list[str]
    skipped: dict[str, str]
    batches: int
    examples: int
    passes: int
    replicas: int

    @property
    def ok(self) -> bool:
        return bool(self.layers)

    def format(self) -> str:
        text = (
            f"recalibrated {len(self.layers)} BatchNormalization layer(s) over {self.batches} "
            f"batch(es) / {self.examples} example(s) in {self.passes} pass(es)"
            f"{f' on {self.replicas} replicas' if self.replicas > 1 else ''}"
        )
        return "\n".join([text] + [f"  skipped {n}: {why}" for n, why in self.skipped.items()])

    def to_dict(self) -> dict:
        return json_safe({"ok": self.ok, **dataclasses.asdict(self)})


def recalibrate(
    model: keras.Model,
    dataset,
    steps: int | None = None,
    progress: bool = True,
) -> RecalibrationResult:
    """Sets every BN layer's moving statistics to the population statistics of its inputs.

    Works for `keras.layers.BatchNormalization` and `tfbn.BatchNormalization`, in
    Sequential, Functional, subclassed and nested models. Each layer's variance
    follows its estimator (`moving_variance_estimator="unbiased"` gets the Bessel
    correction over the whole dataset; Keras layers and the default are biased).
    tfbn layers get `num_batches_tracked` = batches in the dataset, so a later
    cumulative average (`momentum=None`) continues with the right weight.
    `tfbn.FrozenBatchNormalization` layers (statistics fixed by design) and tfbn
    layers with `track_running_stats=False` are left alone. Batch-renorm layers
    (`renorm=True`, Keras's or tfbn's) get consistent renorm state: `moving_stddev =
    sqrt(moving_variance + epsilon)` (so the variance they derive from it is the
    recalibrated one), and `renorm_mean` / `renorm_stddev` = the population mean
    and `sqrt(biased variance + epsilon)`, so training resumes with corrections
    `r`, `d` of ~1 and ~0 on data like the calibration set.

    Args:
        model: A built Keras model with at least one BN layer. Under a
            `tf.distribute` strategy (the one the model was created under, or the
            one in scope) every replica processes its shard of each batch and the
            statistics are global.
        dataset: A finite `tf.data.Dataset` of batches, or a re-iterable sequence
            of batches (a list of arrays; not a generator: it is read once per BN
            layer). Elements are `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`,
            as for `model.fit`; labels are ignored. Under a strategy it must be a
            `tf.data.Dataset` of global batches.
        steps: Use only the first `steps` batches (required for an infinite dataset).
        progress: Show a progress bar (tqdm) on stderr.

    Returns:
        A `RecalibrationResult`.

    Raises:
        ValueError: The model has no BN layer or is not built, the dataset is
            empty or infinite without `steps`, or its elements do not fit the
            model. Nothing is modified in that case.
        TypeError: `dataset` is a one-shot iterator/generator or not iterable.

    Reference:
        - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576), "Rethinking
          'Batch' in BatchNorm", section 3 (precise BN).
    """
    all_layers = _check_arguments(model, steps)
    strategy = distribute.model_strategy(model)
    batches_of = _batch_source(dataset, steps, strategy)
    layers, skipped = _running_statistics_layers(model, all_layers)
    recorder = _Recorder(layers)
    snapshot = _snapshot(layers)
    replicas = distribute.strategy_replicas(strategy)
    bar = _progress_bar(progress)
    passes = _Passes(model, batches_of, bar)
    try:
        recorder.attach()
        passes.step = _make_step(model, recorder, strategy)
        done = _recalibrate_in_forward_order(passes, recorder, layers, skipped, steps)
    except BaseException:  # an interrupt too: never leave half-recalibrated statistics
        _restore(snapshot)
        raise
    finally:
        recorder.detach()
        bar.close()
    return RecalibrationResult(
        layers=[layer.name for layer in done],
        skipped=skipped,
        batches=passes.batches,
        examples=passes.examples,
        passes=len(done),
        replicas=replicas,
    )


def _check_arguments(model, steps) -> list:
    """Every BN layer of `model`; ValueError if the model or `steps` cannot be used."""
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.Model):
        raise ValueError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on a batch or give it an "
            "Input before recalibrating."
        )
    all_layers = batch_norm_layers(model)
    if not all_layers:
        raise ValueError(
            f"Model '{model.name}' has no BatchNormalization layer (keras or tfbn): "
            "there are no running statistics to recalibrate."
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"`steps` must be None or a positive integer. Received: steps={steps!r}")
    return all_layers


def _running_statistics_layers(model, all_layers) -> tuple[list, dict[str, str]]:
    """(the BN layers that use running statistics, `{name: why}` for the others)."""
    skipped = {
        layer.name: "track_running_stats=False (always normalises with batch statistics)"
        for layer in all_layers
        if isinstance(layer, BatchNormalization) and not layer.track_running_stats
    }
    layers = [layer for layer in all_layers if layer.name not in skipped]
    if not layers:
        raise ValueError(f"No BN layer of model '{model.name}' uses running statistics: {skipped}")
    return layers, skipped


# ----------------------------------------------------------------- passes --


class _Passes:
    """Passes over the dataset in inference mode; `batches` and `examples` are the
    last pass's."""

    def __init__(self, model, batches_of, bar):
        self.model, self.batches_of, self.bar = model, batches_of, bar
        self.step = None  # the compiled step, once the recorder is attached
        self.batches = self.examples = 0

    def run(self, description: str, first: bool = False) -> dict[str, np.ndarray]:
        """One pass: the float64 moment sums of every recorded layer, by layer key."""
        self.bar.set_description(description)
        totals, self.batches, self.examples = _one_pass(
            self.model, self.step, self.batches_of, self.bar, first=first
        )
        return totals


def _recalibrate_in_forward_order(passes: _Passes, recorder, layers, skipped, steps) -> list:
    """The first pass finds the order in which the forward pass reaches the layers
    and fixes the first one; each later pass fixes the next one, every layer upstream
    of it already normalising with its new statistics. Returns the layers, in order."""
    totals = passes.run("recalibrate: first pass", first=True)
    _check_first_pass(passes, recorder, layers, skipped, steps)
    passes.bar.total = passes.batches * len(recorder.order)
    passes.bar.refresh()
    done: list[keras.layers.Layer] = []
    target = recorder.order[0]
    while target is not None:
        _assign(target, totals[recorder.key(target)], passes.batches)
        done.append(target)
        target = _next_target(recorder.order, done)
        if target is not None:
            totals = passes.run(
                f"recalibrate {len(done) + 1}/{len(recorder.order)} '{target.name}'"
            )
    return done


def _check_first_pass(passes: _Passes, recorder, layers, skipped, steps) -> None:
    """Raises for an empty dataset or a forward pass that reached no BN layer; adds the
    layers it did not reach to `skipped`."""
    if passes.batches == 0:
        raise ValueError(
            "The dataset is empty: it yielded no batch"
            f"{f' in {steps} steps' if steps else ''}, so there is nothing to "
            "compute statistics from. Nothing was modified."
        )
    reached = {id(layer) for layer in recorder.order}
    for layer in layers:
        if id(layer) not in reached:
            skipped[layer.name] = "not reached by the model's forward pass"
    if not recorder.order:
        raise ValueError(
            f"No BN layer of model '{passes.model.name}' was called by its forward pass."
        )


def _next_target(order, done):
    finished = {id(layer) for layer in done}
    return next((layer for layer in order if id(layer) not in finished), None)


def _one_pass(model, step, batches_of, bar, first: bool):
    """One pass over the dataset: float64 sums per layer key, batches, examples."""
    totals: dict[str, np.ndarray] = {}
    batches = 0
    for element in batches_of():
        try:
            sums = step(element)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
            if not first or batches:
                raise
            raise ValueError(
                "The dataset's elements do not fit the model: the model could not be "
                f"called on the first batch (element structure: {_describe(element)}; "
                f"model inputs: {_model_inputs(model)}). Nothing was modified. "
                f"Cause: {type(err).__name__}: {_first_line(err)}"
            ) from err
        for key, value in sums.items():
            value = np.asarray(value, np.float64)
            totals[key] = totals[key] + value if key in totals else value
        batches += 1
        bar.update(1)
    examples = int(totals.pop(_EXAMPLES, 0))
    return totals, batches, examples


def _assign(layer, sums: np.ndarray, batches: int) -> None:
    """Writes population statistics from summed `moment_sums` into `layer`."""
    mean, biased, count = stats.moments_from_sums(tf.constant(sums), tf.float64)
    variance = biased
    if getattr(layer, "moving_variance_estimator", "biased") == "unbiased":
        variance = stats.bessel_correction(variance, count)
    layer.moving_mean.assign(tf.cast(mean, layer.moving_mean.dtype))
    layer.moving_variance.assign(tf.cast(variance, layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):  # Keras's and tfbn's renorm state, kept consistent
        eps = tf.constant(layer.epsilon, tf.float64)
        for var, value in (
            (layer.moving_stddev, tf.sqrt(variance + eps)),
            (layer.renorm_mean, mean),
            (layer.renorm_stddev, tf.sqrt(biased + eps)),
        ):
            var.assign(tf.cast(value, var.dtype))  # fmt: skip
    if getattr(layer, "num_batches_tracked", None) is not None:
        layer.num_batches_tracked.assign(batches)


def _make_step(model, recorder, strategy):
    """A compiled step: forward pass in inference mode, returns summed moment sums."""

    def replica_step(element):
        x = _features(element)
        recorder.start()
        model(x, training=False)
        sums = recorder.collect()
        first = tf.nest.flatten(x)[0]
        sums[_EXAMPLES] = tf.cast(tf.shape(first)[0], tf.float64)
        return sums

    @tf.function(reduce_retracing=True)
    def step(element):
        return distribute.run_and_sum(strategy, replica_step, element)

    return step


class _Recorder:
    """Instruments BN layers' `call` to record moment sums of their inputs.

    Records are thread-local: MirroredStrategy traces each replica in its own
    thread. `order` is the order in which the forward pass first calls each layer.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.order: list[keras.layers.Layer] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    @staticmethod
    def key(layer) -> str:
        return f"bn_{id(layer)}"

    def attach(self) -> None:
        for layer in self.layers:
            original = layer.call

            def call(inputs, *args, _layer=layer, _original=original, **kwargs):
                self._record(_layer, inputs, kwargs.get("mask"))
                return _original(inputs, *args, **kwargs)

            object.__setattr__(layer, "call", call)

    def detach(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("call", None)

    def start(self) -> None:
        self._local.sums = {}

    def collect(self) -> dict:
        records = getattr(self._local, "sums", {})
        self._local.sums = {}
        return {key: tf.add_n(values) for key, values in records.items()}

    def _record(self, layer, inputs, mask) -> None:
        records = getattr(self._local, "sums", None)
        if records is None:  # called outside a recalibration step
            return
        with self._lock:
            if all(layer is not seen for seen in self.order):
                self.order.append(layer)
        x = tf.convert_to_tensor(inputs)
        weights = None
        if mask is not None:
            weights = tf.cast(mask, stats.stat_dtype(x.dtype))
            while len(weights.shape) < len(x.shape):
                weights = tf.expand_dims(weights, -1)
        mean, variance, count = stats.moments(x, _reduction_axes(layer, len(x.shape)), weights)
        records.setdefault(self.key(layer), []).append(stats.moment_sums(mean, variance, count))


def _reduction_axes(layer, rank: int) -> list[int]:
    return graph.reduction_axes(layer.axis, rank)


# ------------------------------------------------------------------ data --


def _batch_source(dataset, steps, strategy):
    """A function returning a fresh iterator over (possibly distributed) batches."""
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        if steps is None and cardinality == int(tf.data.INFINITE_CARDINALITY):
            raise ValueError(
                "The dataset is infinite (e.g. it repeats): pass `steps` to say how many "
                "batches to use. Received: steps=None"
            )
        if steps is not None:
            dataset = dataset.take(steps)
        if strategy is not None:
            dataset = distribute.distribute_dataset(strategy, dataset)
        return lambda: iter(dataset)
    if strategy is not None:
        raise TypeError(
            "Under a tf.distribute strategy `dataset` must be a tf.data.Dataset of global "
            f"batches. Received: {type(dataset).__name__}"
        )
    if isinstance(dataset, (np.ndarray, tf.Tensor)) or isinstance(dataset, (str, bytes)):
        raise TypeError(
            "`dataset` must be a tf.data.Dataset or a sequence of batches; a single array "
            "is ambiguous. Use tf.data.Dataset.from_tensor_slices(x).batch(n). "
            f"Received: {type(dataset).__name__}"
        )
    if not hasattr(dataset, "__iter__") or iter(dataset) is dataset:
        raise TypeError(
            "`dataset` must be re-iterable (a tf.data.Dataset, a list of batches, a "
            "keras.utils.PyDataset): recalibration reads it once per BN layer. Received: "
            f"{type(dataset).__name__}"
        )

    def batches():
        source = iter(dataset)
        return itertools.islice(source, steps) if steps is not None else source

    return batches


def _features(element):
    """`x` of an `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)` element."""
    if isinstance(element, (tuple, list)) and 1 <= len(element) <= 3:
        return element[0]
    return element


def _describe(element) -> str:
    def spec(value):
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        name = getattr(dtype, "name", dtype)
        return f"{tuple(shape) if shape is not None else type(value).__name__} {name or ''}".strip()

    try:
        return str(tf.nest.map_structure(spec, element))
    except Exception:  # noqa: BLE001 - only a description
        return type(element).__name__


def _model_inputs(model) -> str:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return "unknown (subclassed model)"
    return str([tuple(t.shape) for t in inputs])


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


# ----------------------------------------------------------- state, progress --


def _snapshot(layers) -> list[tuple]:
    saved = []
    for layer in layers:
        for name in _STATE:
            variable = getattr(layer, name, None)
            if variable is not None:
                saved.append((variable, np.array(variable.numpy())))
    return saved


def _restore(snapshot) -> None:
    for variable, value in snapshot:
        variable.assign(value)


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="batch", disable=not enabled, leave=False)
