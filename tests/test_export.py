"""SavedModel export for TF Serving (`tfbn.export.export_saved_model`, `tfbn export`)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from tfbn.serving.invariance import load_golden  # the one reader of the golden file

import tfbn
from tfbn import cli
from tfbn.export import (
    GOLDEN_FILE,
    TMP_PREFIX,
    WARMUP_FILE,
    ExportGateError,
    export_saved_model,
)
from tfbn.inspect import lint_saved_model


def _trained_stats(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if tfbn.convert.is_batch_norm(layer):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 1.0, shape))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, shape))
            layer.gamma.assign(rng.uniform(0.5, 2.0, shape))
            layer.beta.assign(rng.normal(0.0, 1.0, shape))
    return model


def _cnn(bn_class=keras.layers.BatchNormalization, name="image"):
    inputs = keras.Input((8, 8, 3), name=name)
    x = keras.layers.Conv2D(6, 3, use_bias=False)(inputs)
    x = bn_class(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3)(x)
    x = bn_class(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return _trained_stats(keras.Model(inputs, outputs))


def _entries(base):
    return sorted(os.listdir(base)) if os.path.isdir(base) else None


def test_export_layout_signature_warmup_and_golden(tmp_path):
    model = _cnn()
    base = str(tmp_path / "models" / "cnn")
    result = export_saved_model(model, base)
    assert result.version == 1 and result.path == os.path.join(base, "1")
    assert _entries(base) == ["1"]  # no temporary directory left behind
    assert [pair[0] for pair in result.fold_report.folded] == ["bn1", "bn2"]
    assert "folded 2" in result.format() and "lint: OK" in result.format()

    loaded = tf.saved_model.load(result.path)
    assert sorted(loaded.signatures) == [  # + the drift probe (tfbn.statistics_signature)
        "serving_default", "tfbn_batch_norm_reference", "tfbn_batch_norm_statistics"]
    fn = loaded.signatures["serving_default"]
    _, kwargs = fn.structured_input_signature
    assert list(kwargs) == ["image"] and kwargs["image"].shape.as_list() == [None, 8, 8, 3]
    assert list(fn.structured_outputs) == ["logits"]

    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(result.path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    signature = saved.meta_graphs[0].signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert set(saved.meta_graphs[0].meta_info_def.tags) == {"serve"}

    # golden file: the contract the serving check reads
    with np.load(os.path.join(result.path, "assets.extra", GOLDEN_FILE)) as golden:
        assert sorted(golden.files) == ["inputs/image", "outputs/logits"]
        x, y = golden["inputs/image"], golden["outputs/logits"]
    assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape[0] == y.shape[0] >= 4
    np.testing.assert_allclose(y, model(x, training=False), rtol=0, atol=0)
    np.testing.assert_allclose(fn(image=tf.constant(x))["logits"], y, rtol=1e-5, atol=1e-5)
    assert load_golden(result.path)[0]["image"].shape == x.shape

    # warm-up: PredictionLog records TF Serving replays on load
    records = list(tf.data.TFRecordDataset(os.path.join(result.path, "assets.extra", WARMUP_FILE)))
    assert len(records) == 2
    sizes = []
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert request.model_spec.name == "cnn"
        sizes.append(tf.make_ndarray(request.inputs["image"]).shape[0])
    assert sizes == [1, x.shape[0]]

    # version=None takes the next integer
    assert export_saved_model(model, base).version == 2
    assert export_saved_model(model, base, version=10).version == 10
    assert export_saved_model(model, base).version == 11
    assert _entries(base) == ["1", "10", "11", "2"]


def test_export_tfbn_model_unfolded_sample_inputs_and_extra_signature(tmp_path):
    model = _cnn(tfbn.BatchNormalization)
    x = np.random.default_rng(3).normal(size=(7, 8, 8, 3)).astype("float32")

    def doubled(serving_model):
        return tf.function(
            lambda image: {"twice": 2.0 * serving_model(image, training=False)},
            input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32, name="image")],
        )

    result = export_saved_model(
        model, tmp_path, version="3", sample_inputs={"image": x}, fold=False,
        extra_signatures={"doubled": doubled},
    )  # fmt: skip
    assert result.version == 3 and result.fold_report is None and result.nothing_folded
    loaded = tf.saved_model.load(result.path)
    assert set(loaded.signatures) == {"serving_default", "doubled", "tfbn_batch_norm_reference",
                                      "tfbn_batch_norm_statistics"}
    out = loaded.signatures["doubled"](image=tf.constant(x))["twice"]
    np.testing.assert_allclose(out, 2.0 * model(x, training=False), rtol=1e-5, atol=1e-5)
    inputs, _ = load_golden(result.path)
    np.testing.assert_array_equal(inputs["image"], x)
    assert lint_saved_model(result.path).ok


def test_export_multi_input_functional_and_no_batch_norm(tmp_path):
    a = keras.Input((5,), name="features")
    b = keras.Input((3,), name="extra")
    x = keras.layers.Concatenate()([a, b])
    hidden = keras.layers.Dense(6, name="hidden")(x)
    score = keras.layers.Dense(1, name="score")(hidden)
    aux = keras.layers.Dense(2, name="aux")(hidden)
    model = keras.Model([a, b], [score, aux])
    result = export_saved_model(model, tmp_path / "plain")
    assert result.nothing_folded and "nothing folded" in result.format()
    assert list(result.inputs) == ["features", "extra"]
    assert list(result.outputs) == ["score", "aux"]
    inputs, outputs = load_golden(result.path)
    assert sorted(inputs) == ["extra", "features"] and sorted(outputs) == ["aux", "score"]


def test_bad_input_writes_nothing(tmp_path):
    model = _cnn()
    base = tmp_path / "base"
    with pytest.raises(ValueError, match="not built"):
        export_saved_model(keras.Sequential([keras.layers.Dense(2)]), base)
    for bad in ("1.5", -1, True, 2.0, "v1"):
        with pytest.raises(ValueError, match="version"):
            export_saved_model(model, base, version=bad)
    with pytest.raises(ValueError, match="unknown channel"):
        unknown = keras.Sequential([keras.Input((None,)), keras.layers.ReLU()])
        export_saved_model(unknown, base)
    with pytest.raises(ValueError, match="sample_inputs"):
        spatial = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(2, 1)])
        export_saved_model(spatial, base)
    with pytest.raises(ValueError, match="shape"):
        export_saved_model(model, base, sample_inputs=np.zeros((4, 9, 9, 3), "float32"))
    with pytest.raises(ValueError, match="rows"):
        export_saved_model(model, base, sample_inputs=np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="track_running_stats"):
        bad_bn = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3),
                tfbn.BatchNormalization(track_running_stats=False),
            ]
        )
        export_saved_model(bad_bn, base)
    assert not base.exists()

    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_saved_model(model, a_file)

    # spatial dims unknown but sample inputs given: fine
    spatial = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(2, 1)])
    export_saved_model(spatial, tmp_path / "spatial", sample_inputs=np.ones((3, 5, 4, 3)))


def test_existing_version_needs_overwrite(tmp_path):
    model = _cnn()
    first = export_saved_model(model, tmp_path, version=4)
    marker = os.path.join(first.path, "marker")
    open(marker, "w").close()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_saved_model(model, tmp_path, version=4)
    assert os.path.exists(marker)  # untouched
    second = export_saved_model(model, tmp_path, version=4, overwrite=True)
    assert second.path == first.path and not os.path.exists(marker)
    assert _entries(tmp_path) == ["4"]


def test_base_path_under_a_file_is_unwritable(tmp_path):
    """Runs as any user (root included): a base path below a regular file cannot be written."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="Cannot write under"):
        export_saved_model(_cnn(), blocker / "model")
    assert sorted(os.listdir(tmp_path)) == ["afile"] and blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_base(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            export_saved_model(_cnn(), locked / "model")
    finally:
        locked.chmod(0o700)


class _BatchCentre(keras.layers.Layer):
    """Subtracts the batch mean at inference: the bug the gate exists for."""

    def call(self, x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True)


def test_gate_failure_leaves_no_version(tmp_path):
    inputs = keras.Input((6,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3, name="y")(_BatchCentre()(inputs)))
    base = tmp_path / "never" / "made"
    with pytest.raises(ExportGateError, match="changes with the batch") as err:
        export_saved_model(model, base)
    assert not err.value.report.ok and err.value.report.parity["y"] < 1e-5
    assert _entries(tmp_path) == []  # directories created for the export, removed with it

    # A training-mode extra signature fails the lint part of the gate.
    good = _cnn()
    existing = tmp_path / "existing"
    export_saved_model(good, existing, version=1)

    def train_mode(serving_model):
        return tf.function(
            lambda image: {"y": serving_model(image, training=True)},
            input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)],
        )

    original_bn = _cnn()
    with pytest.raises(ExportGateError, match="lint"):
        export_saved_model(
            original_bn, existing, fold=False, extra_signatures={"train": train_mode}
        )
    assert _entries(existing) == ["1"]
    assert not any(name.startswith(TMP_PREFIX) for name in os.listdir(existing))


