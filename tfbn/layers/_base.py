"""What tfbn's BatchNormalization and FrozenBatchNormalization share.

Axis handling, Keras's four weights (same names, order, dtype), the two tfbn
counters, Keras's input rules and the common part of the config live here once.

**Where the counters live.** `num_batches_tracked`, `num_skipped_updates` and
`num_single_value_batches` are Keras variables (so a strategy mirrors them and a traced or compiled step updates
them like any other state) that the layer does NOT track: they are not in
`weights`, `variables` or `non_trainable_variables`, which are exactly Keras's
lists. Hence `stateless_call` takes Keras's arguments and `.weights.h5` files
move between Keras's layer and tfbn's in both directions. They are saved in
`.keras` files as the layer's *assets* (`save_assets` / `load_assets`, a small
JSON file), which Keras writes for `.keras` files but not for `.weights.h5`
files; a `.weights.h5` file therefore restores every weight but leaves the
counters as they were. Inside `stateless_call` their updates are dropped (they
are not part of the state Keras threads through), as for any untracked state.
"""

from __future__ import annotations

import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from tfbn import _compat, _validate, stats

COUNTER_NAMES = ("num_batches_tracked", "num_skipped_updates", "num_single_value_batches")
# tfbn 0.1 stored these two after the weights in the weights store.
_LEGACY_COUNTERS = COUNTER_NAMES[:2]
_COUNTERS_FILE = "tfbn_counters.json"
logger = logging.getLogger("tfbn")


class _Counters:
    """Holds the counter variables where Keras's attribute tracking does not look."""

    def __init__(self, variables):
        self.variables = dict(variables)


def resolve_channel_axes(axis: list[int], input_shape: tuple) -> list[int]:
    """Non-negative, sorted channel axes of `axis` for `input_shape`.

    Raises ValueError naming the shape when an axis is out of range (or is the batch
    axis) or a channel dimension is unknown.
    """
    rank = len(input_shape)
    axes = sorted({a % rank if -rank <= a < rank else a for a in axis})
    if any(not 0 <= a < rank for a in axes) or 0 in axes:
        raise ValueError(
            f"`axis` {axis} is out of range for input shape {input_shape} "
            f"(rank {rank}); accepted: channel axes in [1, {rank - 1}] or "
            f"[-{rank - 1}, -1]."
        )
    if any(input_shape[a] is None for a in axes):
        raise ValueError(
            f"The channel dimension(s) {axis} of the input must be known. "
            f"Received: input_shape={input_shape}"
        )
    return axes


