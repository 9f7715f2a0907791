"""tfbn/_compat.py: what differs across the supported TensorFlow/Keras/protobuf range,
and the guards that refuse Keras 2 and non-TensorFlow backends at once.

These run in both CI environments (newest, and `make test-oldest`: TF 2.16,
protobuf 4.25), so each assertion holds at both ends of the range.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tfbn
from tfbn import _compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- protobuf: TF Serving's REST JSON with default fields ------------------------------------


def _status_response():
    from tensorflow_serving.apis import get_model_status_pb2

    resp = get_model_status_pb2.GetModelStatusResponse()
    status = resp.model_version_status.add()
    status.version = 1
    status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    status.status.SetInParent()  # OK: code 0 and an empty message, both defaults
    return resp


def test_message_to_dict_prints_default_fields_on_this_protobuf():
    """Failed on protobuf 4.25 (TF 2.16) before: the keyword exists only from 5.26."""
    assert _compat.message_to_dict(_status_response(), print_default_fields=True) == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert _compat.message_to_dict(_status_response()) == {
        "model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {}}]
    }


def test_message_to_dict_keeps_proto_field_names_when_asked():
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name="m", signature_name="serving_default")
    assert _compat.message_to_dict(spec, preserving_proto_field_name=True) == {
        "name": "m",
        "signature_name": "serving_default",
    }
    assert _compat.message_to_dict(spec) == {"name": "m", "signatureName": "serving_default"}


def test_rest_status_and_metadata_json_go_through_compat():
    from tfbn.serving import _json_tensor

    status = json.loads(_json_tensor.status_json(_status_response()))
    assert status["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}


# --- Keras 3 on the TensorFlow backend --------------------------------------------------------


def _import_tfbn(**env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", "import tfbn"],
        capture_output=True,
        text=True,
        timeout=120,
        env=full,
        cwd=REPO,
    )


def test_import_fails_at_once_on_another_keras_backend():
    done = _import_tfbn(KERAS_BACKEND="jax")
    assert done.returncode != 0
    assert (
        "ImportError: tfbn needs Keras's TensorFlow backend. Received: KERAS_BACKEND='jax'"
        in done.stderr
    )
    assert "set KERAS_BACKEND=tensorflow" in done.stderr


def test_import_reads_the_backend_from_keras_json(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    done = _import_tfbn(KERAS_HOME=str(tmp_path))
    assert done.returncode != 0
    assert f"Received: \"backend\" in {tmp_path / 'keras.json'}='torch'" in done.stderr
    assert _import_tfbn(KERAS_HOME=str(tmp_path), KERAS_BACKEND="tensorflow").returncode == 0


def test_backend_setting_defaults_to_tensorflow(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no keras.json there
    assert _compat._keras_backend_setting() == ("tensorflow", "the default")
    # Keras already imported (as in this process): its own answer counts
    _compat.check_keras_backend()
    assert keras.backend.backend() == "tensorflow"


def test_public_names_are_listed_alike_and_import_lazily():
    assert set(tfbn.__all__) == {"__version__", *tfbn._EXPORTS}
    for name in tfbn.__all__:
        assert getattr(tfbn, name) is not None
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tfbn; print('tensorflow' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.stdout.strip() == "False"


# --- Keras 2 (tf_keras, tf.keras under TF_USE_LEGACY_KERAS=1) is refused at once ----------------


@pytest.fixture(scope="module")
def legacy_model():
    return tf_keras.Sequential(
        [tf_keras.Input((4,)), tf_keras.layers.Dense(3), tf_keras.layers.BatchNormalization()]
    )


LEGACY_CALLS = {
    "fold_batch_norm": lambda m: tfbn.fold_batch_norm(m),
    "freeze_batch_norm": lambda m: tfbn.freeze_batch_norm(m),
    "unfreeze_batch_norm": lambda m: tfbn.unfreeze_batch_norm(m),
    "convert_sync_batch_norm": lambda m: tfbn.convert_sync_batch_norm(m),
    "revert_sync_batch_norm": lambda m: tfbn.revert_sync_batch_norm(m),
    "reset_running_stats": lambda m: tfbn.reset_running_stats(m),
    "recalibrate": lambda m: tfbn.recalibrate(m, [np.zeros((2, 4), "float32")]),
    "inspect_model": lambda m: tfbn.inspect_model(m),
    "lint_model": lambda m: tfbn.lint_model(m),
    "export_saved_model": lambda m: tfbn.export_saved_model(m, "/nonexistent/base"),
    "BatchNormStatsCallback": lambda m: _train_begin(
        tfbn.BatchNormStatsCallback("/nonexistent"), m
    ),
}


def _train_begin(callback, model):
    callback.set_model(model)
    callback.on_train_begin()


@pytest.mark.parametrize("name", sorted(LEGACY_CALLS))
def test_a_keras2_model_is_refused_with_how_to_switch(name, legacy_model):
    with pytest.raises(TypeError) as err:
        LEGACY_CALLS[name](legacy_model)
    message = str(err.value)
    assert "`model` is a Keras 2 object (tf_keras." in message
    assert "TF_USE_LEGACY_KERAS" in message and "`import keras`" in message


@pytest.mark.parametrize("layer", [tfbn.BatchNormalization, tfbn.FrozenBatchNormalization])
def test_a_tfbn_layer_in_a_keras2_functional_model_is_refused(layer):
    with pytest.raises(TypeError, match=r"`inputs` is a Keras 2 object .*TF_USE_LEGACY_KERAS"):
        layer()(tf_keras.Input((4,)))


def test_keras3_objects_and_tensors_pass_the_guard():
    model = keras.Sequential([keras.Input((4,)), tfbn.BatchNormalization()])
    _compat.check_not_legacy_keras(model)
    _compat.check_not_legacy_keras([tf.zeros((1, 4)), {"a": np.zeros(2)}], "inputs")
    assert model(np.zeros((2, 4), "float32")).shape == (2, 4)


def test_tf_keras_under_legacy_flag_is_refused_in_a_fresh_process():
    """As users hit it: TF_USE_LEGACY_KERAS=1 makes `tf.keras` Keras 2."""
    code = (
        "import tensorflow as tf, tfbn\n"
        "m = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])\n"
        "tfbn.fold_batch_norm(m)\n"
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("TypeError: `model` is a Keras 2 object (tf_keras."), last
