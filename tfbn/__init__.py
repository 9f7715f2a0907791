"""tfbn: Batch Normalization for TensorFlow/Keras 3, from training to TF Serving.

Public names are listed explicitly below (see README.md for the API at a glance)
and imported on first use, so `import tfbn` and the `tfbn` command's `--help`
do not pay for importing TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from tfbn import _compat  # noqa: E402

# Keras 3 on the TensorFlow backend, or a clear ImportError now (without importing Keras
# unless it is already imported).
_compat.check_keras_backend()

# public name -> module that defines it
_EXPORTS = {
    "stats": "tfbn.stats",
    "recalibrate": "tfbn.calibrate",
    "BatchNormMomentumScheduler": "tfbn.callbacks",
    "BatchNormStatsCallback": "tfbn.callbacks",
    "convert_batch_norm": "tfbn.convert",
    "convert_sync_batch_norm": "tfbn.convert",
    "fold_batch_norm": "tfbn.convert",
    "freeze_batch_norm": "tfbn.convert",
    "reset_running_stats": "tfbn.convert",
    "revert_sync_batch_norm": "tfbn.convert",
    "unfreeze_batch_norm": "tfbn.convert",
    "export_saved_model": "tfbn.export",
    "inspect_model": "tfbn.inspect",
    "lint_model": "tfbn.inspect",
    "lint_saved_model": "tfbn.inspect",
    "BatchNormalization": "tfbn.layers",
    "FrozenBatchNormalization": "tfbn.layers",
    "SyncBatchNormalization": "tfbn.layers",
    "load_model": "tfbn.saving",
}

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


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tfbn' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"tfbn.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from tfbn import stats
    from tfbn.calibrate import recalibrate
    from tfbn.callbacks import BatchNormMomentumScheduler, BatchNormStatsCallback
    from tfbn.convert import (
        convert_batch_norm,
        convert_sync_batch_norm,
        fold_batch_norm,
        freeze_batch_norm,
        reset_running_stats,
        revert_sync_batch_norm,
        unfreeze_batch_norm,
    )
    from tfbn.export import export_saved_model
    from tfbn.inspect import inspect_model, lint_model, lint_saved_model
    from tfbn.layers import BatchNormalization, FrozenBatchNormalization, SyncBatchNormalization
    from tfbn.saving import load_model
