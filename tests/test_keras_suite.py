"""Keras's own BatchNormalization test file, run against tfbn.BatchNormalization.

The test module is imported from the installed keras package (not copied), and
the one name it builds the layer through, `layers.BatchNormalization`, is
replaced by tfbn's for the duration of each test; every assertion is Keras's.
"""

import types

import pytest

import tfbn

keras_bn_test = pytest.importorskip(
    "keras.src.layers.normalization.batch_normalization_test",
    reason="the installed keras wheel ships its BatchNormalization tests",
)
_KERAS_LAYERS = keras_bn_test.layers


def _layers_with_tfbn():
    """Keras's `layers` module as the test sees it, with tfbn's BatchNormalization."""
    namespace = types.SimpleNamespace(**vars(_KERAS_LAYERS))
    namespace.BatchNormalization = tfbn.BatchNormalization
    return namespace


class TestKerasBatchNormalizationSuiteOnTfbn(keras_bn_test.BatchNormalizationTest):
    def setUp(self):
        super().setUp()
        keras_bn_test.layers = _layers_with_tfbn()
        self.addCleanup(setattr, keras_bn_test, "layers", _KERAS_LAYERS)

    def test_the_swap_is_in_place(self):
        """Guards the suite itself: the layer it builds is tfbn's."""
        layer = keras_bn_test.layers.BatchNormalization()
        assert type(layer) is tfbn.BatchNormalization
