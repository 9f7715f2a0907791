"""The statistics probe of a tfbn export: what each BN layer's input looks like on live traffic.

Frozen BN is only right while live inputs look like the data its running
statistics came from. Every tfbn export carries two extra signatures, both with
the inputs of `serving_default`, so a client (`tfbn drift`) can measure it:

- `tfbn_batch_norm_statistics`: one output per BN layer, in forward order, keyed
  `bn<index>_<layer name>`: float64 `[batch, 3, C]`, each example's moment sums
  `[n, sum(x), sum(x**2)]` of that layer's input `x` per channel (the layout of
  `tfbn.stats.moment_sums`, see `tfbn.stats.example_moment_sums`). Adding rows over
  any number of requests gives the exact float64 sums of all that traffic.
- `tfbn_batch_norm_reference`: the same keys, float64 `[batch, 3, C]`: the
  layer's `moving_mean`, `moving_variance` and `epsilon`, repeated per row (one
  row is enough), so a client of a live server needs no file from the export.

Both are batch-major: nothing is reduced over the batch axis, so TF Serving's
server-side batching (which concatenates requests and splits every output along
axis 0) carries them, and an example's row never depends on its batch-mates
(the training-mode lint, which looks for reductions over axis 0, has nothing to
find). `serving_default` is traced before and apart from them and is unchanged.

Folded layers have no BN left in the served graph. Their input `x` is recovered
from the folded producer's output `y = gamma * (x - mean) / sqrt(var + eps) + beta`
as `x = mean + sqrt(var + eps) * (y - beta) / gamma` (float64, per element). A
channel with `|gamma| < tfbn.inspect.DEAD_GAMMA` carries no information about its
input (its output is ~beta whatever comes in, so its statistics do not matter to
the prediction either): it gets `n = 0` in every row, which a client reads as
"not observable". Frozen (not folded) layers and, for `fold=False` exports or
`.keras` models in process, BN layers themselves are probed directly.

`assets.extra/tfbn_batch_norm_statistics.json` names the layers (key, name, kind,
folded_into, channels, unobservable channels) for readers of the directory.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
import tensorflow as tf

from tfbn import stats
from tfbn.convert import _bn_params, is_batch_norm
from tfbn.inspect import DEAD_GAMMA
from tfbn.layers.batch_norm import BatchNormalization
from tfbn.layers.frozen_batch_norm import FoldedBatchNormalization, FrozenBatchNormalization

STATISTICS_SIGNATURE = "tfbn_batch_norm_statistics"
REFERENCE_SIGNATURE = "tfbn_batch_norm_reference"
ASSET_FILE = "tfbn_batch_norm_statistics.json"
FOLDED, FROZEN, BATCH_NORM = "folded", "frozen", "batch_norm"
_KEY = re.compile(r"^bn(\d+)_(.*)$")


def output_key(index: int, name: str) -> str:
    """The output alias of the `index`-th probed layer (`bn003_conv2_bn`)."""
    return f"bn{index:03d}_" + re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def parse_key(key: str) -> tuple[int, str] | None:
    """`(index, layer name)` of an output alias, or None if it is not one."""
    match = _KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass
class ProbedLayer:
    """One BN layer the probe reports on."""

    key: str
    name: str
    kind: str  # FOLDED, FROZEN or BATCH_NORM
    folded_into: str | None
    channels: int
    epsilon: float
    mean: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    observed: np.ndarray = field(repr=False)  # bool per channel

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("mean", "variance", "observed"):
            out.pop(name)
        out["unobservable_channels"] = np.flatnonzero(~self.observed).tolist()
        return out


def _is_probe_target(layer) -> bool:
    return is_batch_norm(layer) or isinstance(
        layer, (FrozenBatchNormalization, FoldedBatchNormalization)
    )


def _layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if _is_probe_target(layer)]  # fmt: skip


class _Target:
    """How to turn one served layer's input into its BN input: x = a * t + b, weights."""

    def __init__(self, served, params: dict, kind: str):
        self.served, self.kind = served, kind
        self.axis = params["axis"]
        mean, variance = params["moving_mean"], params["moving_variance"]
        self.mean, self.variance = mean.reshape(-1), variance.reshape(-1)
        self.epsilon = params["epsilon"]
        self.folded_into = getattr(served, "folded_into", None)
        self.observed = np.ones(self.mean.shape, bool)
        self.a = self.b = None
        if kind == FOLDED:
            gamma = params["gamma"] if params["gamma"] is not None else np.ones_like(mean)
            beta = params["beta"] if params["beta"] is not None else np.zeros_like(mean)
            gamma, beta = gamma.reshape(-1), beta.reshape(-1)
            self.observed = np.abs(gamma) >= DEAD_GAMMA
            safe = np.where(self.observed, gamma, 1.0)
            a = np.sqrt(self.variance + self.epsilon) / safe
            self.a = np.where(self.observed, a, 0.0)
            self.b = np.where(self.observed, self.mean - a * beta, 0.0)

    def sums(self, inputs, mask) -> tf.Tensor:
        rank = len(inputs.shape)
        axes = sorted(a % rank for a in self.axis)
        weights = None
        if mask is not None:
            weights = tf.cast(mask, tf.float64)
            while len(weights.shape) < rank:
                weights = tf.expand_dims(weights, -1)
        x = inputs
        if self.kind == FOLDED:
            shape = [inputs.shape[a] if a in axes else 1 for a in range(rank)]
            a = tf.constant(self.a.reshape(shape), tf.float64)
            b = tf.constant(self.b.reshape(shape), tf.float64)
            x = tf.cast(inputs, tf.float64) * a + b
            if not self.observed.all():
                seen = tf.constant(self.observed.reshape(shape), tf.float64)
                weights = seen if weights is None else weights * seen
        return stats.example_moment_sums(x, axes, weights)


