"""tfbn: Batch Normalization for TensorFlow/Keras 3, from training to TF Serving.

Public names are re-exported here explicitly; see README.md for the API at a glance.
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402


def _require_tensorflow_backend() -> None:
    """tfbn's layers are TensorFlow code: fail at import, clearly, on another backend."""
    message = (
        "tfbn needs Keras's TensorFlow backend. Received: KERAS_BACKEND={!r}; set "
        "KERAS_BACKEND=tensorflow (or \"backend\": \"tensorflow\" in ~/.keras/keras.json) "
        "before importing keras or tfbn."
    )
    requested = _os.environ.get("KERAS_BACKEND")
    if requested and requested != "tensorflow":  # checked first: keras may not even import
        raise ImportError(message.format(requested))
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ImportError(message.format(keras.backend.backend()))


_require_tensorflow_backend()

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
from tfbn.saving import load_model  # noqa: E402

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
    "load_model",
]
