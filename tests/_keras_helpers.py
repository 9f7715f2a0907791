"""Test helpers about the installed Keras."""

import inspect

import keras
import pytest

# Keras's own layer gained batch renormalization after 3.10 (the oldest Keras tfbn
# supports): the comparisons with it run where it has it; tfbn's renorm runs everywhere.
KERAS_HAS_RENORM = (
    "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
)
needs_keras_renorm = pytest.mark.skipif(
    not KERAS_HAS_RENORM, reason=f"Keras {keras.__version__}'s BatchNormalization has no renorm"
)
