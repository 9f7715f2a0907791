"""Reports on models and SavedModels, one module per product:

- `_model.py`: `inspect_model`, the running-statistics report of a Keras model
  (`ModelReport`, one `BatchNormRow` per BN layer, `FLAG_ADVICE`);
  `tfbn inspect MODEL.keras`.
- `_wiring.py`: `lint_model`, the wiring lint of a Keras model (`LintReport` of
  `LintFinding`s); `tfbn lint MODEL.keras`.
- `_saved_model.py`: `lint_saved_model`, the training-mode lint of any SavedModel
  (`SavedModelReport` of `Finding`s); `tfbn inspect SAVED_MODEL`.
- `_loading.py`: the Keras model a report is about (`load_keras_model`).

Every report follows `tfbn.report.Report` (`ok`, `format()`, `to_dict()`,
`to_json()`). Importing this package does not load TensorFlow: the SavedModel
lint reads `saved_model.pb` without it, and the Keras reports import it when run.
"""

from tfbn.inspect._loading import KERAS_MODEL_SUFFIXES, is_keras_model_file, load_keras_model
from tfbn.inspect._model import (
    COLLAPSED_STD,
    DEAD_GAMMA,
    FLAG_ADVICE,
    BatchNormRow,
    ModelReport,
    inspect_model,
)
from tfbn.inspect._saved_model import (
    ASSIGN_OPS,
    CALL_OPS,
    FORWARD_DEPTH,
    FUSED_BATCH_NORM_OPS,
    MOVING_STATS,
    NORMALIZATION_OPS,
    RANDOM_HELPERS,
    RANDOM_OP,
    REDUCTION_OPS,
    SAVED_MODEL_FILES,
    VARIABLE_OPS,
    Finding,
    SavedModelReport,
    _read_saved_model,  # noqa: F401 - kept for callers of the module before the split
    is_saved_model_dir,
    lint_saved_model,
    resolve_saved_model_dir,
)
from tfbn.inspect._wiring import MIN_BATCH, LintFinding, LintReport, lint_model

__all__ = [
    # the Keras model's running statistics
    "inspect_model",
    "ModelReport",
    "BatchNormRow",
    "FLAG_ADVICE",
    "DEAD_GAMMA",
    "COLLAPSED_STD",
    # the Keras model's wiring
    "lint_model",
    "LintReport",
    "LintFinding",
    "MIN_BATCH",
    # any SavedModel
    "lint_saved_model",
    "SavedModelReport",
    "Finding",
    "is_saved_model_dir",
    "resolve_saved_model_dir",
    "SAVED_MODEL_FILES",
    "FUSED_BATCH_NORM_OPS",
    "REDUCTION_OPS",
    "NORMALIZATION_OPS",
    "ASSIGN_OPS",
    "RANDOM_OP",
    "RANDOM_HELPERS",
    "MOVING_STATS",
    "VARIABLE_OPS",
    "CALL_OPS",
    "FORWARD_DEPTH",
    # loading
    "load_keras_model",
    "is_keras_model_file",
    "KERAS_MODEL_SUFFIXES",
]
