"""The statistics probe of tfbn exports and `tfbn drift` / `tfbn recalibrate` (issue 17).

Exactness: the signature's moment sums equal the float64 sums of the Keras model's
own BN inputs, for folded, frozen and unfolded layers, channels-last and -first.
serving_default: the same graph with and without the probe, lint clean.
Paths: in process, .keras, Keras's model.export(), REST and gRPC on the dev server
(with and without server-side batching), the recalibrate -> export -> drift loop.
Bad input: a clear message and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tfbn.serving import _config, drift
from tfbn.serving.client import GrpcClient, RestClient
from tfbn.serving.server import DevServer

import tfbn
from tfbn import cli, statistics_signature, stats
from tfbn.inspect import lint_saved_model

SIG = statistics_signature.STATISTICS_SIGNATURE
REF = statistics_signature.REFERENCE_SIGNATURE


def _cnn(data_format="channels_last", seed=0):
    """Conv-BN (folds), ReLU-BN (frozen when folded), Dense-BN (folds), Dense."""
    keras.utils.set_random_seed(seed)
    shape = (6, 6, 3) if data_format == "channels_last" else (3, 6, 6)
    axis = -1 if data_format == "channels_last" else 1
    inp = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(4, 3, data_format=data_format, name="conv")(inp)
    x = keras.layers.BatchNormalization(axis=axis, name="bn_conv")(x)
    x = keras.layers.ReLU()(x)
    x = tfbn.BatchNormalization(axis=axis, name="bn_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=data_format)(x)
    x = keras.layers.Dense(5, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="logits")(x))
    rng = np.random.default_rng(seed)
    for name, c in (("bn_conv", 4), ("bn_relu", 4), ("bn_dense", 5)):
        bn = model.get_layer(name)
        bn.moving_mean.assign(rng.normal(0, 1, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2, c).astype("float32"))
        bn.gamma.assign(rng.normal(0, 1, c).astype("float32"))
        bn.beta.assign(rng.normal(0, 1, c).astype("float32"))
    return model


def _traffic(model, n=20, seed=1, scale=1.0, offset=0.0):
    shape = model.inputs[0].shape[1:]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *shape)) * scale + offset).astype("float32")


def _bn_input_sums(model, x):
    """Float64 [n, sum, sum of squares] per channel of every BN layer's input, by name."""
    names = [la.name for la in model.layers if "bn" in la.name and hasattr(la, "axis")]
    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    out = {}
    outputs = tf.function(lambda t: probe(t, training=False))(tf.constant(x))  # as served
    for name, t in zip(names, outputs if isinstance(outputs, list) else [outputs], strict=True):
        t = np.asarray(t, np.float64)
        axis = model.get_layer(name).axis
        axis = (axis[0] if isinstance(axis, list) else axis) % t.ndim
        t = np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis])
        out[name] = np.stack([np.full(t.shape[1], len(t), np.float64), t.sum(0), (t**2).sum(0)])
    return out


def _signature_sums(path, x):
    loaded = tf.saved_model.load(path)
    rows = loaded.signatures[SIG](image=tf.constant(x))
    ref = loaded.signatures[REF](image=tf.constant(x[:2]))
    keys = sorted(rows, key=lambda k: statistics_signature.parse_key(k)[0])
    name = {k: statistics_signature.parse_key(k)[1] for k in keys}
    return ({name[k]: rows[k].numpy() for k in keys}, {name[k]: ref[k].numpy() for k in keys}, rows)


def _moments(sums):
    n, s1, s2 = sums
    mean = s1 / n
    return mean, s2 / n - mean**2


# ------------------------------------------------------------------ exactness --


