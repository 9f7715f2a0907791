"""SavedModel export for TF Serving (`tfbn.export.export_saved_model`, `tfbn export`)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from tfbn.serving.invariance import load_golden, read_golden  # the one golden-file reader

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
        "serving_default",
        "tfbn_batch_norm_reference",
        "tfbn_batch_norm_statistics",
    ]
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
        assert sorted(golden.files) == ["inputs/image", "meta", "outputs/logits"]
        x, y = golden["inputs/image"], golden["outputs/logits"]
    assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape[0] == y.shape[0] >= 4
    # the export's own answers, which the gate held to the Keras model
    np.testing.assert_array_equal(fn(image=tf.constant(x))["logits"], y)
    np.testing.assert_allclose(y, model(x, training=False), rtol=1e-5, atol=1e-5)
    golden = read_golden(result.path)
    assert golden.inputs["image"].shape == x.shape
    assert golden.meta == {"format": 2, "compute_dtype": "float32", "rtol": 1e-4, "dtypes": {}}

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
    assert set(loaded.signatures) == {
        "serving_default",
        "doubled",
        "tfbn_batch_norm_reference",
        "tfbn_batch_norm_statistics",
    }
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


def test_cli_export_json_on_success_and_on_a_refusal(tmp_path, capsys):
    """`--json` means the same as on every command: '-' prints the report's JSON
    instead of the text; a path writes it too. A refused export writes the gate's."""
    path = str(tmp_path / "model.keras")
    _cnn(tfbn.BatchNormalization).save(path)
    base = str(tmp_path / "serving" / "cnn")
    assert cli.main(["export", path, base, "--model-version", "1", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["version"] == 1 and doc["gate"]["ok"] is True
    report = tmp_path / "export.json"
    assert cli.main(["export", path, base, "--model-version", "2", "--json", str(report)]) == 0
    assert "exported version 2" in capsys.readouterr().out
    assert json.loads(report.read_text())["version"] == 2
    args = ["export", path, base, "--rtol", "1e-12", "--json", "-"]  # the fold rounds more
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is False and "gate failed" in captured.err
    assert sorted(os.listdir(base)) == ["1", "2"]


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
    names = ("tfbn folded", "tfbn unfolded", "keras export", "no BN (tfbn export)",
             "no BN (keras export)")  # fmt: skip
    for name in names:
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


# ------------------------------------------------- the gate cannot be fooled --


def _dense_bn(bn_class=keras.layers.BatchNormalization):
    inputs = keras.Input((5,), name="x")
    x = keras.layers.Dense(4, use_bias=False)(inputs)
    x = bn_class(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="y")(x))


def test_nan_statistics_are_refused_with_every_reason(tmp_path):
    """Issue 13.1: a negative moving variance made every output NaN and the gate said
    'parity 0.00e+00, lint OK' (NaN counted equal to NaN)."""
    model = _trained_stats(_dense_bn())
    model.get_layer("bn").moving_variance.assign(-np.ones(4, "float32"))
    with pytest.raises(ExportGateError) as err:
        export_saved_model(model, tmp_path / "m")
    report = err.value.report
    text = "\n".join(report.problems)
    assert "NaN/Inf for finite sample inputs" in text and "negative_variance" in text
    assert report.nonfinite and not (tmp_path / "m").exists()
    # allowing the statistics finding alone still refuses the NaN outputs
    with pytest.raises(ExportGateError, match="NaN/Inf for finite"):
        export_saved_model(model, tmp_path / "m", allow=["negative_variance"])
    # both allowed: written, and the report says what was allowed
    result = export_saved_model(
        model, tmp_path / "m", allow=["negative_variance", "nonfinite_outputs"]
    )
    assert result.gate.allowed == ["negative_variance", "nonfinite_outputs"]
    assert "allowed: negative_variance, nonfinite_outputs" in result.format()
    with pytest.raises(ValueError, match="allow"):
        export_saved_model(model, tmp_path / "m", allow=["everything"])


@pytest.mark.parametrize("bn_class", [keras.layers.BatchNormalization, tfbn.BatchNormalization])
def test_never_trained_statistics_are_refused(tmp_path, bn_class):
    """Issue 13.2: moving mean 0 / variance 1 exactly (never updated) exported with 'lint: OK'."""
    model = _dense_bn(bn_class)
    with pytest.raises(ExportGateError, match=r"never_updated\] BN layer 'bn'") as err:
        export_saved_model(model, tmp_path / "m")
    assert err.value.report.statistics and not (tmp_path / "m").exists()
    assert export_saved_model(model, tmp_path / "m", allow=["never_updated"]).gate.ok
    # the same finding tfbn inspect reports
    assert "never_updated" in tfbn.inspect.inspect_model(model).rows[0].flags


def test_cli_export_allow_flag(tmp_path, capsys):
    path = str(tmp_path / "fresh.keras")
    _dense_bn().save(path)
    assert cli.main(["export", path, str(tmp_path / "b")]) == 1
    assert "never_updated" in capsys.readouterr().err
    assert cli.main(["export", path, str(tmp_path / "b"), "--allow", "never_updated"]) == 0


@pytest.mark.parametrize("bad", [2**63, "9223372036854775808", 2**70, -1, "1e3", "٣"])
def test_versions_are_int64(tmp_path, bad):
    """Issue 13.10: 2**63 and 2**70 were written although TF Serving cannot parse them."""
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63 - 1\]"):
        export_saved_model(_cnn(), tmp_path / "m", version=bad)
    assert not (tmp_path / "m").exists()


