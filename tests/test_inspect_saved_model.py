"""The training-mode lint of SavedModels (`tfbn.inspect.lint_saved_model`, `tfbn inspect`)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from _serving_helpers import TESTDATA as TFS  # noqa: E402

import tfbn
from tfbn import cli
from tfbn.inspect import is_saved_model_dir, lint_saved_model, resolve_saved_model_dir

needs_tfs = pytest.mark.skipif(not os.path.isdir(TFS), reason="TF Serving fixtures not found")


def kinds(report):
    return {f.kind for f in report.findings}


def _keras_model(bn_class):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),
            bn_class(),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.5),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((16, 2), "float32"), epochs=1, verbose=0)  # non-trivial statistics
    return model


def _archive(model, path, training):
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda x: model(x, training=training),
        input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)],
    )
    archive.write_out(str(path), verbose=False)
    return str(path)


@pytest.fixture(scope="module")
def keras_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras_exports")
    model = _keras_model(keras.layers.BatchNormalization)
    model.export(str(root / "export"), verbose=False)
    return {
        "export": str(root / "export"),
        "train": _archive(model, root / "train", training=True),
        "infer": _archive(model, root / "infer", training=False),
    }


def test_stock_keras_training_archive_is_flagged_and_model_export_passes(keras_exports):
    report = lint_saved_model(keras_exports["train"])
    assert not report.ok
    assert {"batch_moments", "moving_average_update", "random_op"} <= kinds(report)
    moving = [f for f in report.findings if f.kind == "moving_average_update"]
    assert any("moving_mean" in f.message for f in moving)
    assert any("moving_variance" in f.message for f in moving)
    assert any("dropout" in f.message for f in report.findings if f.kind == "random_op")
    assert set(report.signatures) == {"serve", "serving_default"}
    assert "__saved_model_init_op" not in report.signatures

    for name in ("export", "infer"):
        clean = lint_saved_model(keras_exports[name])
        assert clean.ok, clean.format()
        assert "serving_default" in clean.signatures


def test_tfbn_fused_training_mode_is_flagged(tmp_path):
    model = _keras_model(tfbn.BatchNormalization)
    report = lint_saved_model(_archive(model, tmp_path / "train", training=True))
    assert {"training_batch_norm", "moving_average_update"} <= kinds(report)
    fused = [f for f in report.findings if f.kind == "training_batch_norm"]
    assert fused and all(f.op.startswith("FusedBatchNorm") for f in fused)
    assert lint_saved_model(_archive(model, tmp_path / "infer", training=False)).ok


class _Probe(tf.Module):
    """Hand-written TF2 graphs: a random op behind tf.cond, and a fixed batch dimension."""

    def __init__(self):
        super().__init__()
        self.unused = tf.Variable(0.0)

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def noisy(self, x):
        y = tf.cond(
            tf.reduce_sum(x) > 0,
            lambda: x + tf.random.uniform(tf.shape(x)),
            lambda: x,
        )
        return {"y": y}

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def clean(self, x):
        return {"y": x * 2.0}

    @tf.function(input_signature=[tf.TensorSpec((4, 3), tf.float32)])
    def fixed(self, x):
        return {"y": x + 1.0}

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def counter(self, x):
        self.unused.assign_add(1.0)
        return {"y": x}


def test_nested_functions_fixed_batch_and_only_the_serving_path(tmp_path):
    probe = _Probe()
    path = str(tmp_path / "probe")
    tf.saved_model.save(
        probe,
        path,
        signatures={
            name: getattr(probe, name).get_concrete_function()
            for name in ("noisy", "clean", "fixed", "counter")
        },  # fmt: skip
    )
    report = lint_saved_model(path)
    by_signature = {}
    for f in report.findings:
        by_signature.setdefault(f.signature, set()).add(f.kind)
    # the random op lives in a tf.cond branch function: found through the If's attributes
    assert by_signature == {
        "noisy": {"random_op"},
        "fixed": {"fixed_batch_dim"},
        "counter": {"variable_update"},
    }
    assert "clean" in report.signatures


def test_tf1_graph_with_training_batch_norm_and_moving_average(tmp_path):
    path = str(tmp_path / "tf1")
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="x")
        mean = tf.compat.v1.Variable(tf.zeros([2]), name="bn/moving_mean", use_resource=False)
        var = tf.compat.v1.Variable(tf.ones([2]), name="bn/moving_variance", use_resource=False)
        y, batch_mean, batch_var = tf.compat.v1.nn.fused_batch_norm(
            x, tf.ones([2]), tf.zeros([2]), is_training=True
        )
        with tf.name_scope("AssignMovingAvg"):
            update = tf.compat.v1.assign_sub(mean, 0.01 * (mean - batch_mean))
        with tf.control_dependencies([update]):
            y = tf.identity(y, name="y")
        clean = tf.identity(x * 2.0, name="clean")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            info = tf.compat.v1.saved_model.utils.build_tensor_info
            sig = tf.compat.v1.saved_model.signature_def_utils.build_signature_def
            builder.add_meta_graph_and_variables(
                sess,
                ["serve"],
                signature_def_map={
                    "serving_default": sig(
                        {"x": info(x)}, {"y": info(y)}, "tensorflow/serving/predict"
                    ),
                    "clean": sig({"x": info(x)}, {"y": info(clean)}, "tensorflow/serving/predict"),
                },
            )
            builder.save()
        del var
    report = lint_saved_model(path)
    assert {f.signature for f in report.findings} == {"serving_default"}
    assert kinds(report) == {"training_batch_norm", "moving_average_update"}
    moving = next(f for f in report.findings if f.kind == "moving_average_update")
    assert "bn/moving_mean" in moving.message and moving.op == "AssignSub"


@needs_tfs
def test_tf_serving_fixtures():
    half_plus_two = os.path.join(TFS, "saved_model_half_plus_two_cpu", "00000123")  # TF1
    report = lint_saved_model(half_plus_two)
    assert report.ok, report.format()
    assert "serving_default" in report.signatures and "classify_x_to_y" in report.signatures
    assert lint_saved_model(os.path.join(TFS, "saved_model_half_plus_three", "00000123")).ok
    # A TF Serving base path lints its latest version, as TF Serving serves it.
    base = os.path.join(TFS, "saved_model_half_plus_two_2_versions")
    assert resolve_saved_model_dir(base).endswith("00000124")
    assert lint_saved_model(base).ok
    # The counter model writes its variable on the serving path of three signatures.
    counter = lint_saved_model(os.path.join(TFS, "saved_model_counter", "00000123"))
    assert {(f.signature, f.kind) for f in counter.findings} == {
        ("incr_counter", "variable_update"),
        ("incr_counter_by", "variable_update"),
        ("reset_counter", "variable_update"),
    }
    # The TF2 half_plus_two declares x with shape [1]: a fixed batch dimension, and nothing else.
    tf2 = lint_saved_model(os.path.join(TFS, "saved_model_half_plus_two_tf2_cpu", "00000123"))
    assert kinds(tf2) == {"fixed_batch_dim"}
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        lint_saved_model(os.path.join(TFS, "bad_half_plus_two"))
    assert not is_saved_model_dir(os.path.join(TFS, "bad_half_plus_two", "00000123"))


def test_missing_path_and_no_serve_tag(tmp_path):
    with pytest.raises(FileNotFoundError):
        lint_saved_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        lint_saved_model(str(tmp_path))  # a directory without a SavedModel or versions
    module = tf.Module()
    module.f = tf.function(lambda x: x + 1.0, input_signature=[tf.TensorSpec([None], tf.float32)])
    path = str(tmp_path / "untagged")
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.f.get_concrete_function()}
    )
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    saved.meta_graphs[0].meta_info_def.ClearField("tags")
    saved.meta_graphs[0].meta_info_def.tags.append("train")
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(saved.SerializeToString())
    assert kinds(lint_saved_model(path)) == {"no_serving_graph"}


def test_cli_inspect_exit_codes(keras_exports, capsys, tmp_path):
    assert cli.main(["inspect", keras_exports["train"]]) == 1
    out = capsys.readouterr().out
    assert "batch_moments" in out and "moving_average_update" in out
    assert cli.main(["inspect", keras_exports["export"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["findings"] == []
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2


def test_inspect_is_a_package_that_keeps_its_names_and_loads_no_tensorflow():
    """Issue 10.11: tfbn/inspect.py became tfbn/inspect/ (one module per report); every
    name callers used is still `tfbn.inspect.X`, and importing it does not load TensorFlow
    (the SavedModel lint and `tfbn inspect --help` do not need it)."""
    code = """
import sys
import tfbn.inspect as inspect
names = ["inspect_model", "ModelReport", "BatchNormRow", "FLAG_ADVICE", "DEAD_GAMMA",
         "COLLAPSED_STD", "lint_model", "LintReport", "LintFinding", "MIN_BATCH",
         "lint_saved_model", "SavedModelReport", "Finding", "is_saved_model_dir",
         "resolve_saved_model_dir", "_read_saved_model", "load_keras_model",
         "is_keras_model_file", "KERAS_MODEL_SUFFIXES", "SAVED_MODEL_FILES"]
missing = [n for n in names if not hasattr(inspect, n)]
print(missing, sorted(m for m in ("tensorflow", "keras", "numpy") if m in sys.modules))
print(sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("tfbn.inspect.")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "[] []"
    assert lines[1] == "['_loading', '_model', '_saved_model', '_wiring']"