class StatisticsProbe:
    """Builds the statistics and reference functions of a model.

    Args:
        model: The Keras model whose BN layers are reported on (the one exported).
        served_model: The model that is actually served, e.g. the output of
            `tfbn.convert.fold_batch_norm(model)`; None probes `model` itself.
    """

    def __init__(self, model: keras.Model, served_model: keras.Model | None = None):
        self.model = model
        self.served_model = model if served_model is None else served_model
        originals = [layer for layer in _layers(model) if not isinstance(
            layer, FoldedBatchNormalization)]  # fmt: skip
        by_name: dict[str, list] = {}
        for layer in originals:
            by_name.setdefault(layer.name, []).append(layer)
        self.skipped: dict[str, str] = {}
        self._targets: list[_Target] = []
        for served in _layers(self.served_model):
            if isinstance(served, FoldedBatchNormalization):
                same = by_name.get(served.name, [])
                if len(same) != 1:
                    raise ValueError(
                        f"Cannot find the BatchNormalization '{served.name}' folded into "
                        f"'{served.folded_into}' in the source model (found {len(same)} layers "
                        "of that name); pass the model the served model was folded from."
                    )
                source, kind = same[0], FOLDED
            else:
                source = served
                kind = FROZEN if isinstance(served, FrozenBatchNormalization) else BATCH_NORM
            if isinstance(source, BatchNormalization) and not source.track_running_stats:
                self.skipped[served.name] = (
                    "track_running_stats=False: it normalises with batch statistics, so there "
                    "are no running statistics to compare traffic with"
                )
                continue
            self._targets.append(_Target(served, _bn_params(source), kind))
        self.layers: list[ProbedLayer] = []
        self._order: list[_Target] = []

    @property
    def has_batch_norm(self) -> bool:
        return bool(self._targets)

    # --------------------------------------------------------------- tracing --

    def _forward(self, inputs) -> dict[str, tf.Tensor]:
        """Calls the served model in inference mode, recording every target's sums."""
        records: dict[int, list] = {}
        order: list[_Target] = []
        lock = threading.Lock()
        originals = {}

        for target in self._targets:
            layer = target.served
            original = layer.call
            originals[id(layer)] = layer

            def call(x, *args, _t=target, _call=original, **kwargs):
                with lock:
                    if id(_t) not in records:
                        order.append(_t)
                    records.setdefault(id(_t), []).append(_t.sums(x, kwargs.get("mask")))
                return _call(x, *args, **kwargs)

            object.__setattr__(layer, "call", call)
        try:
            self.served_model(inputs, training=False)
        finally:
            for layer in originals.values():
                layer.__dict__.pop("call", None)
        self._order = order
        self.layers = [
            ProbedLayer(
                key=output_key(i, t.served.name),
                name=t.served.name,
                kind=t.kind,
                folded_into=t.folded_into,
                channels=int(t.mean.size),
                epsilon=t.epsilon,
                mean=t.mean,
                variance=t.variance,
                observed=t.observed,
            )  # fmt: skip
            for i, t in enumerate(order)
        ]
        reached = {id(t) for t in order}
        for t in self._targets:
            if id(t) not in reached:
                self.skipped[t.served.name] = "not reached by the model's forward pass"
        return {
            layer.key: tf.add_n(records[id(t)]) if len(records[id(t)]) > 1 else records[id(t)][0]
            for layer, t in zip(self.layers, order, strict=True)
        }

    def reference(self) -> dict[str, np.ndarray]:
        """`{key: float64 [3, C]}`: moving mean, moving variance and epsilon per channel."""
        return {
            layer.key: np.stack(
                [layer.mean, layer.variance, np.full(layer.mean.shape, layer.epsilon)]
            )  # fmt: skip
            for layer in self.layers
        }

    def functions(self, specs: dict[str, tf.TensorSpec]):
        """The two concrete functions `{signature name: ConcreteFunction}` for `specs`
        (the serving_default input specs, in order)."""
        from tfbn.graph import pack_inputs

        def statistics(*tensors):
            return self._forward(pack_inputs(self.model, specs, list(tensors)))

        statistics_fn = tf.function(
            statistics, input_signature=list(specs.values()), autograph=False
        ).get_concrete_function()
        if not self.layers:
            raise ValueError(
                f"No BatchNormalization layer of model '{self.model.name}' with running "
                f"statistics is called by its forward pass (skipped: {self.skipped or 'none'})."
            )
        reference = {k: tf.constant(v) for k, v in self.reference().items()}

        def reference_rows(*tensors):
            rows = tf.shape(tensors[0])[0]
            return {k: tf.tile(v[None], [rows, 1, 1]) for k, v in reference.items()}

        reference_fn = tf.function(
            reference_rows, input_signature=list(specs.values()), autograph=False
        ).get_concrete_function()
        return {STATISTICS_SIGNATURE: statistics_fn, REFERENCE_SIGNATURE: reference_fn}

    def asset(self) -> dict:
        return {
            "signature": STATISTICS_SIGNATURE,
            "reference_signature": REFERENCE_SIGNATURE,
            "layout": "per example: [n, sum(x), sum(x**2)] per channel of each BN layer's input",
            "dead_gamma": DEAD_GAMMA,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": self.skipped,
        }


def statistics_signatures(
    model: keras.Model, served_model: keras.Model, specs
) -> tuple[dict, dict | None]:
    """What `tfbn.export.export_saved_model` adds: `({name: ConcreteFunction}, asset)`.

    `({}, None)` for a model without a BN layer with running statistics (there is
    nothing to measure); raises ValueError if the probe cannot be built.
    """
    probe = StatisticsProbe(model, served_model)
    if not probe.has_batch_norm:
        return {}, None
    try:
        functions = probe.functions(specs)
    except ValueError:
        if not probe.layers:
            return {}, None
        raise
    return functions, probe.asset()


def write_asset(extra_dir: str, asset: dict | None) -> None:
    """Writes `assets.extra/tfbn_batch_norm_statistics.json` (nothing for None)."""
    if asset is None:
        return
    os.makedirs(extra_dir, exist_ok=True)
    with open(os.path.join(extra_dir, ASSET_FILE), "w", encoding="utf-8") as f:
        json.dump(asset, f, indent=1)