def test_example_moment_sums_add_up_to_moment_sums():
    x = tf.constant(np.random.default_rng(0).normal(3, 2, (5, 4, 3, 2)), tf.float32)
    rows = stats.example_moment_sums(x, [-1])
    assert rows.shape == (5, 3, 2) and rows.dtype == tf.float64
    mean, var, count = stats.moments(tf.cast(x, tf.float64), [0, 1, 2])
    np.testing.assert_allclose(
        tf.reduce_sum(rows, 0), stats.moment_sums(mean, var, count), rtol=1e-12
    )
    mask = np.random.default_rng(1).integers(0, 2, (5, 4, 3, 1))
    weighted = tf.reduce_sum(stats.example_moment_sums(x, [3], mask), 0).numpy()
    x64 = x.numpy().astype(np.float64).reshape(-1, 2)
    w = np.broadcast_to(mask, x.shape).reshape(-1, 2)
    np.testing.assert_allclose(
        weighted, [w.sum(0), (w * x64).sum(0), (w * x64**2).sum(0)], rtol=1e-12
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("fold", [True, False])
def test_signature_sums_equal_the_models_bn_inputs(tmp_path, data_format, fold):
    model = _cnn(data_format)
    x = _traffic(model)
    result = tfbn.export_saved_model(model, tmp_path / "m", fold=fold, sample_inputs=x[:4])
    if fold:
        assert {bn for bn, _ in result.fold_report.folded} == {"bn_conv", "bn_dense"}
        assert result.fold_report.frozen == ["bn_relu"]
    sums, ref, rows = _signature_sums(result.path, x)
    want = _bn_input_sums(model, x)
    served_want = _bn_input_sums(tfbn.fold_batch_norm(model), x) if fold else want
    assert list(sums) == ["bn_conv", "bn_relu", "bn_dense"]  # forward order
    assert all(v.shape[:2] == (len(x), 3) for v in rows.values())
    asset = json.load(
        open(os.path.join(result.path, "assets.extra", statistics_signature.ASSET_FILE))
    )
    kinds = {layer["name"]: layer["kind"] for layer in asset["layers"]}
    for name, got in sums.items():
        total = got.sum(axis=0)
        np.testing.assert_array_equal(total[0], want[name][0])
        folded = kinds[name] == statistics_signature.FOLDED
        assert kinds[name] == (
            ("folded" if name != "bn_relu" else "frozen") if fold else "batch_norm"
        )
        if folded:  # recovered from the folded producer's float32 output
            (m, v), (m0, v0) = _moments(total), _moments(want[name])
            scale = np.sqrt(ref[name][0][1] + ref[name][0][2])  # sqrt(var + eps): drift's unit
            np.testing.assert_allclose(m / scale, m0 / scale, rtol=0, atol=1e-5)
            np.testing.assert_allclose(v, v0, rtol=1e-4)
        else:  # the BN input itself: the same float32 values, summed in float64
            truth = served_want[name] if fold else want[name]
            np.testing.assert_allclose(total, truth, rtol=1e-9, atol=1e-9)
            # (with folding, upstream folded layers round differently in float32)
            np.testing.assert_allclose(total, want[name], rtol=1e-5, atol=1e-5)
        bn = model.get_layer(name)
        np.testing.assert_allclose(
            ref[name][0],
            [
                bn.moving_mean.numpy(),
                bn.moving_variance.numpy(),
                np.full(bn.moving_mean.shape, bn.epsilon),
            ],
        )
    # Batch-major: each example's row is what it gets alone (no batch statistics).
    alone = tf.saved_model.load(result.path).signatures[SIG](image=tf.constant(x[3:4]))
    for key, value in alone.items():
        np.testing.assert_allclose(value.numpy()[0], rows[key].numpy()[3], rtol=1e-6, atol=1e-9)


def test_near_zero_gamma_channels_are_unobservable_not_garbage(tmp_path):
    model = _cnn()
    model.get_layer("bn_conv").gamma.assign(np.array([1.0, 1e-6, 0.0, -0.5], "float32"))
    x = _traffic(model)
    result = tfbn.export_saved_model(model, tmp_path / "m", sample_inputs=x[:4])
    sums, _, _ = _signature_sums(result.path, x)
    total = sums["bn_conv"].sum(0)
    np.testing.assert_array_equal(total[:, [1, 2]], 0.0)  # n = 0: not observable
    (m, v), (m0, v0) = (
        _moments(total[:, [0, 3]]),
        _moments(_bn_input_sums(model, x)["bn_conv"][:, [0, 3]]),
    )
    np.testing.assert_allclose(m, m0, atol=1e-5)
    np.testing.assert_allclose(v, v0, rtol=1e-4)
    report = drift.measure_drift(drift.SavedModelProbe(result.path), {"image": x})
    layer = report.layers[0]
    assert (layer.channels, layer.observed_channels) == (4, 2)
    assert all(c["channel"] in (0, 3) for c in layer.top_channels)
    assert np.isfinite(layer.score)


def _canonical_serving_graph(path):
    """serving_default's functions, with function names replaced by their discovery order."""
    from tfbn.inspect import _read_saved_model

    meta = _read_saved_model(path).meta_graphs[0]
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    sig = meta.signature_def["serving_default"]
    top = {n.name: n for n in meta.graph_def.node}
    calls = [top[o.name.split(":")[0]] for o in sig.outputs.values()]
    names, order, queue = (
        {},
        [],
        [a.func.name for c in calls for a in c.attr.values() if a.HasField("func")],
    )
    while queue:
        name = queue.pop(0)
        if name in names or name not in library:
            continue
        names[name] = f"f{len(names)}"
        order.append(name)
        for node in library[name].node_def:
            queue += [a.func.name for a in node.attr.values() if a.HasField("func")]
    text = []
    for name in order:
        fn = library[name]
        copy = type(fn)()
        copy.CopyFrom(fn)
        copy.signature.name = names[name]
        for node in copy.node_def:
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in names:
                    attr.func.name = names[attr.func.name]
        copy.ClearField("attr")
        copy.ClearField("arg_attr")  # captured-variable ids, numbered per trace
        text.append(str(copy))
    return "\n".join(text)


def test_serving_default_is_unchanged_and_the_probe_passes_the_lint(tmp_path):
    model = _cnn()
    x = _traffic(model)
    with_probe = tfbn.export_saved_model(model, tmp_path / "a", sample_inputs=x[:4])
    without = tfbn.export_saved_model(
        model, tmp_path / "b", sample_inputs=x[:4], statistics_signature=False
    )
    assert _canonical_serving_graph(with_probe.path) == _canonical_serving_graph(without.path)
    a = tf.saved_model.load(with_probe.path)
    b = tf.saved_model.load(without.path)
    assert sorted(a.signatures) == ["serving_default", REF, SIG]
    assert sorted(b.signatures) == ["serving_default"]
    np.testing.assert_array_equal(
        a.signatures["serving_default"](image=tf.constant(x))["logits"],
        b.signatures["serving_default"](image=tf.constant(x))["logits"],
    )
    report = lint_saved_model(with_probe.path)
    assert report.ok and SIG in report.signatures and REF in report.signatures, report.format()
    assert not os.path.exists(
        os.path.join(without.path, "assets.extra", statistics_signature.ASSET_FILE)
    )


def test_model_without_bn_exports_without_probe_and_drift_says_so(tmp_path, capsys):
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    result = tfbn.export_saved_model(model, tmp_path / "m")
    assert sorted(tf.saved_model.load(result.path).signatures) == ["serving_default"]
    np.save(tmp_path / "t.npy", np.ones((4, 4), "float32"))
    model.save(tmp_path / "m.keras")
    assert cli.main(["drift", str(tmp_path / "m.keras"), "--inputs", str(tmp_path / "t.npy")]) == 2
    assert "no BatchNormalization layer" in capsys.readouterr().err
    assert cli.main(["drift", str(tmp_path / "m"), "--inputs", str(tmp_path / "t.npy")]) == 2
    err = capsys.readouterr().err
    assert "no BatchNormalization layer (nothing to drift)" in err and "Traceback" not in err


# ------------------------------------------------------------------------ CLI --


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A model recalibrated on `traffic` (so that traffic shows no drift), its export,
    the traffic and a shifted copy."""
    root = tmp_path_factory.mktemp("drift")
    model = _cnn()
    traffic = _traffic(model, n=96, seed=3)
    tfbn.recalibrate(model, [traffic[i : i + 32] for i in range(0, 96, 32)], progress=False)
    model.save(root / "m.keras")
    result = tfbn.export_saved_model(model, root / "base", sample_inputs=traffic[:8])
    np.savez(root / "traffic.npz", image=traffic)
    np.savez(root / "shifted.npz", image=traffic * 2.0 + 1.0)
    return {"root": root, "model": model, "export": result, "traffic": traffic}


def test_cli_drift_ok_drift_json_and_png(calibrated, capsys):
    root = calibrated["root"]
    base = str(root / "base")
    assert cli.main(["drift", base, "--inputs", str(root / "traffic.npz")]) == 0
    out = capsys.readouterr().out
    assert "OK: every BN layer below the threshold" in out and "| bn_conv |" in out
    png = root / "drift.png"
    code = cli.main(
        ["drift", base, "--inputs", str(root / "shifted.npz"), "--json", "--png", str(png)]
    )
    assert code == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["drift"] and doc["threshold"] == drift.DEFAULT_THRESHOLD
    assert [la["name"] for la in doc["layers"]] == ["bn_conv", "bn_relu", "bn_dense"]
    assert doc["layers"][0]["score"] > drift.DEFAULT_THRESHOLD
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers from the .keras model in process
    assert (
        cli.main(["drift", str(root / "m.keras"), "--inputs", str(root / "shifted.npz"), "--json"])
        == 1
    )
    local = json.loads(capsys.readouterr().out)
    for a, b in zip(doc["layers"], local["layers"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)


def test_scores_are_exactly_zero_on_the_calibration_traffic(calibrated):
    probe = drift.SavedModelProbe(calibrated["export"].path)
    report = drift.measure_drift(probe, {"image": calibrated["traffic"]}, batch_size=7)
    assert report.ok and report.score < 1e-3, report.table()
    shifted = drift.measure_drift(probe, {"image": calibrated["traffic"] + 1.0})
    assert shifted.drift and shifted.layers[0].mean_abs_shift > 0.3


def test_recalibrate_export_drift_loop(calibrated, tmp_path, capsys):
    root = calibrated["root"]
    new = tmp_path / "new.keras"
    assert (
        cli.main(
            [
                "recalibrate",
                str(root / "m.keras"),
                "--inputs",
                str(root / "shifted.npz"),
                "--out",
                str(new),
            ]
        )
        == 0
    )
    assert "recalibrated 3 BatchNormalization layer(s)" in capsys.readouterr().out
    args = ["recalibrate", str(root / "m.keras"), "--inputs", str(root / "shifted.npz")]
    assert cli.main([*args, "--out", str(tmp_path / "again.keras"), "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is True and "saved" in captured.err
    base = tmp_path / "base"
    assert cli.main(["export", str(new), str(base), "--samples", str(root / "shifted.npz")]) == 0
    assert cli.main(["drift", str(base), "--inputs", str(root / "shifted.npz")]) == 0
    assert cli.main(["drift", str(base), "--inputs", str(root / "traffic.npz")]) == 1


def test_export_flag_and_keras_export_need_the_keras_model(calibrated, tmp_path, capsys):
    root = calibrated["root"]
    base = tmp_path / "nosig"
    assert (
        cli.main(
            [
                "export",
                str(root / "m.keras"),
                str(base),
                "--no-statistics-signature",
                "--samples",
                str(root / "traffic.npz"),
            ]
        )
        == 0
    )
    assert sorted(tf.saved_model.load(str(base / "1")).signatures) == ["serving_default"]
    capsys.readouterr()
    assert cli.main(["drift", str(base), "--inputs", str(root / "traffic.npz")]) == 2
    err = capsys.readouterr().err
    assert f"no '{SIG}' signature" in err and "--keras" in err and "Traceback" not in err
    assert (
        cli.main(
            [
                "drift",
                str(base),
                "--inputs",
                str(root / "shifted.npz"),
                "--keras",
                str(root / "m.keras"),
            ]
        )
        == 1
    )
    # Keras's own model.export(): no probe; the .keras model computes the same numbers
    calibrated["model"].export(str(tmp_path / "kexport" / "1"), verbose=False)
    assert (
        cli.main(
            [
                "drift",
                str(tmp_path / "kexport"),
                "--inputs",
                str(root / "traffic.npz"),
                "--keras",
                str(root / "m.keras"),
            ]
        )
        == 0
    )
    # ... but only if it is the served model
    other = _cnn(seed=5)
    other.save(tmp_path / "other.keras")
    capsys.readouterr()
    assert (
        cli.main(
            [
                "drift",
                str(tmp_path / "kexport"),
                "--inputs",
                str(root / "traffic.npz"),
                "--keras",
                str(tmp_path / "other.keras"),
            ]
        )
        == 2
    )
    assert "is not the served model" in capsys.readouterr().err


def test_check_traffic_names_extra_inputs():
    spec = {"image": (np.float32, [-1, 6, 6, 3])}
    x = np.zeros((4, 6, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        drift.check_traffic({"image": x, "extra": x}, spec)
    assert drift.check_traffic({"image": x}, spec) == 4


def test_warmup_records_are_traffic(calibrated):
    warmup = os.path.join(calibrated["export"].path, "assets.extra", "tf_serving_warmup_requests")
    traffic = drift.load_traffic(warmup, ["image"])
    np.testing.assert_array_equal(
        traffic["image"], np.concatenate([calibrated["traffic"][:1], calibrated["traffic"][:8]])
    )


# ---------------------------------------------------------------- bad input --


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: {"image": np.full_like(t[:4], np.nan)}, "NaN or Inf in 4 of 4 examples"),
        (
            lambda t: {"image": t[:, :5]},
            "has shape (96, 5, 6, 3); the signature expects (-1, 6, 6, 3)",
        ),
        (lambda t: {"image": t[:0]}, "traffic has 0 example(s)"),
        (lambda t: {"image": t[:1]}, "traffic has 1 example(s)"),
        (lambda t: {"pixels": t}, "has arrays ['pixels'], but the model's inputs are ['image']"),
    ],
)
def test_bad_traffic_is_a_usage_error(calibrated, tmp_path, capsys, make, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **make(calibrated["traffic"]))
    for model in (str(calibrated["root"] / "base"), str(calibrated["root"] / "m.keras")):
        assert cli.main(["drift", model, "--inputs", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tfbn drift: error:") and message in err and "Traceback" not in err


def test_bad_usage(calibrated, tmp_path, capsys):
    root = calibrated["root"]
    traffic = str(root / "traffic.npz")
    cases = [
        (["drift", str(tmp_path / "nope"), "--inputs", traffic], "does not exist"),
        (["drift", str(root / "base"), "--inputs", str(tmp_path / "nope.npz")], "does not exist"),
        (
            ["drift", "--rest", "http://127.0.0.1:1", "--inputs", traffic],
            "--model_name is required",
        ),
        (["drift", str(root / "base"), "--inputs", traffic, "--threshold", "0"], "--threshold"),
        (["drift", str(root / "base"), "--inputs", traffic, "--batch_size", "0"], "--batch_size"),
        (
            [
                "drift",
                "--rest",
                "http://127.0.0.1:1",
                "--model_name",
                "m",
                "--inputs",
                traffic,
                "--timeout",
                "0.5",
            ],
            "the server did not answer",
        ),
        (["recalibrate", str(root / "m.keras"), "--inputs", traffic, "--out", "x.h5"], ".keras"),
    ]
    bad = tmp_path / "junk.tfrecord"
    bad.write_bytes(b"not a record")
    cases.append((["drift", str(root / "base"), "--inputs", str(bad)], "PredictionLog"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


# -------------------------------------------------------------------- server --


@pytest.fixture(scope="module")
def served(calibrated):
    batching = _config.BatchingParameters(
        max_batch_size=16, batch_timeout_micros=1000, allowed_batch_sizes=(8, 16)
    )
    models = [_config.ModelConfig("m", str(calibrated["root"] / "base"))]
    with DevServer(models, port=0, rest_api_port=0, batching=batching) as srv:
        yield srv


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_live_server_matches_in_process_even_behind_batching(
    calibrated, served, transport, monkeypatch
):
    from tfbn.serving import _batcher

    batches = []
    run = _batcher.Batcher._run
    monkeypatch.setattr(
        _batcher.Batcher,
        "_run",
        lambda self, servable, batch: (batches.append(len(batch)), run(self, servable, batch))[1],
    )
    shifted = calibrated["traffic"] * 2.0 + 1.0
    local = drift.measure_drift(
        drift.SavedModelProbe(calibrated["export"].path), {"image": shifted}, batch_size=5
    )
    client = (
        RestClient(served.rest_url, "m")
        if transport == "rest"
        else GrpcClient(served.grpc_target, "m")
    )
    with client:
        remote = drift.measure_drift(drift.ClientProbe(client), {"image": shifted}, batch_size=5)
    assert remote.drift and [la.name for la in remote.layers] == ["bn_conv", "bn_relu", "bn_dense"]
    for a, b in zip(local.layers, remote.layers, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-9)
    assert batches  # it went through the server's batcher


def test_cli_against_the_server_and_bad_traffic_keeps_it_serving(
    calibrated, served, tmp_path, capsys
):
    root = calibrated["root"]
    capsys.readouterr()
    assert (
        cli.main(
            [
                "drift",
                "--rest",
                served.rest_url,
                "--model_name",
                "m",
                "--inputs",
                str(root / "traffic.npz"),
                "--batch_size",
                "32",
            ]
        )
        == 2
    )
    assert "larger than maximum input batch size 16" in capsys.readouterr().err  # the server's
    for where in (
        ["--rest", served.rest_url, "--batch_size", "16"],
        ["--grpc", served.grpc_target, "--batch_size", "16"],
    ):
        assert (
            cli.main(["drift", *where, "--model_name", "m", "--inputs", str(root / "traffic.npz")])
            == 0
        )
        assert (
            cli.main(["drift", *where, "--model_name", "m", "--inputs", str(root / "shifted.npz")])
            == 1
        )
        np.savez(tmp_path / "nan.npz", image=np.full((3, 6, 6, 3), np.nan, "float32"))
        capsys.readouterr()
        assert (
            cli.main(["drift", *where, "--model_name", "m", "--inputs", str(tmp_path / "nan.npz")])
            == 2
        )
        assert "NaN" in capsys.readouterr().err
        assert (
            cli.main(
                ["drift", *where, "--model_name", "nope", "--inputs", str(root / "traffic.npz")]
            )
            == 2
        )
        assert "NOT_FOUND" in capsys.readouterr().err
    with RestClient(served.rest_url, "m") as client:  # still serving
        assert client.predict({"image": calibrated["traffic"][:2]})["logits"].shape == (2, 3)


def test_redeploy_if_drifted_on_a_live_server(calibrated, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(calibrated["export"].path, base / "1")
    keras_path = tmp_path / "m.keras"
    shutil.copy(calibrated["root"] / "m.keras", keras_path)
    shifted = {"image": calibrated["traffic"] * 2.0 + 1.0}
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0.1,
    ) as srv:
        result = drift.redeploy_if_drifted(
            str(keras_path), str(base), shifted, address=srv.rest_url, model_name="m"
        )
        assert result.before.drift and result.new_version == 2
        assert result.after is not None and result.after.ok, result.after.table()
        with GrpcClient(srv.grpc_target, "m") as client:
            assert client.metadata().version == 2
    assert os.path.isfile(result.recalibrated_model)


# ---------------------------------------------------------- examples, experiment --


def _load_script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


def test_bench_statistics_signature_runs(capsys):
    assert _load_script(EXAMPLES / "bench_statistics_signature.py").main(["--repeats", "4"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | serving_default (export with probe) |" in out and SIG in out


@pytest.mark.slow
def test_drift_experiment_quick(tmp_path):
    from test_experiments import check_report

    module = _load_script(EXAMPLES / "experiments" / "drift_detection.py")
    result = module.main(["--quick", "--out", str(tmp_path)])
    check_report(result, "drift_detection", tmp_path)
    shifts = {(r["shift"], r["strength"]) for r in result["rows"]}
    assert ("none", 0.0) in shifts and ("translate", 2) in shifts
    assert set(result["false_alarm"]) == {64, 256}
    for r in result["rows"]:
        assert 0.0 <= r["acc_shifted"] <= 1.0 and r["score_shifted"] >= 0.0


def test_nested_model_with_dict_inputs(tmp_path):
    """A BN inside a nested Sequential (folded) and one after it (frozen), two named inputs:
    the export's probe and the .keras computation agree."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(name="inner_bn"),
        ],
        name="block",
    )
    a, b = keras.Input((6, 6, 3), name="a"), keras.Input((6, 6, 1), name="b")
    x = keras.layers.BatchNormalization(name="outer_bn")(inner(keras.layers.Concatenate()([a, b])))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    rng = np.random.default_rng(0)
    traffic = {
        "a": rng.standard_normal((10, 6, 6, 3)).astype("float32"),
        "b": rng.standard_normal((10, 6, 6, 1)).astype("float32"),
    }
    # Statistics never trained: allowed explicitly (this test is about the graph's shape).
    result = tfbn.export_saved_model(
        model, tmp_path / "m", sample_inputs=traffic, allow=["never_updated"]
    )
    assert result.fold_report.folded == [("inner_bn", inner.layers[0].name)]
    served = drift.measure_drift(drift.SavedModelProbe(result.path), traffic, 4)
    local = drift.measure_drift(drift.KerasProbe(model), traffic, 3)
    assert [la.name for la in served.layers] == ["inner_bn", "outer_bn"]
    for s, k in zip(served.layers, local.layers, strict=True):
        assert s.score == pytest.approx(k.score, rel=1e-5)
