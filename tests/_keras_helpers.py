"""Test helpers about the installed Keras."""

import inspect

import keras
import numpy as np
import pytest

from tfbn.convert import is_batch_norm
from tfbn.layers import FrozenBatchNormalization

# Keras's own layer gained batch renormalization after 3.10 (the oldest Keras tfbn
# supports): the comparisons with it run where it has it; tfbn's renorm runs everywhere.
KERAS_HAS_RENORM = (
    "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
)
needs_keras_renorm = pytest.mark.skipif(
    not KERAS_HAS_RENORM, reason=f"Keras {keras.__version__}'s BatchNormalization has no renorm"
)


def randomize_statistics(model, seed=0, variance=(0.2, 3.0)):
    """Non-trivial gamma/beta/moving statistics in every BN (as after training);
    moving variances drawn uniformly from `variance`."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if is_batch_norm(layer) or isinstance(layer, FrozenBatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 1.0, shape))
            layer.moving_variance.assign(rng.uniform(*variance, shape))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 2.0, shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 1.0, shape))
    return model
