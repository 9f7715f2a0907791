"""`tfbn.BatchNormalization`: a drop-in, fused replacement for `keras.layers.BatchNormalization`."""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from tfbn import _validate, distribute, stats
from tfbn.layers._base import COUNTER_NAMES, BatchNormBase, logger, resolve_channel_axes

__all__ = ["BatchNormalization", "SyncBatchNormalization", "COUNTER_NAMES", "resolve_channel_axes"]

ESTIMATORS = ("biased", "unbiased")
FUSED_CHOICES = ("auto", True, False)
RENORM_CLIPPING_KEYS = ["rmax", "rmin", "dmax"]
# Aggregation of every moving statistic (moving_mean/variance and renorm's three):
# under a strategy each replica's assignment is averaged over replicas before it is
# written to every copy, so the copies never drift apart.
MOVING_AGGREGATION = "mean"
# The fused kernel on a GPU is cuDNN's, whose documented floor is CUDNN_BN_MIN_EPSILON
# (1e-5 before cuDNN 7.5; tf-keras clamps to 1.001e-5). Below this, tfbn does not
# use the fused kernel at all, so a smaller epsilon gives the unfused path's
# numbers on every device (see /README "GPU notes").
FUSED_MIN_EPSILON = 1.001e-5
# tfbn's own constructor arguments, which keras.layers.BatchNormalization lacks, with
# the defaults under which tfbn's layer computes what Keras's computes.
TFBN_ONLY_DEFAULTS = {
    "sync_group_size": None,
    "momentum_convention": "keras",
    "moving_variance_estimator": "biased",
    "track_running_stats": True,
    "virtual_batch_size": None,
    "skip_nonfinite_updates": True,
    "fused": "auto",
}


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNormalization(BatchNormBase, keras.layers.BatchNormalization):
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

    **Drop-in.** Constructor arguments (names, order, defaults), weight names and
    order (`gamma`, `beta`, `moving_mean`, `moving_variance`, then renorm's
    `moving_stddev`, `renorm_mean`, `renorm_stddev`), `weights`/`variables`
    lists, configs and input rules are Keras's, and
    `isinstance(layer, keras.layers.BatchNormalization)` is True (the class
    derives from Keras's layer but overrides its constructor, `build` and
    `call`, so none of Keras's computation runs). Two int64 counters,
    `num_batches_tracked` and `num_skipped_updates`, are layer state outside
    Keras's variable lists: mirrored under a strategy, saved in `.keras` files,
    not in `.weights.h5` files (see `tfbn.layers._base`).

    **Batch renormalization** (`renorm=True`, Ioffe 2017), as Keras: in training
    the output is `(xhat * r + d) * gamma + beta` with `xhat` normalised by the
    batch statistics and the corrections (constants for the gradient)

        r = sqrt(var + eps) / renorm_stddev,   d = (mean - renorm_mean) / renorm_stddev

    clipped by `renorm_clipping`; `renorm_mean`/`renorm_stddev` are moving
    averages of the batch mean and `sqrt(var + eps)` with `renorm_momentum`
    (always Keras's convention: the weight of the old value). The inference
    statistics follow `momentum`: `moving_mean` as above, `moving_stddev` the
    moving average of `sqrt(var + eps)`, and `moving_variance =
    max(moving_stddev**2 - eps, 0)`; inference is the same as without renorm.
    With `synchronized=True` the corrections and every update use the global
    batch statistics. Renorm runs the fused kernel where the layer otherwise
    would (one extra pass for the moments first), except when synchronised
    (then the unfused global-moments path). Not combined with
    `virtual_batch_size` or `track_running_stats=False` (ValueError).

    **`trainable=False` means inference mode** (as in Keras): a frozen layer
    normalises with its moving statistics and never updates them, even when
    called with `training=True`, which is what fine-tuning on a new dataset
    needs. (In PyTorch, `requires_grad=False` alone does not do this.)

    **One value per channel.** Training on a batch with a single value per
    channel (e.g. shape `(1, C)`) behaves as Keras's layer: the variance is 0,
    the output is `beta`, and the moving statistics are updated. tfbn logs one
    warning per layer (logger `"tfbn"`) the first time it sees this with a known
    shape (eagerly, or traced with static shapes), and counts every such batch
    at run time in `num_single_value_batches` (also in compiled steps traced
    with an unknown batch size), which `tfbn inspect` reports.

    **Under a `tf.distribute` strategy.** With `synchronized=True` every replica
    normalises with the mean and variance of the global batch (or of its group of
    `sync_group_size` replicas): local two-pass moments are packed as float64
    moment sums and merged in ONE all-reduce (`tfbn.distribute`), exact for
    uneven and empty per-replica batches and free of the `E[x^2] - E[x]^2`
    cancellation. Where the fused kernel applies, it computes the local moments
    and a custom gradient all-reduces the two backward sums once (as PyTorch's
    SyncBatchNorm); elsewhere gradients flow through the all-reduce.
    The moving statistics are mirrored variables whose copies never drift
    apart: synchronised, every replica already holds the same new value and
    writes its own copy (no communication beyond the forward and backward
    all-reduce); with groups, the mean over groups, and unsynchronised, the
    mean over replicas of the per-replica updates, each in ONE packed
    all-reduce (Keras's layer instead keeps each replica's own, different
    copy). A replica (group) whose batch statistics are non-finite is left out
    of that mean: the update is the mean over those that applied theirs (none
    applied: unchanged), `num_skipped_updates` grows by the number of replicas
    (groups) that skipped and `num_batches_tracked` by 1 if any applied.
    What is saved, exported or used at inference is therefore that mean.

    Args:
        axis: Integer or list of integers, the channel axis/axes (not reduced).
            `-1` for channels-last, `1` for channels-first.
        momentum: Momentum of the moving averages (Keras convention, above), or
            `None` for a cumulative moving average: the plain mean of every batch
            statistic seen so far (PyTorch's `momentum=None`).
        momentum_convention: `"keras"` (default; `momentum` is the weight of the
            old value, ~0.99) or `"pytorch"` (`momentum` is the weight of the new
            batch, ~0.1): `moving = (1 - momentum) * moving + momentum * batch`.
        epsilon: Small float added to the variance to avoid dividing by zero;
            0 is allowed (as in Keras), NaN/Inf/negative values are rejected.
            Below 1.001e-5 the fused kernel is not used (see "GPU notes" in README).
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
            Per replica by definition: not combined with `synchronized=True`
            (ValueError).
        skip_nonfinite_updates: If True (default), a batch whose statistics
            contain NaN/Inf leaves the moving statistics unchanged and increments
            `num_skipped_updates` instead of corrupting them.
        fused: `"auto"` (default) trains on TensorFlow's fused kernel where it is
            valid (a single channel axis that is last or `1`, no mask, no virtual
            batch, float16/bfloat16/float32, epsilon >= 1.001e-5) and pays off (an
            input of at least `FUSED_AUTO_MIN_ELEMENTS` values, or synchronised), and
            infers without it (Keras's `x * scale + offset` where that is exact).
            `True` requires the kernel in training and inference (ValueError where it
            is not valid); `False` always uses the unfused path.
        renorm: If True, batch renormalization (see above).
        renorm_clipping: With `renorm`, a dict with optional keys `"rmax"`,
            `"rmin"`, `"dmax"` bounding the corrections (`r` to [rmin, rmax], `d`
            to [-dmax, dmax]); missing keys are unbounded. Keras's validation.
        renorm_momentum: With `renorm`, momentum of `renorm_mean` and
            `renorm_stddev` (Keras convention whatever `momentum_convention` says).
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Tensor or array of any rank >= 2. Integer and boolean inputs are
            cast to the layer's compute dtype, as Keras casts them.
        training: Python boolean or None: batch statistics (True) or moving
            statistics (False/None).
        mask: Optional boolean tensor of the inputs' shape without the last
            axis; masked-out positions are ignored by the batch statistics.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (batch renormalization).
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
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        sync_group_size=None,
        momentum_convention="keras",
        moving_variance_estimator="biased",
        track_running_stats=True,
        virtual_batch_size=None,
        skip_nonfinite_updates=True,
        fused="auto",
        **kwargs,
    ):
        super().__init__(axis=axis, epsilon=epsilon, center=center, scale=scale, **kwargs)
        self._momentum_variable = None
        self.momentum = momentum  # validated by the `momentum` property setter
        self.momentum_convention = _validate.choice(
            "momentum_convention", momentum_convention, stats.MOMENTUM_CONVENTIONS
        )
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        self.sync_group_size = _validate.positive_int(
            "sync_group_size", sync_group_size, allow_none=True
        )
        self.moving_variance_estimator = _validate.choice(
            "moving_variance_estimator", moving_variance_estimator, ESTIMATORS
        )
        self.track_running_stats = bool(track_running_stats)
        self.virtual_batch_size = _validate.positive_int(
            "virtual_batch_size", virtual_batch_size, allow_none=True
        )
        self.skip_nonfinite_updates = bool(skip_nonfinite_updates)
        self.fused = _validate.choice("fused", fused, FUSED_CHOICES)
        self.renorm = bool(renorm)
        self.renorm_clipping = _renorm_clipping(renorm_clipping) if self.renorm else renorm_clipping
        self.renorm_momentum = renorm_momentum
        if self.renorm:
            _validate.momentum("renorm_momentum", renorm_momentum)
            if self.virtual_batch_size is not None or not self.track_running_stats:
                raise ValueError(
                    "renorm=True needs moving statistics of whole batches: it cannot be "
                    "combined with virtual_batch_size or track_running_stats=False. "
                    f"Received: virtual_batch_size={self.virtual_batch_size}, "
                    f"track_running_stats={self.track_running_stats}"
                )
        if self.synchronized and self.virtual_batch_size is not None:
            raise ValueError(
                f"Layer '{self.name}': synchronized=True cannot be combined with "
                "virtual_batch_size: a ghost batch is virtual_batch_size examples of one "
                "replica, normalised with their own statistics, so there is nothing to "
                "synchronise. Received: synchronized=True, "
                f"virtual_batch_size={self.virtual_batch_size}; accepted: either one."
            )
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self._warned_single_value = False

    # ---------------------------------------------------------------- build --

    def build(self, input_shape):
        self._build_base(
            input_shape,
            gamma=dict(
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
            ),
            beta=dict(
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
            ),
            moving={
                "mean": dict(
                    initializer=self.moving_mean_initializer, aggregation=MOVING_AGGREGATION
                ),
                "variance": dict(
                    initializer=self.moving_variance_initializer, aggregation=MOVING_AGGREGATION
                ),
            },
        )
        if self.renorm:
            # Keras's names and order. moving_stddev and renorm_stddev start at the
            # square root of the moving-variance initializer (as in Keras).
            stddev_init = _sqrt_initializer(self.moving_variance_initializer)
            self.moving_stddev = self._add_moving_weight("moving_stddev", stddev_init)
            self.renorm_mean = self._add_moving_weight(
                "renorm_mean", _clone_initializer(self.moving_mean_initializer)
            )
            self.renorm_stddev = self._add_moving_weight("renorm_stddev", stddev_init)
        if self._momentum is not None:
            # Read by the update inside the traced train step, so assigning
            # `layer.momentum` (e.g. a momentum schedule) applies in compiled
            # `model.fit`. Runtime state only: not in `weights`, not saved (the
            # config carries `momentum`).
            with tf.init_scope():
                self._momentum_variable = tf.Variable(
                    self._momentum, dtype=tf.float32, trainable=False, name="momentum"
                )
        rank = len(input_shape)
        self._fused_format = self._fused_data_format(rank)
        if self.fused is True and self._fused_format is None:
            raise ValueError(
                "fused=True needs a single channel axis that is last or 1, no "
                "virtual_batch_size, no float64 weights and epsilon >= "
                f"{FUSED_MIN_EPSILON} (cuDNN's floor on a GPU). Received: "
                f"axis={self.axis}, input_shape={tuple(input_shape)}, "
                f"virtual_batch_size={self.virtual_batch_size}, dtype={self.variable_dtype}, "
                f"epsilon={self.epsilon}."
            )

    def _add_moving_weight(self, name, initializer):
        return self.add_weight(
            name=name,
            initializer=initializer,
            trainable=False,
            aggregation=MOVING_AGGREGATION,
            **self._param_kwargs,
        )

    def _fused_data_format(self, rank: int) -> str | None:
        """ "NHWC"/"NCHW" when the fused kernel can serve this layer, else None."""
        if self.fused is False or self.virtual_batch_size is not None:
            return None
        if self.epsilon < FUSED_MIN_EPSILON:
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
        `tfbn.callbacks.BatchNormMomentumScheduler` works). With `renorm=True`
        it drives the inference statistics (`moving_mean`, `moving_stddev` and
        so `moving_variance`), never `renorm_momentum`. A layer built with
        `momentum=None` cannot switch to an EMA afterwards, nor the reverse.
        """
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        value = _validate.momentum("momentum", value, allow_none=True)
        if getattr(self, "built", False) and (value is None) != (self._momentum is None):
            raise ValueError(
                f"Layer '{self.name}' was built with momentum={self._momentum!r}; after build "
                "momentum can change value but not switch between an EMA and the "
                f"cumulative average (None). Received: momentum={value!r}"
            )
        if self._momentum_variable is not None:
            self._momentum_variable.assign(value)
        self._momentum = value

    # ----------------------------------------------------------------- call --

    def call(self, inputs, training=None, mask=None):
        inputs = self._standardize_inputs(inputs)
        training = bool(training) and self.trainable
        if not (training or not self.track_running_stats):
            return self._normalize(inputs, self.moving_mean, self.moving_variance)
        if mask is not None:
            mask = self._mask_weights(inputs, mask)
        self._warn_one_value_per_channel(inputs, mask)
        outputs, mean, variance, count = self._batch_norm(inputs, mask)
        if training and self.track_running_stats:
            self._update_moving_stats(mean, variance, count)
        return outputs

    def _normalize(self, x, mean, variance):
        """Inference: normalise `x` with the moving statistics."""
        # fused="auto": Keras's `x * scale + offset` where it is exact (else the mean is
        # subtracted first; `_fold_is_exact`): faster than the fused kernel on a CPU.
        if self._fused_format is not None and self.fused is True and x.dtype in stats.FUSED_DTYPES:
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
        return stats.normalize_with_statistics(
            x, mean, variance, *self._gamma_beta(optional=True), self.epsilon,
            self._broadcast_shape(len(x.shape)), fold=self._fold_is_exact(),
        )  # fmt: skip

    def _normalize_batch(self, x, mean, variance, gamma_beta, mask=None, shape=None):
        """Training: normalise with batch statistics, differentiable through them.

        With a mask, masked-out positions are selected away before the arithmetic
        whose gradient reaches the statistics: their outputs are normalised with
        the statistics held constant, so a NaN/Inf there stays there (as in Keras)
        and neither the other outputs nor any gradient sees it.
        """
        shape = shape or self._broadcast_shape(len(x.shape))
        mean, variance = tf.convert_to_tensor(mean), tf.convert_to_tensor(variance)
        if mask is None:
            return stats.batch_normalize(x, mean, variance, *gamma_beta, self.epsilon, shape)
        keep = tf.broadcast_to(mask > 0, tf.shape(x))
        kept = stats.batch_normalize(
            tf.where(keep, x, tf.zeros_like(x)), mean, variance, *gamma_beta, self.epsilon, shape
        )
        held = [
            tf.stop_gradient(t) if t is not None else None for t in (mean, variance, *gamma_beta)
        ]
        dropped = stats.batch_normalize(x, *held, self.epsilon, shape)
        return tf.where(keep, kept, dropped)

    def _batch_norm(self, x, mask):
        """Normalise with batch statistics; returns (y, mean, variance, count)."""
        distributed = self.synchronized and distribute.replica_context() is not None
        fused = (
            self._fused_format is not None
            and mask is None
            and x.dtype in stats.FUSED_DTYPES
            and (distributed or _fused_pays_off(self.fused, x))
        )
        if self.renorm:
            return self._renorm_batch_norm(x, mask, fused and not distributed, distributed)
        if fused:
            x4, restore = self._to_4d(x)
            if distributed:
                y, mean, variance, count = distribute.sync_fused_batch_norm(
                    x4,
                    *self._gamma_beta(),
                    self.epsilon,
                    self._fused_format,
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
        if mask is None and not distributed:
            return stats.normalize_with_batch_moments(
                x, self._reduction_axes, *self._gamma_beta(optional=True), self.epsilon,
                self._broadcast_shape(len(x.shape)),
            )  # fmt: skip
        mean, variance, count = self._moments(x, mask, distributed)
        y = self._normalize_batch(x, mean, variance, self._gamma_beta(optional=True), mask)
        return y, mean, variance, count

    def _moments(self, x, mask, distributed):
        """Batch moments of `x` (global ones when synchronised), with their gradient."""
        if distributed:
            return distribute.global_moments(x, self._reduction_axes, mask, self.sync_group_size)
        return stats.moments(x, self._reduction_axes, mask)

    def _renorm_batch_norm(self, x, mask, fused, distributed):
        """Batch renormalization: batch statistics, then Keras's `(r, d)` correction."""
        if fused:
            # Moments first (the corrections need them), then the fused training
            # kernel with the composed scale/offset: its gradient is batch norm's
            # exact gradient, and r, d are constants for it.
            x4, restore = self._to_4d(x)
            mean, variance, count = stats.fused_moments(tf.stop_gradient(x4), self._fused_format)
            scale, offset = self._renorm_scale_offset(mean, variance)
            y, _, _ = stats.fused_batch_norm(x4, scale, offset, self.epsilon, self._fused_format)
            return restore(y), mean, variance, count
        mean, variance, count = self._moments(x, mask, distributed)
        scale, offset = self._renorm_scale_offset(mean, variance)
        y = self._normalize_batch(x, mean, variance, (scale, offset), mask)
        return y, mean, variance, count

    def _renorm_scale_offset(self, mean, variance):
        r, d = stats.renorm_correction(
            mean, variance,
            tf.convert_to_tensor(self.renorm_mean), tf.convert_to_tensor(self.renorm_stddev),
            self.epsilon, self.renorm_clipping,
        )  # fmt: skip
        return stats.renorm_scale_offset(r, d, *self._gamma_beta(optional=True))

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
        per_ghost = [-1] + self._broadcast_shape(len(x.shape))
        y = self._normalize_batch(
            xg, mean, variance, self._gamma_beta(optional=True), mask, per_ghost
        )
        y = tf.reshape(y, shape)
        # As tf.keras: the moving statistics track the mean of the ghosts' moments.
        total = tf.reduce_sum(count, 0)
        share = tf.math.divide_no_nan(count, total)
        return y, tf.reduce_sum(mean * share, 0), tf.reduce_sum(variance * share, 0), total

    # ------------------------------------------------------ moving statistics --

    def _update_moving_stats(self, mean, variance, count):
        """EMA / cumulative update, skipped for empty or non-finite batches."""
        moving_batch_var = variance
        if self.moving_variance_estimator == "unbiased":
            moving_batch_var = stats.bessel_correction(variance, count)
        nonempty = tf.reduce_all(count > 0)
        finite = tf.reduce_all(tf.math.is_finite(mean)) & tf.reduce_all(tf.math.is_finite(variance))
        apply = nonempty & finite if self.skip_nonfinite_updates else nonempty
        # Per-batch event counts: [skipped (non-finite), one value per channel].
        events = tf.cast(tf.stack([nonempty & ~finite, tf.reduce_any(count == 1)]), tf.int64)
        targets = self._moving_targets(mean, variance, moving_batch_var)
        # Copies never drift: synchronised statistics are already identical on every
        # replica (no collective); otherwise ONE packed all-reduce averages the new
        # values over the replicas (groups) that applied theirs, then each replica
        # writes the same result into its own copy.
        new_values, applied, events = distribute.mean_over_replicas_where(
            [new for _, new in targets],
            apply,
            events,
            equal_within=self.sync_group_size if self.synchronized else 1,
        )
        apply = applied > 0
        for (moving, _), new in zip(targets, new_values):
            distribute.assign_own_copy(moving, tf.where(apply, new, moving))
        distribute.assign_own_copy(self.num_batches_tracked, apply, add=True)
        if self.skip_nonfinite_updates:
            distribute.assign_own_copy(self.num_skipped_updates, events[0], add=True)
        distribute.assign_own_copy(self.num_single_value_batches, events[1], add=True)

    def _moving_targets(self, mean, variance, moving_batch_var):
        """`[(variable, updated value), ...]` for every moving statistic of the layer.

        `variance` is the biased batch variance (what normalised the batch);
        `moving_batch_var` is what the inference statistics track (Bessel-corrected
        with `moving_variance_estimator="unbiased"`).
        """
        if self.momentum is None:
            update = lambda moving, batch: stats.cumulative_average_update(  # noqa: E731
                moving, batch, self.num_batches_tracked
            )
        else:
            update = lambda moving, batch: stats.ema_update(  # noqa: E731
                moving, batch, self._momentum_variable, self.momentum_convention
            )
        targets = [(self.moving_mean, update(self.moving_mean, mean))]
        if not self.renorm:
            targets.append((self.moving_variance, update(self.moving_variance, moving_batch_var)))
            return targets
        # Renorm, as Keras: the inference statistics track the standard deviation
        # and derive the variance from it; renorm's own pair always uses Keras's
        # convention with `renorm_momentum`.
        eps = tf.cast(self.epsilon, mean.dtype)
        moving_stddev = update(self.moving_stddev, tf.sqrt(moving_batch_var + eps))
        renorm = lambda moving, batch: stats.ema_update(  # noqa: E731
            moving, batch, self.renorm_momentum, stats.KERAS
        )
        return targets + [
            (self.moving_stddev, moving_stddev),
            (self.moving_variance, tf.nn.relu(moving_stddev * moving_stddev - eps)),
            (self.renorm_mean, renorm(self.renorm_mean, mean)),
            (self.renorm_stddev, renorm(self.renorm_stddev, tf.sqrt(variance + eps))),
        ]

    # -------------------------------------------------------------- helpers --

    @property
    def _param_shape(self):
        return self.moving_mean.shape

    def _gamma_beta(self, optional=False):
        """(gamma, beta) as tensors; a disabled one is None if `optional`, else 1 / 0
        (the fused kernel needs both)."""
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else None
        beta = tf.convert_to_tensor(self.beta) if self.center else None
        return (gamma, beta) if optional else self._fill_gamma_beta(gamma, beta)

    def _fill_gamma_beta(self, gamma, beta):
        if gamma is None:
            gamma = tf.ones(self._param_shape, self.moving_mean.dtype)
        if beta is None:
            beta = tf.zeros(self._param_shape, self.moving_mean.dtype)
        return gamma, beta

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
        """Keras's mask rule: one dimension less than the inputs, any dtype, read as
        a boolean (nonzero = use)."""
        mask = tf.convert_to_tensor(mask)
        if len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. Received: "
                f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}"
            )
        return tf.expand_dims(tf.cast(tf.cast(mask, tf.bool), stats.stat_dtype(inputs.dtype)), -1)

    def _warn_one_value_per_channel(self, inputs, mask):
        """Logs once per layer when a (known-shape) batch has one value per channel.

        Keras's numbers follow anyway: variance 0, output `beta`, statistics
        updated. Skipped with a mask or when synchronised (the count is then not
        known from the shape).
        """
        if self._warned_single_value or mask is not None:
            return
        if self.synchronized and distribute.replica_context() is not None:
            return
        dims = [inputs.shape[a] for a in self._reduction_axes]
        if self.virtual_batch_size is not None:
            dims[0] = self.virtual_batch_size
        if all(d is not None for d in dims) and math.prod(dims) == 1:
            self._warned_single_value = True
            logger.warning(
                "BatchNormalization '%s' trained on a batch with one value per channel "
                "(input shape %s, axis=%s): its variance is 0, so the output is beta and "
                "the moving variance moves towards 0 (as in Keras). Use a larger batch, "
                "or synchronized=True under a strategy.",
                self.name, tuple(inputs.shape), self.axis,
            )  # fmt: skip

    # --------------------------------------------------------------- config --

    def get_config(self):
        config = {
            **self._base_config(),
            "momentum": self.momentum,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "sync_group_size": self.sync_group_size,
            "momentum_convention": self.momentum_convention,
            "moving_variance_estimator": self.moving_variance_estimator,
            "track_running_stats": self.track_running_stats,
            "virtual_batch_size": self.virtual_batch_size,
            "skip_nonfinite_updates": self.skip_nonfinite_updates,
            "fused": self.fused,
        }
        return {**keras.layers.Layer.get_config(self), **config}

    def keras_config(self) -> dict:
        """This layer's config as `keras.layers.BatchNormalization.from_config` takes it.

        Drops tfbn's own arguments; raises ValueError if one of them is set to a
        value under which Keras's layer would compute something else (e.g.
        `virtual_batch_size`, `momentum=None`, the PyTorch momentum convention).
        """
        config = self.get_config()
        changed = {k: config[k] for k, v in TFBN_ONLY_DEFAULTS.items() if config[k] != v}
        changed.pop("fused", None)  # a speed choice, not a numerical one
        if self.momentum is None:
            changed["momentum"] = None
        if changed:
            raise ValueError(
                f"Layer '{self.name}' uses tfbn options keras.layers.BatchNormalization "
                f"does not have: {changed}. Received a layer with those options; "
                f"accepted: {dict(TFBN_ONLY_DEFAULTS)} and a float momentum."
            )
        return {k: v for k, v in config.items() if k not in TFBN_ONLY_DEFAULTS}


