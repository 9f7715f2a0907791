"""`tfbn.layers.FrozenBatchNormalization`: BatchNorm with frozen statistics, inference only."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfbn import _compat, stats
from tfbn.layers.batch_norm import COUNTER_NAMES, _validate_axis, resolve_channel_axes


@keras.saving.register_keras_serializable(package="tfbn")
class FrozenBatchNormalization(keras.layers.Layer):
    """Batch normalization with frozen statistics: an affine map per channel.

    Whatever `training` says, the output is

        scale  = gamma / sqrt(moving_variance + epsilon)
        offset = beta - moving_mean * scale
        y      = x * scale + offset

    (`tfbn.stats.fold_scale_offset`), so one example's output never depends on
    the rest of its batch and the statistics never change. It keeps Keras's four
    weights (`gamma`, `beta`, `moving_mean`, `moving_variance`, same names and
    order) and tfbn's two counters (layer state, not in `layer.weights`), so
    `tfbn.convert.freeze_batch_norm` / `unfreeze_batch_norm` round-trip exactly.

    Args:
        axis: Integer or list of integers, the channel axis/axes.
        epsilon: Small float added to the variance.
        center: If True, the layer has `beta`.
        scale: If True, the layer has `gamma`.
        trainable_affine: If True, `gamma` and `beta` are trainable (fine-tuning
            the affine part with frozen statistics); otherwise nothing is.
        restore_config: The configuration of the BatchNormalization this layer
            froze (momentum, synchronisation, ...), used by `unfreeze_batch_norm`
            to restore it; None restores tfbn's defaults.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Float tensor of any rank >= 2.
        training: Ignored: a frozen layer behaves the same in training and inference.
        mask: Ignored (passed through): the map is per position.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(
        self,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        trainable_affine=False,
        restore_config=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validate_axis(axis)
        self.epsilon = float(epsilon)
        if not self.epsilon > 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon}")
        self.center = bool(center)
        self.scale = bool(scale)
        self.trainable_affine = bool(trainable_affine)
        if restore_config is not None and not isinstance(restore_config, dict):
            raise ValueError(
                "`restore_config` must be None or a dict (a BatchNormalization config). "
                f"Received: restore_config={restore_config!r}"
            )
        self.restore_config = restore_config
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.num_batches_tracked = self.num_skipped_updates = None

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        axes = resolve_channel_axes(self.axis, input_shape)
        self._channel_axes = axes
        common = dict(
            shape=tuple(input_shape[a] for a in axes),
            dtype=stats.stat_dtype(self.variable_dtype),
            autocast=False,
        )
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma", initializer="ones", trainable=self.trainable_affine, **common
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta", initializer="zeros", trainable=self.trainable_affine, **common
            )
        self.moving_mean = self.add_weight(
            name="moving_mean", initializer="zeros", trainable=False, **common
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", initializer="ones", trainable=False, **common
        )
        self.num_batches_tracked, self.num_skipped_updates = (
            self.add_weight(name=name, shape=(), dtype="int64", initializer="zeros",
                            trainable=False)
            for name in COUNTER_NAMES
        )  # fmt: skip
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={a: input_shape[a] for a in axes})

    @property
    def weights(self):
        """Keras's four weights (gamma, beta, moving_mean, moving_variance); no counters."""
        counters = {id(v) for v in (self.num_batches_tracked, self.num_skipped_updates)}
        return [w for w in super().weights if id(w) not in counters]

    def scale_offset(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The per-channel `(scale, offset)` this layer applies."""
        return stats.fold_scale_offset(
            tf.convert_to_tensor(self.gamma) if self.scale else None,
            tf.convert_to_tensor(self.beta) if self.center else None,
            tf.convert_to_tensor(self.moving_mean),
            tf.convert_to_tensor(self.moving_variance),
            self.epsilon,
        )

    def call(self, inputs, training=None, mask=None):
        _compat.check_not_legacy_keras(inputs, "inputs")
        if not inputs.dtype.is_floating:
            raise TypeError(
                f"{type(self).__name__} '{self.name}' needs float inputs. "
                f"Received: dtype={inputs.dtype.name}"
            )
        scale, offset = self.scale_offset()
        rank = len(inputs.shape)
        if self._channel_axes != [rank - 1]:
            dims = iter(self.moving_mean.shape)
            shape = [next(dims) if a in self._channel_axes else 1 for a in range(rank)]
            scale, offset = tf.reshape(scale, shape), tf.reshape(offset, shape)
        y = tf.cast(inputs, scale.dtype) * scale + offset
        return tf.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "axis": self.axis if len(self.axis) > 1 else self.axis[0],
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "trainable_affine": self.trainable_affine,
            "restore_config": self.restore_config,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="tfbn")
class FoldedBatchNormalization(keras.layers.Layer):
    """What `tfbn.convert.fold_batch_norm` leaves where a BN was folded: the identity.

    It keeps the BN's name (so a model whose output was a BN keeps its output
    name) and records the layer the statistics were folded into.

    Args:
        folded_into: Name of the layer whose kernel and bias absorbed the BN.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).
    """

    def __init__(self, folded_into=None, **kwargs):
        super().__init__(**kwargs)
        self.folded_into = folded_into
        self.supports_masking = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "folded_into": self.folded_into}
