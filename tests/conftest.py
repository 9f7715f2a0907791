"""Shared test set-up: quiet TensorFlow, and 4 logical CPU devices for multi-replica tests.

The CPU must be split before TensorFlow initialises its runtime, so it happens
here, at import time, once for the whole session. Single-device code runs on
the first logical device as usual.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _serving_helpers import TESTDATA  # noqa: E402

# Locally the TF Serving conformance tests skip when ../shared/tfs_testdata is
# absent; in CI (CI=true, shared/ checked out beside the repo) that would hide
# the whole conformance suite, so it is an error instead.
if os.environ.get("CI") and not os.path.isdir(TESTDATA):
    pytest.exit(
        f"CI run without TF Serving's fixtures: {TESTDATA} not found (set TFS_TESTDATA)",
        returncode=3,
    )

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)


# Every MirroredStrategy over the same devices starts its collective group and
# instance keys at the same numbers, so two strategies created in one process
# (here: one per test module, example or experiment) can pick up each other's
# pending all-reduces ("Shape mismatch in the collective instance 100"). TF's own
# tests avoid that with the test-only `_collective_key_base`; give each strategy
# created during the test session its own.
_next_key_base = iter(range(10_000, 10_000_000, 10_000))
_mirrored_init = tf.distribute.MirroredStrategy.__init__


def _mirrored_init_with_own_keys(self, *args, **kwargs):
    self._collective_key_base = next(_next_key_base)
    _mirrored_init(self, *args, **kwargs)


tf.distribute.MirroredStrategy.__init__ = _mirrored_init_with_own_keys