@keras.saving.register_keras_serializable(package="tfbn")
class SyncBatchNormalization(BatchNormalization):
    """`BatchNormalization(synchronized=True)`: global batch statistics across replicas."""

    def __init__(self, *args, synchronized=True, **kwargs):
        super().__init__(*args, synchronized=synchronized, **kwargs)


def _renorm_clipping(clipping) -> dict:
    """Keras's validation of `renorm_clipping` (same messages), plus: values are numbers."""
    clipping = dict(clipping or {})
    if set(clipping) - set(RENORM_CLIPPING_KEYS):
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{clipping}. Supported values: {RENORM_CLIPPING_KEYS}."
        )
    for key, value in clipping.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isnan(value)):  # fmt: skip
            raise ValueError(
                f"`renorm_clipping['{key}']` must be a number or None. Received: {value!r}"
            )
    rmax, rmin, dmax = (clipping.get(k) for k in ("rmax", "rmin", "dmax"))
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` "
            f"argument. Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return clipping


def _clone_initializer(initializer):
    """A fresh copy of an initializer object (a new seed for random ones), as Keras does."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _sqrt_initializer(initializer):
    """Initializer of `sqrt(initializer(shape))`: renorm's standard deviations start at
    the square root of the moving-variance initializer."""

    def init(shape, dtype=None):
        return tf.sqrt(initializers.get(_clone_initializer(initializer))(shape, dtype=dtype))

    return init


# Below this many elements (static shape) the fused kernel's fixed costs exceed its
# gain in training, and fused="auto" takes the unfused path: `tfbn bench` on 2 CPU
# cores, (256, 64) and (32, 128): fused 1.7-2x slower than unfused; (32, 8, 8, 64)
# (131k): equal; (16, 14, 14, 128) (401k) and above: fused faster. Synchronised BN
# keeps the fused path at every size (its custom gradient beats autodiff through
# the float64 all-reduce: `tfbn bench --sync`, row tfbn_sync_unfused).
FUSED_AUTO_MIN_ELEMENTS = 131072


def _fused_pays_off(fused, x) -> bool:
    """fused=True always; "auto" unless the (static) input is known to be small."""
    size = x.shape.num_elements()
    return fused is True or size is None or size >= FUSED_AUTO_MIN_ELEMENTS
