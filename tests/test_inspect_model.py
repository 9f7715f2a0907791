"""tfbn.inspect on Keras models: the BN statistics table (`inspect_model`,
`tfbn inspect MODEL.keras`) and the wiring lint (`lint_model`, `tfbn lint`)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn import cli
from tfbn.calibrate import recalibrate
from tfbn.inspect import inspect_model, lint_model


def _rules(report):
    return sorted((f.rule, f.layer) for f in report.findings)


def _flags(report):
    return {row.name: row.flags for row in report.rows}


# ------------------------------------------------------------------ inspect --


def _trained_model():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, use_bias=False),
         tfbn.BatchNormalization(name="bn_a"), keras.layers.ReLU(),
         keras.layers.Dense(3, use_bias=False), keras.layers.BatchNormalization(name="bn_b")]
    )  # fmt: skip
    recalibrate(model, [np.random.default_rng(0).normal(size=(32, 4)).astype("float32")],
                progress=False)  # fmt: skip
    return model


def test_healthy_model_is_ok_and_rows_describe_every_layer():
    report = inspect_model(_trained_model())
    assert report.ok
    assert [row.name for row in report.rows] == ["bn_a", "bn_b"]
    a, b = report.rows
    assert (a.kind, a.channels, a.momentum, a.epsilon, a.estimator, a.batches_tracked) == (
        "tfbn",
        6,
        0.99,
        1e-3,
        "biased",
        1,
    )
    assert (b.kind, b.channels, b.batches_tracked) == ("keras", 3, None)
    assert a.mean["min"] <= a.mean["median"] <= a.mean["max"]
    assert a.gamma == {"min": 1.0, "median": 1.0, "max": 1.0}
    table = report.table()
    assert "bn_a" in table and "bn_b" in table and "OK" in table
    data = json.loads(report.to_json())
    assert data["ok"] is True and [row["name"] for row in data["layers"]] == ["bn_a", "bn_b"]


def test_each_problem_is_flagged_with_the_channels_involved():
    model = _trained_model()
    a = model.get_layer("bn_a")
    a.gamma.assign([1.0, 0.0, 1.0, 1e-5, 1.0, 1.0])  # channels 1 and 3 dead
    var = a.moving_variance.numpy()
    var[2] = 1e-7  # collapsed: sqrt(1e-7 / (1e-7 + 1e-3)) ~ 0.01
    a.moving_variance.assign(var)
    b = model.get_layer("bn_b")
    b.moving_mean.assign([0.0, np.nan, np.inf])
    a.num_skipped_updates.assign(3)
    fresh = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="never")])

    report = inspect_model(model)
    assert _flags(report) == {
        "bn_a": ["dead_channels", "variance_collapse", "skipped_updates"],
        "bn_b": ["nonfinite"],
    }
    row_a, row_b = report.rows
    assert row_a.details["dead_channels"] == [1, 3]
    assert row_a.details["collapsed_channels"] == [2]
    assert row_b.details["nonfinite_channels"] == [1, 2]
    assert not report.ok
    table = report.table()
    for flag in ("dead_channels", "variance_collapse", "nonfinite", "why:", "fix:"):
        assert flag in table
    json.loads(report.to_json())  # NaN/Inf never leak into the JSON

    assert _flags(inspect_model(fresh)) == {"never": ["never_updated"]}
    recalibrate(fresh, [np.ones((4, 2), "float32") * np.arange(4, dtype="float32")[:, None]],
                progress=False)  # fmt: skip
    assert inspect_model(fresh).ok


def test_negative_variance_and_no_batch_norm():
    model = keras.Sequential([keras.Input((2,)), tfbn.BatchNormalization(name="bn")])
    model.layers[0].moving_variance.assign([-1.0, 1.0])
    model.layers[0].moving_mean.assign([0.5, 0.5])
    assert _flags(inspect_model(model)) == {"bn": ["negative_variance"]}
    empty = inspect_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    assert empty.rows == [] and "no BatchNormalization" in empty.table()


def test_inspect_cli_on_keras_file(tmp_path, capsys):
    good, bad = tmp_path / "good.keras", tmp_path / "bad.keras"
    model = _trained_model()
    model.save(good)
    model.get_layer("bn_a").gamma.assign(np.zeros(6))
    model.save(bad)

    assert cli.main(["inspect", str(good)]) == 0
    assert "bn_a" in capsys.readouterr().out
    assert cli.main(["inspect", str(bad), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["flags"] == ["dead_channels"]
    assert data["layers"][0]["batches_tracked"] == 1  # counters survive the .keras round trip
    out = tmp_path / "report.json"
    assert cli.main(["inspect", str(bad), "--json", str(out)]) == 1
    assert "dead_channels" in capsys.readouterr().out and json.loads(out.read_text())["ok"] is False
    assert cli.main(["inspect", str(tmp_path / "missing.keras")]) == 2
    assert "No such model file" in capsys.readouterr().err


# --------------------------------------------------------------------- lint --


def test_bias_before_bn_only_when_redundant():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, name="conv_bias")(inp)
    a = keras.layers.BatchNormalization(name="bn1")(a)
    b = keras.layers.Conv2D(4, 3, use_bias=False, name="conv_nobias")(inp)
    b = tfbn.BatchNormalization(name="bn2")(b)
    c = keras.layers.Conv2D(4, 3, name="conv_shared")(inp)
    c1 = keras.layers.BatchNormalization(name="bn3")(c)
    c = keras.layers.Add()([c, c1])  # the bias also reaches Add: not redundant
    d = keras.layers.Conv2D(4, 3, name="conv_wrong_axis")(inp)
    d = keras.layers.BatchNormalization(axis=1, name="bn4")(d)  # normalises rows, not channels
    model = keras.Model(inp, [a, b, c, d])
    assert _rules(lint_model(model)) == [("bias-before-bn", "conv_bias")]


def test_bias_before_bn_across_nested_models():
    block = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="inner_dense")],
                             name="block")  # fmt: skip
    inp = keras.Input((4,))
    out = tfbn.BatchNormalization(name="outer_bn")(block(inp))
    report = lint_model(keras.Model(inp, out))
    assert _rules(report) == [("bias-before-bn", "inner_dense")]
    finding = report.findings[0]
    assert "use_bias=False" in finding.fix and "cancels" in finding.why


def test_recurrent_and_dropout_rules():
    class NormCell(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.state_size = units
            self.dense = keras.layers.Dense(units)
            self.bn = keras.layers.BatchNormalization(name="cell_bn")

        def build(self, input_shape):
            self.dense.build((input_shape[0], input_shape[-1] + self.units))
            self.bn.build((input_shape[0], self.units))

        def call(self, x, states, training=None):
            h = self.bn(self.dense(tf.concat([x, states[0]], -1)), training=training)
            return h, [h]

    inp = keras.Input((5, 3))
    r = keras.layers.LSTM(4, return_sequences=True, name="lstm")(inp)
    r = keras.layers.BatchNormalization(name="bn_after_lstm")(r)
    r = keras.layers.RNN(NormCell(4), return_sequences=True, name="custom_rnn")(r)
    r = keras.layers.Flatten()(r)
    r = keras.layers.Dropout(0.3, name="drop")(r)
    r = tfbn.BatchNormalization(name="bn_after_drop")(r)
    r = keras.layers.Dropout(0.3, name="final_drop")(r)  # dropout after BN: fine
    out = keras.layers.Dense(1)(r)
    report = lint_model(keras.Model(inp, out))
    assert _rules(report) == [
        ("bn-after-dropout", "bn_after_drop"),
        ("bn-after-recurrent", "bn_after_lstm"),
        ("bn-in-recurrent", "cell_bn"),
    ]
    for finding in report.findings:
        assert finding.why and finding.fix and finding.severity == "warning"
    assert "recalibrate" in next(f for f in report.findings if f.rule == "bn-after-dropout").fix


def _bn_model(**bn_kwargs):
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, use_bias=False),
         tfbn.BatchNormalization(name="bn", **bn_kwargs)]
    )  # fmt: skip


def test_small_batch_rules():
    model = _bn_model()
    assert lint_model(model).ok  # no batch size: no batch rules
    assert lint_model(model, batch_size=32).ok
    assert _rules(lint_model(model, batch_size=4)) == [("small-batch", "bn")]
    # 4 replicas, global 16: 4 per replica, unsynchronised -> suggest sync BN
    report = lint_model(model, batch_size=16, strategy=4)
    assert _rules(report) == [("unsynced-small-batch", "bn")]
    assert "convert_sync_batch_norm" in report.findings[0].fix
    # synchronised: statistics over the global 16
    assert lint_model(_bn_model(synchronized=True), batch_size=16, strategy=4).ok
    # synchronised but the global batch itself is small -> GroupNorm
    small = lint_model(_bn_model(synchronized=True), batch_size=4, strategy=4)
    assert _rules(small) == [("small-batch", "bn")]
    assert "GroupNormalization" in small.findings[0].fix
    # ghost batches of 4 are small whatever the batch
    assert _rules(lint_model(_bn_model(virtual_batch_size=4), batch_size=64)) == [
        ("small-batch", "bn")
    ]
    # a frozen BN uses running statistics: batch size does not matter
    frozen = _bn_model()
    frozen.get_layer("bn").trainable = False
    assert lint_model(frozen, batch_size=2).ok


def test_lint_takes_a_strategy_object():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    assert strategy.num_replicas_in_sync == 4
    with strategy.scope():
        model = _bn_model()
    report = lint_model(model, batch_size=16, strategy=strategy)
    assert report.replicas == 4 and _rules(report) == [("unsynced-small-batch", "bn")]
    assert lint_model(model, batch_size=16).replicas == 4  # the model's own strategy


def test_lint_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        lint_model(_bn_model(), batch_size=0)
    with pytest.raises(ValueError, match="strategy"):
        lint_model(_bn_model(), strategy="four")
    with pytest.raises(TypeError, match="keras.Model"):
        lint_model(42)


def test_lint_cli(tmp_path, capsys):
    path = tmp_path / "m.keras"
    _bn_model().save(path)
    assert cli.main(["lint", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["lint", str(path), "--batch-size", "16", "--replicas", "4"]) == 1
    out = capsys.readouterr().out
    assert "unsynced-small-batch" in out and "why:" in out and "fix:" in out
    assert cli.main(["lint", str(path), "--batch-size", "4", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [f["rule"] for f in data["findings"]] == ["small-batch"]
    assert cli.main(["lint", str(path), "--batch-size", "0"]) == 2
    assert cli.main(["lint", str(tmp_path)]) == 2  # a directory is not a .keras file
