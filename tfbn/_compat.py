"""The one place that knows which TensorFlow, Keras and protobuf tfbn runs with.

tfbn supports TensorFlow 2.16-2.21 with Keras 3 on the TensorFlow backend (the
tested range is in setup.cfg and README.md). What differs across that range, and
what must be refused early, lives here and nowhere else:

- protobuf's JSON printer renamed `including_default_value_fields` (protobuf
  < 5.26, as TensorFlow 2.16 pins it) to `always_print_fields_with_no_presence`
  (>= 5.26): `message_to_dict`.
- Keras must be Keras 3 on the TensorFlow backend: `check_keras_backend`, called
  when `tfbn` is imported.
- Under `TF_USE_LEGACY_KERAS=1`, `tf.keras` is Keras 2 (the tf_keras package),
  whose models and tensors tfbn's Keras 3 layers cannot work with:
  `check_not_legacy_keras`, called where tfbn receives a model, a layer or a
  symbolic tensor from the user.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys

__all__ = ["check_keras_backend", "check_not_legacy_keras", "message_to_dict"]

_SWITCH_TO_KERAS3 = (
    "tfbn works with Keras 3 only (`import keras`, keras>=3). Under TF_USE_LEGACY_KERAS=1, "
    "`tf.keras` is Keras 2 (the tf_keras package): build the model with `import keras` "
    "instead of `tf.keras` / `tf_keras`, or unset TF_USE_LEGACY_KERAS so that `tf.keras` "
    "is Keras 3 again."
)


# --- protobuf ----------------------------------------------------------------


@functools.cache
def _print_defaults_keyword() -> str:
    from google.protobuf import json_format

    params = inspect.signature(json_format.MessageToDict).parameters
    if "always_print_fields_with_no_presence" in params:
        return "always_print_fields_with_no_presence"  # protobuf >= 5.26
    return "including_default_value_fields"  # protobuf 4.25 (TensorFlow 2.16)


def message_to_dict(
    message, *, preserving_proto_field_name: bool = False, print_default_fields: bool = False
) -> dict:
    """`json_format.MessageToDict` with the same output on protobuf 4.25 to 7.x.

    Args:
        message: A protobuf message.
        preserving_proto_field_name: Keep snake_case field names (as TF Serving's
            REST API does for metadata) instead of lowerCamelCase.
        print_default_fields: Also print scalar, repeated and map fields that hold
            their default value (TF Serving's REST rendering), under whichever
            name the installed protobuf gives that option.
    """
    from google.protobuf import json_format

    opts = {"preserving_proto_field_name": preserving_proto_field_name}
    if print_default_fields:
        opts[_print_defaults_keyword()] = True
    return json_format.MessageToDict(message, **opts)


# --- Keras -------------------------------------------------------------------


def _keras_backend_setting() -> tuple[str, str]:
    """(backend, where it was set) as Keras will read it, without importing Keras.

    Keras takes KERAS_BACKEND if set, else the "backend" of keras.json in
    $KERAS_HOME or ~/.keras (/tmp/.keras when the home directory is not writable),
    else "tensorflow".
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        keras_dir = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    config = os.path.join(keras_dir, "keras.json")
    try:
        with open(config, encoding="utf-8") as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return (backend, f'"backend" in {config}') if backend else ("tensorflow", "the default")


def check_keras_backend() -> None:
    """Raises ImportError unless Keras is Keras 3 on the TensorFlow backend.

    Called by `import tfbn`: tfbn's layers call TensorFlow ops directly, so on the
    JAX or PyTorch backend they would fail later and less clearly. Keras is not
    imported for this (so that `tfbn --help` stays fast); if it is already
    imported, its own answer is used.
    """
    from importlib import metadata

    keras = sys.modules.get("keras")
    try:
        version = keras.__version__ if keras is not None else metadata.version("keras")
    except (AttributeError, metadata.PackageNotFoundError):
        version = None
    if version is not None and int(version.split(".")[0]) < 3:
        raise ImportError(
            f"tfbn needs Keras 3 (keras>=3); the installed keras is {version}. "
            "Install a Keras 3 release: pip install 'keras>=3.10'."
        )
    if keras is not None and hasattr(keras, "backend"):
        backend, source = keras.backend.backend(), "keras.backend.backend()"
    else:
        backend, source = _keras_backend_setting()
    if backend != "tensorflow":
        raise ImportError(
            f"tfbn needs Keras's TensorFlow backend. Received: {source}={backend!r}; set "
            'KERAS_BACKEND=tensorflow (or "backend": "tensorflow" in ~/.keras/keras.json) '
            "before importing keras or tfbn."
        )


def _is_legacy_keras(obj) -> bool:
    """True for objects of Keras 2 (tf_keras, or `tf.keras` under TF_USE_LEGACY_KERAS=1)."""
    return any(cls.__module__.split(".")[0] == "tf_keras" for cls in type(obj).__mro__)


def check_not_legacy_keras(obj, name: str = "model") -> None:
    """Raises TypeError if `obj` (or any item of a list/tuple/dict of them) is Keras 2.

    Args:
        obj: What the user passed: a model, a layer, a callback's model, or a
            layer's (possibly nested) inputs.
        name: The argument's name, for the message.
    """
    items = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (obj,)
    )
    for item in items:
        if _is_legacy_keras(item):
            raise TypeError(
                f"`{name}` is a Keras 2 object ({type(item).__module__}.{type(item).__name__}). "
                + _SWITCH_TO_KERAS3
            )
