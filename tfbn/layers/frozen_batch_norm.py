"""`tfbn.layers.FrozenBatchNormalization`: BatchNorm with frozen statistics, inference only."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfbn import stats
from tfbn.layers._base import BatchNormBase


@keras.saving.register_keras_serializable(package="tfbn")
class FrozenBatchNormalization(BatchNormBase):
    """Batch normalization with frozen statistics: an affine map per channel.

    Whatever `training` says, the output is

        y = (x - moving_mean) * gamma / sqrt(moving_variance + epsilon) + beta

    computed as Keras's `x * scale + offset` where that is as exact (statistics
    with `|mean| / sqrt(variance + epsilon) <= 8`, `tfbn.stats.fold_is_exact`) and
    with the mean subtracted first where it is not (a large mean, e.g. raw
    features); `scale_offset()` gives the folded form. One example's output never depends on
    the rest of its batch and the statistics never change. It keeps Keras's four
    weights (`gamma`, `beta`, `moving_mean`, `moving_variance`, same names and
    order) and tfbn's two counters (layer state outside Keras's variable lists,
    as in `tfbn.BatchNormalization`), so
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
        inputs: Tensor or array of any rank >= 2; integer and boolean inputs are
            cast to the compute dtype (Keras's rule).
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
        super().__init__(axis=axis, epsilon=epsilon, center=center, scale=scale, **kwargs)
        self.trainable_affine = bool(trainable_affine)
        if restore_config is not None and not isinstance(restore_config, dict):
            raise ValueError(
                "`restore_config` must be None or a dict (a BatchNormalization config). "
                f"Received: restore_config={restore_config!r}"
            )
        self.restore_config = restore_config

    def build(self, input_shape):
        affine = dict(trainable=self.trainable_affine)
        self._build_base(
            input_shape,
            gamma=dict(initializer="ones", **affine),
            beta=dict(initializer="zeros", **affine),
        )

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
        inputs = self._standardize_inputs(inputs)
        return stats.normalize_with_statistics(
            inputs,
            tf.convert_to_tensor(self.moving_mean),
            tf.convert_to_tensor(self.moving_variance),
            tf.convert_to_tensor(self.gamma) if self.scale else None,
            tf.convert_to_tensor(self.beta) if self.center else None,
            self.epsilon,
            self._broadcast_shape(len(inputs.shape)),
            fold=self._fold_is_exact(),
        )

    def get_config(self):
        config = {
            **self._base_config(),
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