def test_cli_export_rejects_an_int64_overflow(tmp_path, capsys):
    path = str(tmp_path / "m.keras")
    _cnn().save(path)
    assert cli.main(["export", path, str(tmp_path / "b"), "--version", str(2**63)]) == 2
    assert "2**63 - 1" in capsys.readouterr().err and not (tmp_path / "b").exists()


# ------------------------------------------------------------ mixed precision --


@pytest.fixture
def policy(request):
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(old)


def _mixed_cnn(fit=True):
    """Keras's mixed-precision recipe: float16/bfloat16 body, float32 softmax head."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = inputs
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5)(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(x)
    model = _trained_stats(keras.Model(inputs, outputs))
    if fit:
        rng = np.random.default_rng(0)
        model.compile("sgd", "sparse_categorical_crossentropy")
        model.fit(
            rng.normal(size=(32, 12, 12, 3)),
            rng.integers(0, 5, 32),
            batch_size=16,
            epochs=1,
            verbose=0,
        )
    return model


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("fold", [True, False])
def test_mixed_precision_model_passes_the_gate(tmp_path, policy, fold):
    """Issue 19.1/19.2: refused folded and unfolded at 1e-4 although nothing was wrong."""
    model = _mixed_cnn()
    result = export_saved_model(model, tmp_path / "m", fold=fold)
    gate = result.gate
    low = policy.removeprefix("mixed_")
    assert gate.ok and gate.compute_dtype == low and gate.reference == "float32 truth"
    assert gate.rtol == tfbn.tolerance.default_rtol(low)
    truth = gate.truth["probs"]
    assert truth["export"] <= truth["bound"] and truth["model"] > 0
    golden = read_golden(result.path)
    assert golden.meta["compute_dtype"] == low and golden.meta["rtol"] == gate.rtol


def _forgot_the_sqrt(gamma, beta, mean, variance, epsilon):
    """A wrong fold: gamma / (var + eps) instead of gamma / sqrt(var + eps)."""
    scale = 1.0 / (variance + tf.cast(epsilon, variance.dtype)) * tf.cast(gamma, variance.dtype)
    return scale, tf.cast(beta, scale.dtype) - mean * scale


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"], indirect=True)
def test_gate_still_refuses_wrong_folds_training_bn_and_nan(tmp_path, policy, monkeypatch):
    """Issue 19.3: the dtype-aware gate is not a looser one."""
    model = _mixed_cnn(fit=False)
    with monkeypatch.context() as patch:
        patch.setattr(tfbn.stats, "fold_scale_offset", _forgot_the_sqrt)
        with pytest.raises(ExportGateError) as err:
            export_saved_model(model, tmp_path / "wrong_fold")
    assert any("differs from model" in p or "float32 truth" in p for p in err.value.report.problems)

    def train_mode(serving_model):
        return tf.function(
            lambda image: {"y": serving_model(image, training=True)},
            input_signature=[tf.TensorSpec((None, 12, 12, 3), tf.float32)],
        )

    with pytest.raises(ExportGateError, match="training_batch_norm|batch_moments"):
        export_saved_model(
            model, tmp_path / "train", fold=False, extra_signatures={"train": train_mode}
        )

    bn = [layer for layer in model.layers if "batch_normalization" in layer.name][0]
    bn.moving_variance.assign(-np.ones(bn.moving_variance.shape, "float32"))
    with pytest.raises(ExportGateError, match="NaN/Inf for finite"):
        export_saved_model(model, tmp_path / "nan", allow=["negative_variance"])
    assert not any((tmp_path / d).exists() for d in ("wrong_fold", "train", "nan"))


# ------------------------------------------------------------ versions on disk --

_KILL_SCRIPT = """
import os, signal, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
import tfbn
from tfbn import export

