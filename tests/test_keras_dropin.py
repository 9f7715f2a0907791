"""tfbn.BatchNormalization where Keras's layer was: input rules, state, loading, edge cases."""

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_helpers import needs_keras_renorm

import tfbn

RNG = np.random.default_rng(3)


# --------------------------------------------------------------- input rules --


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_integer_and_boolean_inputs_are_cast_as_keras_casts_them(dtype):
    x = (
        (RNG.integers(0, 5, size=(8, 3)) > 1)
        if dtype == "bool"
        else RNG.integers(0, 5, size=(8, 3))
    )
    x = x.astype(dtype)
    ours, theirs = tfbn.BatchNormalization(), keras.layers.BatchNormalization()
    for training in (True, False):
        y_ours, y_theirs = ours(x, training=training), theirs(x, training=training)
        assert y_ours.dtype == y_theirs.dtype == "float32"
        np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-6)


def test_numpy_arrays_in_call_and_stateless_call():
    x = RNG.normal(size=(6, 4)).astype("float32")
    ours, theirs = tfbn.BatchNormalization(), keras.layers.BatchNormalization()
    ours.build(x.shape)
    theirs.build(x.shape)
    np.testing.assert_allclose(
        ours.call(x, training=True), theirs.call(x, training=True), rtol=1e-5, atol=1e-5
    )
    # stateless_call with exactly the arguments Keras's layer takes.
    trainable = [v.value for v in theirs.trainable_variables]
    non_trainable = [v.value for v in theirs.non_trainable_variables]
    y_t, state_t = theirs.stateless_call(trainable, non_trainable, x, training=True)
    y_o, state_o = ours.stateless_call(trainable, non_trainable, x, training=True)
    np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-5)
    assert len(state_o) == len(state_t) == 2
    for a, b in zip(state_o, state_t):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [np.int64(-1), np.int32(1), [np.int64(1)]])
def test_numpy_integer_axis(axis):
    layer = tfbn.BatchNormalization(axis=axis)
    layer(np.ones((2, 3), "float32"))
    assert layer.get_config()["axis"] in (-1, 1) and type(layer.get_config()["axis"]) is int


def test_epsilon_zero_is_allowed_and_matches_keras():
    x = RNG.normal(2.0, 3.0, size=(16, 3)).astype("float32")
    ours, theirs = tfbn.BatchNormalization(epsilon=0), keras.layers.BatchNormalization(epsilon=0)
    np.testing.assert_allclose(
        ours(x, training=True), theirs(x, training=True), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-3, "1e-3", True])
def test_bad_epsilon_is_rejected(eps):
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite float >= 0\. Received"):
        tfbn.BatchNormalization(epsilon=eps)
    with pytest.raises(ValueError, match="epsilon"):
        tfbn.FrozenBatchNormalization(epsilon=eps)


# ------------------------------------------------------ one value per channel --


def _one_value_reference(beta=0.5):
    theirs = keras.layers.BatchNormalization(
        momentum=0.5, beta_initializer=keras.initializers.Constant(beta)
    )
    theirs(np.full((1, 3), 2.0, "float32"), training=True)
    return theirs


