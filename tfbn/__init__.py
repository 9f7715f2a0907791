"""tfbn: Batch Normalization for TensorFlow/Keras 3, from training to TF Serving.

Public names are re-exported here explicitly; see README.md for the API at a glance.
"""

__version__ = "0.1.0"

from tfbn import stats  # noqa: E402
from tfbn.calibrate import recalibrate  # noqa: E402
from tfbn.callbacks import BatchNormMomentumScheduler, BatchNormStatsCallback  # noqa: E402
from tfbn.convert import (  # noqa: E402
    convert_batch_norm,
    convert_sync_batch_norm,
    fold_batch_norm,
    freeze_batch_norm,
    reset_running_stats,
    revert_sync_batch_norm,
    unfreeze_batch_norm,
)
from tfbn.export import export_saved_model  # noqa: E402
from tfbn.inspect import inspect_model, lint_model, lint_saved_model  # noqa: E402
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
    "convert_batch_norm",
    "convert_sync_batch_norm",
    "revert_sync_batch_norm",
    "recalibrate",
    "reset_running_stats",
    "BatchNormMomentumScheduler",
    "BatchNormStatsCallback",
    "inspect_model",
    "lint_model",
    "FrozenBatchNormalization",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "fold_batch_norm",
    "export_saved_model",
    "lint_saved_model",
]