class BatchNormBase(keras.layers.Layer):
    """Axis, epsilon, center/scale, Keras's weights, tfbn's counters, input rules."""

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, **kwargs):
        # Called explicitly, not through super(): tfbn's BatchNormalization also
        # derives from keras.layers.BatchNormalization (for isinstance checks) and
        # must not run that class's constructor, which rejects tfbn's arguments.
        keras.layers.Layer.__init__(self, **kwargs)
        self.axis = _validate.axis("axis", axis)
        self.epsilon = _validate.epsilon("epsilon", epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self._counters = None

    # ------------------------------------------------------------ weights --

    def _build_base(self, input_shape, gamma=None, beta=None, moving=None):
        """Channel axes, input spec and Keras's four weights in Keras's order.

        `gamma`/`beta`/`moving` are extra `add_weight` arguments (initializer,
        regularizer, trainable, aggregation, ...) of the scale, the offset and
        the two moving statistics.
        """
        input_shape = tuple(input_shape)
        axes = resolve_channel_axes(self.axis, input_shape)
        self._channel_axes = axes
        self._reduction_axes = [a for a in range(len(input_shape)) if a not in axes]
        self._param_kwargs = dict(
            shape=tuple(input_shape[a] for a in axes),
            dtype=stats.stat_dtype(self.variable_dtype),
            autocast=False,
        )
        if self.scale:
            self.gamma = self.add_weight(name="gamma", **self._param_kwargs, **(gamma or {}))
        if self.center:
            self.beta = self.add_weight(name="beta", **self._param_kwargs, **(beta or {}))
        moving = moving or {}
        self.moving_mean = self.add_weight(
            name="moving_mean", trainable=False, **self._param_kwargs,
            **{"initializer": "zeros", **moving.get("mean", {})},
        )  # fmt: skip
        self.moving_variance = self.add_weight(
            name="moving_variance", trainable=False, **self._param_kwargs,
            **{"initializer": "ones", **moving.get("variance", {})},
        )  # fmt: skip
        self._build_counters()
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape), axes={a: input_shape[a] for a in axes}
        )

    def _build_counters(self):
        """Creates the counters as untracked Keras variables (see the module docstring).

        `aggregation="only_first_replica"`: under a strategy every replica adds
        the same, already cross-replica, amount, and the first replica's value is
        the one written to every copy.
        """
        with keras.name_scope(self.name, caller=self):
            variables = {
                name: keras.Variable(
                    initializer="zeros",
                    shape=(),
                    dtype="int64",
                    trainable=False,
                    aggregation="only_first_replica",
                    name=name,
                )
                for name in COUNTER_NAMES
            }
        self._counters = _Counters(variables)

    def _counter(self, name):
        return None if self._counters is None else self._counters.variables[name]

    @property
    def num_batches_tracked(self):
        """Batches whose statistics entered the moving averages (int64 variable; None before build)."""
        return self._counter("num_batches_tracked")

    @property
    def num_skipped_updates(self):
        """Training batches whose non-finite statistics were not applied (int64 variable)."""
        return self._counter("num_skipped_updates")

    @property
    def num_single_value_batches(self):
        """Training batches with one value per channel (variance 0; int64 variable).

        Counted at run time, so also in traced steps whose batch size is unknown
        when traced; `tfbn inspect` reports a layer where it is nonzero.
        """
        return self._counter("num_single_value_batches")

    # ------------------------------------------------------------- saving --

    def save_assets(self, dir_path):
        """Writes the counters into `.keras` files (Keras calls this for `.keras` only)."""
        if self._counters is None:
            return
        values = {n: int(np.asarray(v)) for n, v in self._counters.variables.items()}
        with open(os.path.join(dir_path, _COUNTERS_FILE), "w") as f:
            json.dump(values, f)

    def load_assets(self, dir_path):
        """Restores the counters from a `.keras` file written by `save_assets`."""
        if dir_path is None or self._counters is None:  # Keras passes None: no assets saved
            return
        path = os.path.join(dir_path, _COUNTERS_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            values = json.load(f)
        for name, value in values.items():
            if name in self._counters.variables:
                self._counters.variables[name].assign(int(value))

    def load_own_variables(self, store):
        """Loads Keras-layout stores, and tfbn 0.1 stores that also held the two
        counters after the weights."""
        all_vars = self._trainable_variables + self._non_trainable_variables
        if self._counters is not None and len(store.keys()) == len(all_vars) + len(
            _LEGACY_COUNTERS
        ):
            for i, v in enumerate(all_vars):
                v.assign(store[f"{i}"])
            for i, name in enumerate(_LEGACY_COUNTERS):
                self._counters.variables[name].assign(store[f"{len(all_vars) + i}"])
            return
        super().load_own_variables(store)

    # --------------------------------------------------------- input rules --

    def _standardize_inputs(self, inputs):
        """Keras's input rules: array-likes become tensors; integer and boolean
        inputs are cast to the compute dtype (Keras casts them to float). A Keras 2
        (tf.keras / tf_keras) tensor fails at once, saying how to switch."""
        _compat.check_not_legacy_keras(inputs, "inputs")
        inputs = tf.convert_to_tensor(inputs)
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, self.compute_dtype)
        return inputs

    def _fold_is_exact(self) -> bool:
        """Whether inference may use Keras's `x * scale + offset` (`tfbn.stats.fold_is_exact`).

        Decided on the moving statistics' values when the call runs eagerly or is
        traced (read outside the graph), so a compiled function keeps the form it
        was traced with: exact for frozen statistics and exports; a function traced
        before the statistics moved far from 0 keeps the folded (Keras's) form. If
        the values cannot be read, the stable form.
        """
        try:
            with tf.init_scope():
                mean, variance = np.asarray(self.moving_mean), np.asarray(self.moving_variance)
        except Exception:  # noqa: BLE001 - unreadable here: the form that is always exact
            return False
        return stats.fold_is_exact(mean, variance, self.epsilon)

    def _broadcast_shape(self, rank):
        """Shape that broadcasts a per-channel statistic against a rank-`rank` input."""
        dims = iter(self.moving_mean.shape)
        return [next(dims) if a in self._channel_axes else 1 for a in range(rank)]

    def compute_output_shape(self, input_shape):
        return input_shape

    def _base_config(self):
        return {
            "axis": self.axis if len(self.axis) > 1 else self.axis[0],
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }
