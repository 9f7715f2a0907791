"""`tfbn.BatchNormalization`: a drop-in, fused replacement for `keras.layers.BatchNormalization`."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from tfbn import _compat, distribute, stats

ESTIMATORS = ("biased", "unbiased")
FUSED_CHOICES = ("auto", True, False)
# Weights beyond Keras's four; they are layer state (saved, restored, mirrored)
# but not part of `layer.weights`, so `set_weights` stays Keras-compatible.
COUNTER_NAMES = ("num_batches_tracked", "num_skipped_updates")


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization on TensorFlow's fused kernel, a drop-in for Keras's layer.

    Normalises each channel with the statistics of the current batch while
    training and with moving averages of them at inference:

        y = gamma * (x - mean) / sqrt(var + epsilon) + beta

    Training (`training=True` and `layer.trainable`): `mean`/`var` are the biased
    batch moments (two-pass, float32 even for float16/bfloat16 inputs), and

        moving_mean = moving_mean * momentum + mean * (1 - momentum)
        moving_var  = moving_var  * momentum + var  * (1 - momentum)

    Inference: `mean`/`var` are `moving_mean`/`moving_variance`, so the output of
    one example never depends on the rest of its batch.

    Constructor arguments, defaults, weight names and weight order are Keras's
    (`gamma`, `beta`, `moving_mean`, `moving_variance`), so weights move between
    the two layers with `get_weights`/`set_weights` and outputs match. Two int64
    counters, `num_batches_tracked` and `num_skipped_updates`, are saved with the
    layer and mirrored under a strategy, but are not in `layer.weights`.

    **`trainable=False` means inference mode** (as in Keras): a frozen layer
    normalises with its moving statistics and never updates them, even when
    called with `training=True`, which is what fine-tuning on a new dataset
    needs. (In PyTorch, `requires_grad=False` alone does not do this.)

    **Under a `tf.distribute` strategy.** With `synchronized=True` every replica
    normalises with the mean and variance of the global batch (or of its group of
    `sync_group_size` replicas): local two-pass moments are packed as float64
    moment sums and merged in ONE all-reduce (`tfbn.distribute`), exact for
    uneven and empty per-replica batches and free of the `E[x^2] - E[x]^2`
    cancellation. Where the fused kernel applies, it computes the local moments
    and a custom gradient all-reduces the two backward sums once (as PyTorch's
    SyncBatchNorm); elsewhere gradients flow through the all-reduce.
    The moving statistics are mirrored variables with `aggregation="mean"`:
    each replica's update is averaged over replicas before it is written to
    every copy, so the copies never drift apart. Unsynchronised, they hold the
    mean over replicas of the per-replica EMA updates (Keras's layer instead
    keeps each replica's own, different copy); synchronised, every replica's
    update is already the same (with groups: the mean over groups). What is
    saved, exported or used at inference is therefore that replica mean. The
    counters use `aggregation="only_first_replica"`.

    Args:
        axis: Integer or list of integers, the channel axis/axes (not reduced).
            `-1` for channels-last, `1` for channels-first.
        momentum: Momentum of the moving averages (Keras convention, above), or
            `None` for a cumulative moving average: the plain mean of every batch
            statistic seen so far (PyTorch's `momentum=None`).
        momentum_convention: `"keras"` (default; `momentum` is the weight of the
            old value, ~0.99) or `"pytorch"` (`momentum` is the weight of the new
            batch, ~0.1): `moving = (1 - momentum) * moving + momentum * batch`.
        epsilon: Small float added to the variance to avoid dividing by zero.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: Initializers of the four weights.
        beta_regularizer, gamma_regularizer: Optional regularizers.
        beta_constraint, gamma_constraint: Optional constraints.
        synchronized: If True, under a `tf.distribute` strategy the batch
            statistics are those of the global batch: one all-reduce per call
            forward and one backward (see "Under a strategy" below). Without a
            strategy (or with one replica) it is a no-op.
        sync_group_size: With `synchronized=True`, synchronise only within
            consecutive groups of this many replicas (must divide the replica
            count; ValueError otherwise).
        moving_variance_estimator: `"biased"` (Keras; the default) stores the
            batch variance as used for normalisation; `"unbiased"` (PyTorch)
            stores it Bessel-corrected, `var * n / (n - 1)`.
        track_running_stats: If False, always normalise with batch statistics,
            in training and inference, and never update the moving statistics.
        virtual_batch_size: Ghost batch norm: statistics are computed over
            sub-batches of this many examples (the batch size must be a multiple
            of it); the moving averages use the mean of the sub-batch statistics.
        skip_nonfinite_updates: If True (default), a batch whose statistics
            contain NaN/Inf leaves the moving statistics unchanged and increments
            `num_skipped_updates` instead of corrupting them.
        fused: `"auto"` (default) uses TensorFlow's fused kernel wherever it is
            valid: a single channel axis that is last or `1`, no mask, no virtual
            batch, float16/bfloat16/float32. `True` requires it (ValueError
            otherwise); `False` always uses the unfused path.
        renorm, renorm_clipping, renorm_momentum: Accepted so Keras configs load;
            batch renormalization is not implemented (`renorm=True` raises).
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Float tensor of any rank >= 2.
        training: Python boolean or None: batch statistics (True) or moving
            statistics (False/None).
        mask: Optional boolean tensor of the inputs' shape without the last
            axis; masked-out positions are ignored by the batch statistics.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) (ghost batch norm).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        sync_group_size=None,
        momentum_convention="keras",
        moving_variance_estimator="biased",
        track_running_stats=True,
        virtual_batch_size=None,
        skip_nonfinite_updates=True,
        fused="auto",
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validate_axis(axis)
        self._momentum_variable = None
        self.momentum = momentum  # validated by the `momentum` property setter
        if momentum_convention not in stats.MOMENTUM_CONVENTIONS:
            raise ValueError(
                f"`momentum_convention` must be one of {stats.MOMENTUM_CONVENTIONS}. "
                f"Received: momentum_convention={momentum_convention!r}"
            )
        self.momentum_convention = momentum_convention
        self.epsilon = float(epsilon)
        if not self.epsilon > 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon}")
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        if sync_group_size is not None and (
            not isinstance(sync_group_size, int) or sync_group_size < 1
        ):
            raise ValueError(
                "`sync_group_size` must be None or a positive integer. "
                f"Received: sync_group_size={sync_group_size!r}"
            )
        self.sync_group_size = sync_group_size
        if moving_variance_estimator not in ESTIMATORS:
            raise ValueError(
                f"`moving_variance_estimator` must be one of {ESTIMATORS}. "
                f"Received: moving_variance_estimator={moving_variance_estimator!r}"
            )
        self.moving_variance_estimator = moving_variance_estimator
        self.track_running_stats = bool(track_running_stats)
        if virtual_batch_size is not None and (
            not isinstance(virtual_batch_size, int) or virtual_batch_size < 1
        ):
            raise ValueError(
                "`virtual_batch_size` must be None or a positive integer. "
                f"Received: virtual_batch_size={virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size
        self.skip_nonfinite_updates = bool(skip_nonfinite_updates)
        if fused not in FUSED_CHOICES:
            raise ValueError(f"`fused` must be one of {FUSED_CHOICES}. Received: fused={fused!r}")
        self.fused = fused
        if renorm:
            raise ValueError(
                "tfbn.BatchNormalization does not implement batch renormalization. "
                "Received: renorm=True; use keras.layers.BatchNormalization(renorm=True)."
            )
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.num_batches_tracked = self.num_skipped_updates = None

    # ---------------------------------------------------------------- build --

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        axes = resolve_channel_axes(self.axis, input_shape)
        self._channel_axes = axes
        self._reduction_axes = [a for a in range(rank) if a not in axes]
        param_shape = tuple(input_shape[a] for a in axes)
        param_dtype = stats.stat_dtype(self.variable_dtype)
        common = dict(shape=param_shape, dtype=param_dtype, autocast=False)
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                **common,
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                **common,
            )
        # Under a strategy, "mean" aggregation averages each replica's update, so
        # unsynchronised moving statistics never drift apart across replicas.
        self.moving_mean = self.add_weight(
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            aggregation="mean",
            **common,
        )
        self.moving_variance = self.add_weight(
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            aggregation="mean",
            **common,
        )
        self.num_batches_tracked, self.num_skipped_updates = (
            self.add_weight(
                name=name,
                shape=(),
                dtype="int64",
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
            )
            for name in COUNTER_NAMES
        )
        if self._momentum is not None:
            # Read by the update inside the traced train step, so assigning
            # `layer.momentum` (e.g. a momentum schedule) applies in compiled
            # `model.fit`. Runtime state only: not in `weights`, not saved (the
            # config carries `momentum`).
            with tf.init_scope():
                self._momentum_variable = tf.Variable(
                    self._momentum, dtype=tf.float32, trainable=False, name="momentum"
                )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in axes}
        )
        self._fused_format = self._fused_data_format(rank)
        if self.fused is True and self._fused_format is None:
            raise ValueError(
                "fused=True needs a single channel axis that is last or 1, no "
                "virtual_batch_size and no float64 weights. Received: "
                f"axis={self.axis}, input_shape={input_shape}, "
                f"virtual_batch_size={self.virtual_batch_size}, dtype={self.variable_dtype}."
            )

    def _fused_data_format(self, rank: int) -> str | None:
        """"NHWC"/"NCHW" when the fused kernel can serve this layer, else None."""
        if self.fused is False or self.virtual_batch_size is not None:
            return None
        if stats.stat_dtype(self.variable_dtype) != tf.float32:
            return None
        if len(self._channel_axes) != 1:
            return None
        if self._channel_axes[0] == rank - 1:
            return "NHWC"
        if self._channel_axes[0] == 1:
            return "NCHW"
        return None

    @property
    def momentum(self):
        """Momentum of the moving averages, or None for a cumulative average.

        Assigning a float after `build` updates the variable the update reads, so
        the new value applies inside an already compiled `model.fit` (this is how
        `tfbn.callbacks.BatchNormMomentumScheduler` works). A layer built with
        `momentum=None` cannot switch to an EMA afterwards, nor the reverse.
        """
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        if value is not None:
            received = value
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    "`momentum` must be in [0, 1] or None (cumulative average). "
                    f"Received: momentum={received!r}"
                )
        if getattr(self, "built", False) and (value is None) != (self._momentum is None):
            raise ValueError(
                f"Layer '{self.name}' was built with momentum={self._momentum!r}; after build "
                "momentum can change value but not switch between an EMA and the "
                f"cumulative average (None). Received: momentum={value!r}"
            )
        if self._momentum_variable is not None:
            self._momentum_variable.assign(value)
        self._momentum = value

    @property
    def weights(self):
        """Keras's four weights (gamma, beta, moving_mean, moving_variance); no counters."""
        counters = {id(v) for v in (self.num_batches_tracked, self.num_skipped_updates)}
        return [w for w in super().weights if id(w) not in counters]

    def load_own_variables(self, store):
        """Loads tfbn saves and Keras BatchNormalization saves (no counters)."""
        all_vars = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(all_vars) - len(COUNTER_NAMES):
            for i, v in enumerate(all_vars[: len(store.keys())]):
                v.assign(store[f"{i}"])
            return
        super().load_own_variables(store)

    def compute_output_shape(self, input_shape):
        return input_shape

    # ----------------------------------------------------------------- call --

    def call(self, inputs, training=None, mask=None):
        _compat.check_not_legacy_keras(inputs, "inputs")
        if not inputs.dtype.is_floating:
            raise TypeError(
                f"{type(self).__name__} '{self.name}' needs float inputs "
                f"(float16, bfloat16, float32, float64). Received: dtype={inputs.dtype.name}"
            )
        training = bool(training) and self.trainable
        if not (training or not self.track_running_stats):
            return self._normalize(inputs, self.moving_mean, self.moving_variance)
        if mask is not None:
            mask = self._mask_weights(inputs, mask)
        self._check_more_than_one_value(inputs, mask)
        outputs, mean, variance, count = self._batch_norm(inputs, mask)
        if training and self.track_running_stats:
            self._update_moving_stats(mean, variance, count)
        return outputs

    def _normalize(self, x, mean, variance):
        """Normalise `x` with given per-channel statistics (inference)."""
        if self._fused_format is not None and x.dtype in stats.FUSED_DTYPES:
            x4, restore = self._to_4d(x)
            y, _, _ = stats.fused_batch_norm(
                x4,
                *self._gamma_beta(),
                self.epsilon,
                self._fused_format,
                tf.convert_to_tensor(mean),
                tf.convert_to_tensor(variance),
            )
            return restore(y)
        scale, offset = stats.fold_scale_offset(
            *self._gamma_beta(optional=True), mean, variance, self.epsilon
        )
        return self._affine(x, scale, offset)

    def _batch_norm(self, x, mask):
        """Normalise with batch statistics; returns (y, mean, variance, count)."""
        distributed = self.synchronized and distribute.replica_context() is not None
        if self._fused_format is not None and mask is None and x.dtype in stats.FUSED_DTYPES:
            x4, restore = self._to_4d(x)
            if distributed:
                y, mean, variance, count = distribute.sync_fused_batch_norm(
                    x4, *self._gamma_beta(), self.epsilon, self._fused_format,
                    self.sync_group_size,
                )
                return restore(y), mean, variance, count
            y, mean, variance = stats.fused_batch_norm(
                x4, *self._gamma_beta(), self.epsilon, self._fused_format
            )
            count = tf.fill(tf.shape(mean), stats.fused_count(x4, self._fused_format))
            return restore(y), mean, variance, count
        if self.virtual_batch_size is not None:
            return self._ghost_batch_norm(x, mask)
        if distributed:
            mean, variance, count = distribute.global_moments(
                x, self._reduction_axes, mask, self.sync_group_size
            )
        else:
            mean, variance, count = stats.moments(x, self._reduction_axes, mask)
        scale, offset = stats.fold_scale_offset(
            *self._gamma_beta(optional=True), mean, variance, self.epsilon
        )
        return self._affine(x, scale, offset), mean, variance, count

    def _ghost_batch_norm(self, x, mask):
        """Statistics per virtual batch of `virtual_batch_size` consecutive examples."""
        v = self.virtual_batch_size
        if x.shape[0] is not None and x.shape[0] % v:
            raise ValueError(
                f"The batch size must be a multiple of virtual_batch_size={v}. "
                f"Received: input shape {tuple(x.shape)}"
            )
        shape = tf.shape(x)
        xg = tf.reshape(x, tf.concat([[-1, v], shape[1:]], 0))
        if mask is not None:
            mask = tf.reshape(mask, tf.concat([[-1, v], tf.shape(mask)[1:]], 0))
        # Axis 0 indexes the ghost batches, axis 1 the examples inside one.
        axes = [a + 1 for a in self._reduction_axes]
        mean, variance, count = stats.moments(xg, axes, mask)  # each [ghosts, C...]
        scale, offset = stats.fold_scale_offset(
            *self._gamma_beta(optional=True), mean, variance, self.epsilon
        )
        per_ghost = [-1] + self._broadcast_shape(len(x.shape))
        y = tf.cast(xg, scale.dtype) * tf.reshape(scale, per_ghost) + tf.reshape(offset, per_ghost)
        y = tf.reshape(tf.cast(y, x.dtype), shape)
        # As tf.keras: the moving statistics track the mean of the ghosts' moments.
        total = tf.reduce_sum(count, 0)
        share = tf.math.divide_no_nan(count, total)
        return y, tf.reduce_sum(mean * share, 0), tf.reduce_sum(variance * share, 0), total

    def _update_moving_stats(self, mean, variance, count):
        """EMA / cumulative update, skipped for empty or non-finite batches."""
        if self.moving_variance_estimator == "unbiased":
            variance = stats.bessel_correction(variance, count)
        nonempty = tf.reduce_all(count > 0)
        finite = tf.reduce_all(tf.math.is_finite(mean)) & tf.reduce_all(
            tf.math.is_finite(variance)
        )
        apply = nonempty & finite if self.skip_nonfinite_updates else nonempty
        if self.momentum is None:
            update = lambda moving, batch: stats.cumulative_average_update(  # noqa: E731
                moving, batch, self.num_batches_tracked
            )
        else:
            update = lambda moving, batch: stats.ema_update(  # noqa: E731
                moving, batch, self._momentum_variable, self.momentum_convention
            )
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(tf.where(apply, update(moving, batch), moving))
        self.num_batches_tracked.assign_add(tf.cast(apply, tf.int64))
        if self.skip_nonfinite_updates:
            self.num_skipped_updates.assign_add(tf.cast(nonempty & ~finite, tf.int64))

    # -------------------------------------------------------------- helpers --

    @property
    def _param_shape(self):
        return self.moving_mean.shape

    def _gamma_beta(self, optional=False):
        """(gamma, beta) as tensors; a disabled one is None if `optional`, else 1 / 0
        (the fused kernel needs both)."""
        gamma = beta = None
        if self.scale:
            gamma = tf.convert_to_tensor(self.gamma)
        elif not optional:
            gamma = tf.ones(self._param_shape, self.moving_mean.dtype)
        if self.center:
            beta = tf.convert_to_tensor(self.beta)
        elif not optional:
            beta = tf.zeros(self._param_shape, self.moving_mean.dtype)
        return gamma, beta

    def _broadcast_shape(self, rank):
        """Shape that broadcasts a per-channel statistic against a rank-`rank` input."""
        dims = iter(self._param_shape)
        return [next(dims) if a in self._channel_axes else 1 for a in range(rank)]

    def _affine(self, x, scale, offset):
        """`x * scale + offset` with per-channel statistics broadcast, in float32."""
        shape = self._broadcast_shape(len(x.shape))
        y = tf.cast(x, scale.dtype) * tf.reshape(scale, shape) + tf.reshape(offset, shape)
        return tf.cast(y, x.dtype)

    def _to_4d(self, x):
        """Reshape to the 4D layout the fused kernel takes, and a function to undo it."""
        shape = tf.shape(x)
        rank = len(x.shape)
        channels = self._param_shape[0]
        if rank == 4:
            return x, lambda y: y
        if self._fused_format == "NHWC":
            x4 = tf.reshape(x, [shape[0], -1, 1, channels])
        else:
            x4 = tf.reshape(x, [shape[0], channels, -1, 1])
        return x4, lambda y: tf.reshape(y, shape)

    def _mask_weights(self, inputs, mask):
        if len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. Received: "
                f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}"
            )
        return tf.expand_dims(tf.cast(mask, stats.stat_dtype(inputs.dtype)), -1)

    def _check_more_than_one_value(self, inputs, mask):
        """PyTorch's rule: batch statistics need more than one value per channel."""
        if mask is not None or (self.synchronized and distribute.replica_context()):
            return
        dims = [inputs.shape[a] for a in self._reduction_axes]
        if self.virtual_batch_size is not None:
            dims[0] = self.virtual_batch_size
        if all(d is not None for d in dims) and _prod(dims) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input "
                f"shape {tuple(inputs.shape)} (axis={self.axis})."
            )

    def get_config(self):
        config = {
            "axis": self.axis if len(self.axis) > 1 else self.axis[0],
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "sync_group_size": self.sync_group_size,
            "momentum_convention": self.momentum_convention,
            "moving_variance_estimator": self.moving_variance_estimator,
            "track_running_stats": self.track_running_stats,
            "virtual_batch_size": self.virtual_batch_size,
            "skip_nonfinite_updates": self.skip_nonfinite_updates,
            "fused": self.fused,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="tfbn")
class SyncBatchNormalization(BatchNormalization):
    """`BatchNormalization(synchronized=True)`: global batch statistics across replicas."""

    def __init__(self, *args, synchronized=True, **kwargs):
        super().__init__(*args, synchronized=synchronized, **kwargs)


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


def _validate_axis(axis) -> list[int]:
    axes = [axis] if isinstance(axis, int) else list(axis) if isinstance(axis, (list, tuple)) else None
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(
            f"`axis` must be an integer or a non-empty list of integers. Received: axis={axis!r}"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` must not repeat an axis. Received: axis={axis!r}")
    return axes


def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out
