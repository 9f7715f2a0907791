"""Loading the Keras model a report is about: a keras.Model as given, or a `.keras` file.

Keras and TensorFlow are imported inside the functions, so that importing
`tfbn.inspect` (and the SavedModel lint) does not load TensorFlow.
"""

from __future__ import annotations

import os

from tfbn.layout import is_saved_model_dir

KERAS_MODEL_SUFFIXES = (".keras",)


def is_keras_model_file(path: str | os.PathLike) -> bool:
    """True for a path ending in `.keras` (a Keras 3 model archive)."""
    return os.fspath(path).lower().endswith(KERAS_MODEL_SUFFIXES)


def load_keras_model(model_or_path):
    """A keras.Model as given, or loaded (uncompiled) from a `.keras` file."""
    import keras

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for deserialisation
    from tfbn import _compat

    _compat.check_not_legacy_keras(model_or_path)
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No such model file: {path!r}")
        if os.path.isdir(path) and is_saved_model_dir(path):
            raise ValueError(
                f"{path!r} is a SavedModel, not a Keras model: use "
                "tfbn.inspect.lint_saved_model (or `tfbn inspect` on it)."
            )
        if not is_keras_model_file(path):
            raise ValueError(f"Expected a Keras model file ending in .keras. Received: {path!r}")
        return keras.saving.load_model(path, compile=False)
    raise TypeError(
        "Expected a keras.Model or the path of a .keras file. Received: "
        f"{type(model_or_path).__name__}"
    )