model_path, base, mode = sys.argv[1:4]
model = keras.saving.load_model(model_path, compile=False)
if mode == "kill-after-first-version-change":
    def kill_after(fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            if any(os.fspath(a).endswith(os.sep + "3") for a in args):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper
    os.rename = kill_after(os.rename)
    export._exchange = kill_after(getattr(export, "_exchange", lambda a, b: None))
else:  # "term-while-exporting": wait inside the export for the parent's SIGTERM
    def slow(*args, **kwargs):
        open(os.path.join(os.path.dirname(base), "ready"), "w").close()
        import time
        time.sleep(120)
    export._write_warmup = slow
export.export_saved_model(model, base, version=3, overwrite=True)
"""


def _run_export_process(tmp_path, mode, on_ready=None):
    import subprocess
    import sys

    model_path = str(tmp_path / "m.keras")
    if not os.path.exists(model_path):
        _cnn().save(model_path)
    script = tmp_path / "script.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), model_path, str(tmp_path / "base"), mode],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if on_ready is not None:
            on_ready(proc)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace")


def test_overwrite_is_atomic_even_under_sigkill(tmp_path):
    """Issue 13.8: a kill between --overwrite's two renames left no version directory."""
    base = tmp_path / "base"
    export_saved_model(_cnn(), base, version=3)
    (base / "3" / "old-marker").write_text("")
    code, err = _run_export_process(tmp_path, "kill-after-first-version-change")
    assert code == -9, err[-2000:]
    # TF Serving sees a complete version 3: the new one (the swap is a single renameat2)
    assert (base / "3" / "saved_model.pb").exists() and not (base / "3" / "old-marker").exists()
    # the killed export's temp dir (holding the old version) is stale; the next export removes it
    from tfbn import layout

    assert len(layout.stale_temp_dirs(base)) == 1
    export_saved_model(_cnn(), base, version=4)
    assert _entries(base) == ["3", "4"]


def test_overwrite_refuses_where_an_atomic_swap_is_impossible(tmp_path, monkeypatch):
    import errno

    from tfbn import export

    base = tmp_path / "base"
    export_saved_model(_cnn(), base, version=1)
    (base / "1" / "old-marker").write_text("")

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(export, "_exchange", no_exchange)
    with pytest.raises(OSError, match="atomically"):
        export_saved_model(_cnn(), base, version=1, overwrite=True)
    assert (base / "1" / "old-marker").exists() and _entries(base) == ["1"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """Issue 13.9: SIGTERM during an export left its .tfbn-export-* directory behind."""
    import signal
    import time

    def terminate_when_ready(proc):
        deadline = time.monotonic() + 200
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "export never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)

    code, err = _run_export_process(tmp_path, "term-while-exporting", terminate_when_ready)
    assert code != 0 and "SIGTERM" in err, err[-2000:]
    assert _entries(tmp_path / "base") in (None, [])


def test_stale_temp_dirs_are_removed_live_ones_kept(tmp_path):
    """Issue 13.9: temp dirs of killed exports were never removed."""
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    base = tmp_path / "base"
    try:
        names = {
            "dead": f"{TMP_PREFIX}{dead.pid}-x1",
            "alive": f"{TMP_PREFIX}{alive.pid}-x2",
            "legacy_old": f"{TMP_PREFIX}abc",
            "legacy_new": f"{TMP_PREFIX}def",
        }
        for name in names.values():
            (base / name / "model").mkdir(parents=True)
        old = time.time() - 2 * 3600
        os.utime(base / names["legacy_old"], (old, old))
        export_saved_model(_cnn(), base, version=1)
        assert _entries(base) == sorted(["1", names["alive"], names["legacy_new"]])
    finally:
        alive.kill()
        alive.wait()


def test_layout_is_the_one_reader_of_version_directories(tmp_path):
    """Issue 10.7: one module owns the TF Serving layout; export, inspect and the check use it."""
    from tfbn.serving import invariance

    from tfbn import inspect as tfbn_inspect
    from tfbn import layout

    for name in ("1", "007", "7", str(2**63 - 1), str(2**63), "٣", "tmp", ".tfbn-export-1-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    versions = layout.version_dirs(tmp_path)
    assert list(versions) == [1, 7, 2**63 - 1] and versions[7] == str(tmp_path / "7")
    assert layout.latest_version(tmp_path) == 2**63 - 1
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        layout.next_version(tmp_path)
    assert layout.next_version(tmp_path / "missing") == 1
    assert layout.parse_version("0") == 0 and layout.parse_version("-1") is None
    assert layout.validate_version("42") == 42 and layout.validate_version(np.int64(5)) == 5
    assert layout.temp_dir_owner(layout.temp_dir_prefix(123) + "abc") == 123
    assert layout.golden_path("v") == os.path.join("v", "assets.extra", GOLDEN_FILE)
    assert layout.warmup_path("v") == os.path.join("v", "assets.extra", WARMUP_FILE)
    assert tfbn_inspect.resolve_saved_model_dir is layout.resolve_saved_model_dir
    assert invariance.GOLDEN_RELPATH == layout.GOLDEN_RELPATH


def test_export_progress_steps_on_stderr(tmp_path, capsys, monkeypatch):
    """Issue 13.11: the gate's steps on stderr when asked (or on a terminal), else silent."""
    from tfbn import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    export_saved_model(_cnn(), tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "tfbn export" in err and "/6 " in err  # planned steps
    export_saved_model(_cnn(), tmp_path / "b")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_mobilenet_v2_folds_and_passes(tmp_path, policy):
    """Issue 19.2/19.9: MobileNetV2 blocks (depthwise, pointwise, ReLU6, residual adds) under
    mixed precision: every BN folds and the export is no further from the float32 truth than
    the Keras model (with the stated margin)."""
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3),
        alpha=0.35,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    result = export_saved_model(_trained_stats(model), tmp_path)
    assert len(result.fold_report.folded) == 52 and result.gate.ok
    truth = result.gate.truth["predictions"]
    assert truth["export"] <= (1 + 0.5) * truth["model"] + result.gate.rtol
    assert result.gate.compute_dtype == policy.removeprefix("mixed_")
