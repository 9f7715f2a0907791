"""Shared test set-up: quiet TensorFlow, and 4 logical CPU devices for multi-replica tests.

The CPU must be split before TensorFlow initialises its runtime, so it happens
here, at import time, once for the whole session. Single-device code runs on
the first logical device as usual.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)