@pytest.mark.parametrize("fused", ["auto", False])
def test_one_value_per_channel_behaves_as_keras_and_warns_once(fused, caplog):
    theirs = _one_value_reference()
    layer = tfbn.BatchNormalization(
        momentum=0.5, beta_initializer=keras.initializers.Constant(0.5), fused=fused
    )
    x = np.full((1, 3), 2.0, "float32")
    with caplog.at_level(logging.WARNING, logger="tfbn"):
        y = layer(x, training=True)
        layer(x, training=True)
    np.testing.assert_allclose(y, [[0.5] * 3])  # beta
    assert int(layer.num_batches_tracked) == 2
    np.testing.assert_allclose(layer.moving_mean, [1.5] * 3)  # two updates towards 2.0
    assert [r.message.count("one value per channel") for r in caplog.records] == [1]
    other = tfbn.BatchNormalization()
    with caplog.at_level(logging.WARNING, logger="tfbn"):
        other(x, training=True)
    assert len(caplog.records) == 2  # once per layer
    np.testing.assert_allclose(theirs.moving_mean, [1.0] * 3)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_value_per_channel_in_compiled_fit(jit_compile):
    def build(bn):
        model = keras.Sequential([keras.Input((3,)), bn(momentum=0.5)])
        model.compile("sgd", "mse", jit_compile=jit_compile)
        return model

    x = RNG.normal(size=(5, 3)).astype("float32")
    ours, theirs = build(tfbn.BatchNormalization), build(keras.layers.BatchNormalization)
    theirs.set_weights(ours.get_weights())
    for model in (ours, theirs):  # batch_size 2: the last batch has one example
        model.fit(x, x, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert int(ours.layers[0].num_batches_tracked) == 3
    assert int(ours.layers[0].num_single_value_batches) == 1  # counted at run time


def test_inspect_reports_one_value_per_channel_from_a_saved_file(tmp_path):
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(name="bn")])
    model.compile("sgd", "mse")
    x = RNG.normal(size=(5, 3)).astype("float32")
    model.fit(x, x, batch_size=4, epochs=1, verbose=0)  # batches of 4 and 1
    model.save(tmp_path / "m.keras")
    report = tfbn.inspect_model(keras.saving.load_model(tmp_path / "m.keras"))
    assert report.rows[0].flags == ["one_value_per_channel"]
    assert "one value per channel" in report.table()


# ------------------------------------------------------------------ state --


@needs_keras_renorm
def test_variable_lists_are_keras():
    for kwargs in ({}, {"center": False}, {"scale": False, "renorm": True}):
        ours, theirs = tfbn.BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
        ours.build((4, 3))
        theirs.build((4, 3))
        for attr in ("weights", "variables", "trainable_variables", "non_trainable_variables",
                     "trainable_weights", "non_trainable_weights"):  # fmt: skip
            assert [v.path.split("/")[-1] for v in getattr(ours, attr)] == [
                v.path.split("/")[-1] for v in getattr(theirs, attr)
            ], (kwargs, attr)


def test_tfbn_weight_file_loads_into_a_keras_model(tmp_path):
    def build(bn):
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), bn()])

    ours = build(tfbn.BatchNormalization)
    x = RNG.normal(size=(8, 6)).astype("float32")
    ours(x, training=True)
    ours.save_weights(tmp_path / "w.weights.h5")
    theirs = build(keras.layers.BatchNormalization)
    theirs.load_weights(tmp_path / "w.weights.h5")  # was "expected 4 variables, but received 6"
    np.testing.assert_allclose(theirs(x), ours(x), rtol=1e-6)


def test_counters_are_saved_in_keras_files_not_weight_files(tmp_path):
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(momentum=None)])
    x = RNG.normal(size=(4, 3)).astype("float32")
    for _ in range(3):
        model(x, training=True)
    model.layers[0].num_skipped_updates.assign(5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert int(loaded.layers[0].num_batches_tracked) == 3
    assert int(loaded.layers[0].num_skipped_updates) == 5
    # momentum=None keeps averaging with the restored count.
    loaded(x + 4.0, training=True)
    np.testing.assert_allclose(loaded.layers[0].moving_mean, x.mean(0) + 1.0, rtol=1e-5, atol=1e-6)
    model.save_weights(tmp_path / "w.weights.h5")
    fresh = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(momentum=None)])
    fresh.load_weights(tmp_path / "w.weights.h5")
    assert int(fresh.layers[0].num_batches_tracked) == 0


