"""tfbn: Batch Normalization for TensorFlow/Keras 3, from training to TF Serving.

Public names are re-exported here explicitly; see README.md for the API at a glance.
"""

__version__ = "0.1.0"

from tfbn import stats  # noqa: E402
from tfbn.calibrate import recalibrate  # noqa: E402
from tfbn.callbacks import BatchNormMomentumScheduler, BatchNormStatsCallback  # noqa: E402
from tfbn.convert import reset_running_stats  # noqa: E402
from tfbn.inspect import inspect_model, lint_model  # noqa: E402
from tfbn.layers import (  # noqa: E402
    BatchNormalization,
    FrozenBatchNormalization,
    SyncBatchNormalization,
)

__all__ = [
    "__version__",
    "stats",
    "BatchNormalization",
    "SyncBatchNormalization",
    "recalibrate",
    "reset_running_stats",
    "BatchNormMomentumScheduler",
    "BatchNormStatsCallback",
    "inspect_model",
    "lint_model",
    "FrozenBatchNormalization",
]
