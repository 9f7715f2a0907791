"""Loading `.keras` files saved with Keras's BatchNormalization as tfbn layers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import keras

# How a `.keras` config names Keras's own layer (the public path, and the
# internal module older Keras versions wrote).
_KERAS_BN_MODULES = ("keras.layers", "keras.src.layers.normalization.batch_normalization")
_TFBN_BN = {"module": "tfbn.layers.batch_norm", "registered_name": "tfbn>BatchNormalization"}


def load_model(path: str | os.PathLike, **kwargs) -> keras.Model:
    """`keras.saving.load_model(path)` with every Keras BatchNormalization loaded as tfbn's.

    Keras resolves its built-in layers by module and ignores
    `custom_objects={"BatchNormalization": ...}` for them, so this rewrites the
    file's config (in a temporary copy; the file itself is untouched): each
    `keras.layers.BatchNormalization` entry, in nested models too, names
    `tfbn.BatchNormalization`, which takes every Keras argument (renorm
    included). Weights, optimizer state and compile settings load as saved,
    because tfbn's layer has Keras's variables in Keras's order. The counters
    of the new layers start at 0.

    Args:
        path: A `.keras` file.
        **kwargs: Passed to `keras.saving.load_model` (`custom_objects`,
            `compile`, `safe_mode`).

    Returns:
        The model, with `tfbn.BatchNormalization` wherever the file had Keras's layer.
    """
    path = os.fspath(path)
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ValueError(
            "tfbn.load_model reads Keras 3 `.keras` files. Received: "
            f"{path!r}; for a `.weights.h5` file build the model with tfbn layers and "
            "call `model.load_weights(path)`."
        )
    tmp_dir = tempfile.mkdtemp(prefix="tfbn_load_")
    try:
        rewritten = os.path.join(tmp_dir, os.path.basename(path))
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "config.json":
                    data = json.dumps(_to_tfbn(json.loads(data))).encode()
                dst.writestr(item, data)
        return keras.saving.load_model(rewritten, **kwargs)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _to_tfbn(node):
    """The config tree with Keras's BatchNormalization entries renamed to tfbn's."""
    if isinstance(node, list):
        return [_to_tfbn(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _to_tfbn(v) for k, v in node.items()}
    if node.get("class_name") == "BatchNormalization" and node.get("module") in _KERAS_BN_MODULES:
        node.update(_TFBN_BN)
    return node