def test_keras_files_without_counter_assets_load(tmp_path):
    """A `.keras` file without the counters' assets (tfbn 0.1 wrote none) loads; counters 0."""
    import zipfile

    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization()])
    model(RNG.normal(size=(4, 3)).astype("float32"), training=True)
    model.save(tmp_path / "m.keras")
    with (
        zipfile.ZipFile(tmp_path / "m.keras") as src,
        zipfile.ZipFile(tmp_path / "old.keras", "w") as dst,
    ):
        for item in src.infolist():
            if not item.filename.startswith("assets"):
                dst.writestr(item, src.read(item.filename))
    loaded = keras.saving.load_model(tmp_path / "old.keras")
    assert int(loaded.layers[0].num_batches_tracked) == 0
    np.testing.assert_array_equal(loaded.layers[0].moving_mean, model.layers[0].moving_mean)


def test_old_tfbn_weight_stores_with_counters_still_load():
    layer = tfbn.BatchNormalization()
    layer.build((2, 3))
    values = [np.full(3, i, "float32") for i in range(1, 5)] + [np.int64(9), np.int64(2)]
    layer.load_own_variables({str(i): v for i, v in enumerate(values)})
    np.testing.assert_array_equal(layer.moving_variance, [4.0] * 3)
    assert int(layer.num_batches_tracked) == 9 and int(layer.num_skipped_updates) == 2


def test_is_an_instance_of_keras_batch_normalization_without_its_call():
    layer = tfbn.BatchNormalization()
    assert isinstance(layer, keras.layers.BatchNormalization)
    assert not isinstance(tfbn.FrozenBatchNormalization(), keras.layers.BatchNormalization)
    for name in ("__init__", "build", "call", "get_config", "compute_output_shape"):
        assert getattr(type(layer), name) is not getattr(keras.layers.BatchNormalization, name), (
            name
        )


# ---------------------------------------------------------------- loading --


@needs_keras_renorm
def test_load_model_turns_keras_bn_into_tfbn(tmp_path):
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(renorm=True)], name="inner"
    )
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9)(h)
    model = keras.Model(inputs, inner(h))
    model.compile("adam", "mse")
    x = RNG.normal(size=(8, 6)).astype("float32")
    model.fit(x, RNG.normal(size=(8, 4)).astype("float32"), verbose=0)
    path = tmp_path / "keras_bn.keras"
    model.save(path)
    ignored = keras.saving.load_model(
        path, custom_objects={"BatchNormalization": tfbn.BatchNormalization}
    )
    assert not any(isinstance(l, tfbn.BatchNormalization) for l in _all_layers(ignored))  # noqa: E741
    loaded = tfbn.load_model(path)
    bns = [l for l in _all_layers(loaded) if isinstance(l, keras.layers.BatchNormalization)]  # noqa: E741
    assert len(bns) == 2 and all(type(b) is tfbn.BatchNormalization for b in bns)
    assert any(b.renorm for b in bns)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()
    with pytest.raises(ValueError, match=r"\.keras"):
        tfbn.load_model(tmp_path / "w.weights.h5")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