def test_cli_export(tmp_path, capsys):
    path = str(tmp_path / "model.keras")
    _cnn(tfbn.BatchNormalization).save(path)
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, image=np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32"))
    base = str(tmp_path / "serving" / "cnn")
    assert cli.main(["export", path, base, "--version", "2", "--samples", samples]) == 0
    out = capsys.readouterr().out
    assert "exported version 2" in out and "folded 2" in out
    assert cli.main(["export", path, base, "--version", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    npy = str(tmp_path / "samples.npy")
    np.save(npy, np.ones((3, 8, 8, 3), "float32"))
    assert cli.main(["export", path, base, "--version", "2", "--overwrite", "--samples", npy]) == 0
    assert cli.main(["export", path, base, "--version", "two"]) == 2
    assert cli.main(["export", str(tmp_path / "missing.keras"), base]) == 2
    assert cli.main(["inspect", os.path.join(base, "2")]) == 0


def test_bench_export_example_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "bench_export.py"
    spec = importlib.util.spec_from_file_location("bench_export", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--repeats", "3", "--size", "8", "--width", "4", "--steps", "1"]
    assert module.main(args) == 0
    table = capsys.readouterr().out
    for name in ("tfbn folded", "keras export", "no BN (tfbn export)", "no BN (keras export)"):
        assert f"| 1 | {name} |" in table and f"| 64 | {name} |" in table


def test_export_real_architecture_mobilenet_v2(tmp_path):
    """Depthwise/pointwise convs, ReLU6, residual adds: every BN folds, the gate passes."""
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
    )
    result = export_saved_model(_trained_stats(model), tmp_path)
    assert len(result.fold_report.folded) == 52 and result.fold_report.frozen == []
    assert result.gate.ok and max(result.gate.parity.values()) < 1e-5
    assert lint_saved_model(result.path).ok