# ------------------------------------------------------------ bad-input bugs --


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e20])
@pytest.mark.parametrize(
    "kwargs", [{}, {"fused": False}, {"virtual_batch_size": 2}, {"renorm": True}]
)
def test_masked_out_values_never_enter_the_arithmetic(bad, kwargs):
    x = RNG.normal(size=(4, 5, 2)).astype("float32")
    mask = np.ones((4, 5), bool)
    mask[1, 3] = mask[2, 0] = False
    poisoned = x.copy()
    poisoned[~mask] = bad
    clean, dirty = tfbn.BatchNormalization(**kwargs), tfbn.BatchNormalization(**kwargs)
    x_dirty = tf.constant(poisoned)
    with tf.GradientTape() as tape:
        tape.watch(x_dirty)
        y_dirty = dirty(x_dirty, training=True, mask=mask)
        loss = tf.reduce_sum(tf.boolean_mask(y_dirty, mask))
    grad = tape.gradient(loss, x_dirty)
    y_clean = clean(x, training=True, mask=mask)
    np.testing.assert_allclose(np.asarray(y_dirty)[mask], np.asarray(y_clean)[mask], rtol=1e-5)
    np.testing.assert_allclose(dirty.moving_mean, clean.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(dirty.moving_variance, clean.moving_variance, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()
    assert int(dirty.num_skipped_updates) == 0 and int(dirty.num_batches_tracked) == 1


def test_unsynchronised_replica_with_nan_is_counted_and_left_out():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    assert strategy.num_replicas_in_sync == 4
    with strategy.scope():
        layer = tfbn.BatchNormalization(momentum=0.5)
        layer.build((None, 3))
    shards = [RNG.normal(i, 1.0, size=(4, 3)).astype("float32") for i in range(4)]
    shards[2][1, 0] = np.nan

    @tf.function
    def step(x):
        return layer(x, training=True)

    it = iter(shards)
    strategy.run(
        step, args=(strategy.experimental_distribute_values_from_function(lambda _: next(it)),)
    )
    good = [0, 1, 3]
    expected_mean = np.mean([0.5 * 0 + 0.5 * shards[i].mean(0) for i in good], axis=0)
    expected_var = np.mean([0.5 * 1 + 0.5 * shards[i].var(0) for i in good], axis=0)
    np.testing.assert_allclose(layer.moving_mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, expected_var, rtol=1e-5)
    assert int(layer.num_skipped_updates.numpy()) == 1
    assert int(layer.num_batches_tracked.numpy()) == 1


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_keras_backends_fail_at_import(backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-c", "import tfbn"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "ImportError: tfbn needs Keras's TensorFlow backend" in proc.stderr
    assert f"KERAS_BACKEND='{backend}'" in proc.stderr


def test_large_mean_uses_the_stable_form_on_every_unfused_path():
    """Mean 1e4, std 1 in float32, against float64 with the layer's own float32
    statistics: the unfused training path, ghost BN, unfused inference and FrozenBN
    are within 1e-5 (the folded form `x * scale + offset` is ~1e-3 off here)."""
    x = RNG.normal(1e4, 1.0, size=(512, 4)).astype("float32")
    x64 = x.astype(np.float64)

    def reference(mean, var):
        return (x64 - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + 1e-3)

    for layer in (tfbn.BatchNormalization(fused=False, momentum=0.0),
                  tfbn.BatchNormalization(virtual_batch_size=512, momentum=0.0)):  # fmt: skip
        y = layer(x, training=True)  # momentum 0: the moving statistics are the batch's
        np.testing.assert_allclose(
            y, reference(layer.moving_mean, layer.moving_variance), atol=1e-5
        )
    mean, var = x64.mean(0).astype("float32"), x64.var(0).astype("float32")
    for layer in (tfbn.FrozenBatchNormalization(), tfbn.BatchNormalization(fused=False)):
        layer.build(x.shape)
        layer.set_weights([np.ones(4, "float32"), np.zeros(4, "float32"), mean, var])
        np.testing.assert_allclose(layer(x, training=False), reference(mean, var), atol=1e-5)


# -------------------------------------------------------------- GPU epsilon --


def test_epsilon_below_cudnn_floor_never_uses_the_fused_kernel():
    small = tfbn.BatchNormalization(epsilon=1e-6)
    small.build((4, 3))
    assert small._fused_format is None
    at_floor = tfbn.BatchNormalization(epsilon=1.001e-5)
    at_floor.build((4, 3))
    assert at_floor._fused_format == "NHWC"
    with pytest.raises(ValueError, match=r"epsilon >= 1\.001e-05"):
        tfbn.BatchNormalization(epsilon=1e-6, fused=True).build((4, 3))
    x = RNG.normal(size=(8, 3)).astype("float32")
    unfused = tfbn.BatchNormalization(epsilon=1e-6, fused=False)
    np.testing.assert_array_equal(small(x, training=True), unfused(x, training=True))
