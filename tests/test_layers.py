"""tfbn.BatchNormalization against a float64 NumPy reference and against Keras's own layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn

RNG = np.random.default_rng(42)
EPS = 1e-3


def reference_bn(x, channel_axes, gamma, beta, mean=None, var=None, eps=EPS):
    """float64 BatchNorm; batch statistics when mean/var are None. Returns (y, mean, var)."""
    x = np.asarray(x, np.float64)
    reduce = tuple(a for a in range(x.ndim) if a not in channel_axes)
    if mean is None:
        mean, var = x.mean(reduce), x.var(reduce)
    shape = [x.shape[a] if a in channel_axes else 1 for a in range(x.ndim)]
    r = lambda v: np.reshape(np.asarray(v, np.float64), shape)  # noqa: E731
    y = (x - r(mean)) / np.sqrt(r(var) + eps) * r(gamma) + r(beta)
    return y, mean, var


def random_weights(channels):
    gamma = RNG.uniform(0.5, 1.5, channels).astype("float32")
    beta = RNG.normal(size=channels).astype("float32")
    mean = RNG.normal(size=channels).astype("float32")
    var = RNG.uniform(0.5, 2.0, channels).astype("float32")
    return [gamma, beta, mean, var]


SHAPES = {2: (16, 6), 3: (4, 7, 6), 4: (3, 5, 4, 6), 5: (2, 3, 4, 5, 6)}
POLICY_TOL = {"float32": 1e-5, "mixed_float16": 3e-3, "mixed_bfloat16": 2e-2}


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


# Channels-last for ranks 2-5 and channels-first for ranks 3-5 (for rank 2 they coincide).
RANK_AXIS = [(r, -1) for r in (2, 3, 4, 5)] + [(r, 1) for r in (3, 4, 5)]


@pytest.mark.parametrize("policy", list(POLICY_TOL), indirect=True)
@pytest.mark.parametrize("rank,axis", RANK_AXIS)
@pytest.mark.parametrize("momentum,convention", [(0.9, "keras"), (0.1, "pytorch")])
def test_against_float64_reference(policy, rank, axis, momentum, convention):
    shape = SHAPES[rank] if axis == -1 else (SHAPES[rank][0], 6) + SHAPES[rank][1:-1]
    caxis = axis % rank
    x = RNG.normal(3.0, 2.0, size=shape).astype("float32")
    layer = tfbn.BatchNormalization(axis=axis, momentum=momentum, momentum_convention=convention)
    layer.build(shape)
    weights = random_weights(6)
    layer.set_weights(weights)
    tol = POLICY_TOL[policy]
    x_seen = tf.cast(tf.cast(x, layer.compute_dtype), tf.float64).numpy()  # after autocast

    y = layer(x, training=True)
    assert y.dtype == layer.compute_dtype
    want, bmean, bvar = reference_bn(x_seen, (caxis,), weights[0], weights[1])
    np.testing.assert_allclose(tf.cast(y, tf.float64), want, rtol=tol, atol=tol * 4)
    keep = momentum if convention == "keras" else 1 - momentum
    np.testing.assert_allclose(
        layer.moving_mean, keep * weights[2] + (1 - keep) * bmean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        layer.moving_variance, keep * weights[3] + (1 - keep) * bvar, rtol=1e-5, atol=1e-6
    )
    assert layer.moving_mean.dtype == "float32" and layer.gamma.dtype == "float32"

    y = layer(x, training=False)
    want, _, _ = reference_bn(
        x_seen,
        (caxis,),
        weights[0],
        weights[1],
        layer.moving_mean.numpy(),
        layer.moving_variance.numpy(),
    )
    np.testing.assert_allclose(tf.cast(y, tf.float64), want, rtol=tol, atol=tol * 4)


def _train_steps(layer, xs, upstream):
    """Runs training steps; returns outputs and gradients (x, gamma, beta) of each."""
    results = []
    for x in xs:
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y.numpy()] + [g.numpy() for g in grads])
    return results


@pytest.mark.parametrize(
    "shape,axis", [((32, 8), -1), ((4, 5, 6, 8), -1), ((4, 8, 5, 6), 1), ((2, 3, 4, 5, 8), -1)]
)
def test_matches_keras_layer_over_training_steps(shape, axis):
    weights = random_weights(8)
    xs = [RNG.normal(1.0, 2.0, size=shape).astype("float32") for _ in range(3)]
    upstream = tf.constant(RNG.normal(size=shape).astype("float32"))
    ours, theirs = tfbn.BatchNormalization(axis=axis), keras.layers.BatchNormalization(axis=axis)
    for layer in (ours, theirs):
        layer.build(shape)
        layer.set_weights(weights)
    for got, want in zip(_train_steps(ours, xs, upstream), _train_steps(theirs, xs, upstream)):
        for g, w in zip(got, want):  # outputs, input/gamma/beta gradients, relative to scale
            assert np.max(np.abs(g - w)) <= 1e-5 * np.abs(w).max()
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(xs[0]), theirs(xs[0]), rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((64, 16), -1),
        ((8, 6, 16), -1),
        ((4, 5, 6, 16), -1),
        ((4, 16, 5, 6), 1),
        ((2, 3, 4, 5, 16), -1),
        ((2, 16, 3, 4, 5), 1),
    ],
)
def test_fused_and_unfused_agree(shape, axis):
    weights = random_weights(16)
    xs = [RNG.normal(0.5, 3.0, size=shape).astype("float32") for _ in range(2)]
    upstream = tf.constant(RNG.normal(size=shape).astype("float32"))
    fused, plain = (
        tfbn.BatchNormalization(axis=axis, fused=True),
        tfbn.BatchNormalization(axis=axis, fused=False),
    )
    for layer in (fused, plain):
        layer.build(shape)
        layer.set_weights(weights)
    assert fused._fused_format is not None and plain._fused_format is None
    for got, want in zip(_train_steps(fused, xs, upstream), _train_steps(plain, xs, upstream)):
        for g, w in zip(got, want):  # relative to each tensor's scale
            assert np.max(np.abs(g - w)) <= 1e-5 * np.abs(w).max()
    for a, b in zip(fused.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(fused(xs[0]), plain(xs[0]), rtol=1e-5, atol=1e-5)


def test_fused_auto_choice():
    assert tfbn.BatchNormalization()._fused_data_format  # sanity: method exists
    for axis, shape, expect in [
        (-1, (2, 3, 4), "NHWC"),
        (1, (2, 3, 4, 5), "NCHW"),
        (2, (2, 3, 4, 5), None),
        ([1, 3], (2, 3, 4, 5), None),
    ]:
        layer = tfbn.BatchNormalization(axis=axis)
        layer.build(shape)
        assert layer._fused_format == expect, (axis, shape)
    ghost = tfbn.BatchNormalization(virtual_batch_size=2)
    ghost.build((4, 3))
    assert ghost._fused_format is None
    with pytest.raises(ValueError, match="fused=True"):
        tfbn.BatchNormalization(axis=2, fused=True).build((2, 3, 4, 5))


def test_worked_example():
    layer = tfbn.BatchNormalization(epsilon=1e-5)
    layer.build((4, 1))
    layer.set_weights([np.array([2.0]), np.array([1.0]), np.zeros(1), np.ones(1)])
    y = layer(np.array([[2.0], [4.0], [6.0], [8.0]], "float32"), training=True)
    np.testing.assert_allclose(y.numpy()[:, 0], [-1.683, 0.106, 1.894, 3.683], atol=5e-4)


def test_inference_is_deterministic_and_batch_size_invariant():
    layer = tfbn.BatchNormalization()
    x = RNG.normal(size=(64, 5, 5, 8)).astype("float32")
    layer(x, training=True)
    full = layer(x, training=False).numpy()
    singles = np.concatenate([layer(x[i : i + 1], training=False).numpy() for i in range(64)])
    assert np.max(np.abs(full - singles)) < 1e-6
    np.testing.assert_array_equal(full, layer(x, training=False).numpy())


def test_axis_list_normalises_per_channel_pair():
    x = RNG.normal(size=(5, 3, 4, 2)).astype("float32")
    layer = tfbn.BatchNormalization(axis=[1, 3])
    y = layer(x, training=True)
    assert layer.moving_mean.shape == (3, 2)
    want, mean, _ = reference_bn(x, (1, 3), np.ones((3, 2)), np.zeros((3, 2)))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, 0.01 * mean, rtol=1e-5, atol=1e-7)
    assert layer.get_config()["axis"] == [1, 3]


def test_cumulative_average_and_num_batches_tracked():
    layer = tfbn.BatchNormalization(momentum=None)
    batches = [RNG.normal(i, 1.0 + i, size=(10, 3)).astype("float32") for i in range(4)]
    for x in batches:
        layer(x, training=True)
    assert int(layer.num_batches_tracked) == 4
    np.testing.assert_allclose(
        layer.moving_mean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance, np.mean([b.var(0) for b in batches], 0), rtol=1e-5
    )


def test_unbiased_estimator_stores_bessel_corrected_variance():
    x = RNG.normal(size=(5, 4)).astype("float32")
    layer = tfbn.BatchNormalization(momentum=0.0, moving_variance_estimator="unbiased")
    y = layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance, x.astype("float64").var(0, ddof=1), rtol=1e-5)
    want, _, _ = reference_bn(x, (1,), np.ones(4), np.zeros(4))  # normalisation stays biased
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_track_running_stats_false_always_uses_batch_statistics():
    x = RNG.normal(4.0, 2.0, size=(8, 3)).astype("float32")
    layer = tfbn.BatchNormalization(track_running_stats=False)
    y_train, y_infer = layer(x, training=True), layer(x, training=False)
    want, _, _ = reference_bn(x, (1,), np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y_train, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_infer, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean, 0)
    np.testing.assert_array_equal(layer.moving_variance, 1)


def test_virtual_batch_size_normalises_each_ghost_batch():
    x = RNG.normal(size=(8, 3, 4)).astype("float32")
    layer = tfbn.BatchNormalization(virtual_batch_size=4, momentum=0.0)
    y = layer(x, training=True).numpy()
    ghosts = [reference_bn(x[i : i + 4], (2,), np.ones(4), np.zeros(4)) for i in (0, 4)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in ghosts]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_mean, np.mean([g[1] for g in ghosts], 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(layer.moving_variance, np.mean([g[2] for g in ghosts], 0), rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of virtual_batch_size"):
        layer(x[:6], training=True)


def test_mask_excludes_positions_from_statistics():
    x = RNG.normal(size=(4, 5, 3)).astype("float32")
    mask = RNG.uniform(size=(4, 5)) > 0.4
    layer = tfbn.BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=tf.constant(mask))
    kept = x[mask].astype("float64")
    np.testing.assert_allclose(layer.moving_mean, kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, kept.var(0), rtol=1e-5)
    want = (x - kept.mean(0)) / np.sqrt(kept.var(0) + EPS)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one dimension less"):
        layer(x, training=True, mask=tf.constant(mask[..., None]))


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_batch_skips_update_and_is_counted(fused):
    layer = tfbn.BatchNormalization(fused=fused)
    x = RNG.normal(size=(6, 3)).astype("float32")
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    bad = x.copy()
    bad[2, 1] = np.nan
    layer(bad, training=True)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert int(layer.num_skipped_updates) == 1 and int(layer.num_batches_tracked) == 1
    unguarded = tfbn.BatchNormalization(skip_nonfinite_updates=False, fused=fused)
    unguarded(bad, training=True)
    assert np.isnan(unguarded.moving_mean.numpy()[1])


def test_trainable_false_means_inference_mode():
    layer = tfbn.BatchNormalization()
    x = RNG.normal(3.0, 1.0, size=(8, 3)).astype("float32")
    layer.build(x.shape)
    layer.trainable = False
    y = layer(x, training=True)
    np.testing.assert_allclose(y, layer(x, training=False))
    np.testing.assert_array_equal(layer.moving_mean, 0)
    assert int(layer.num_batches_tracked) == 0


def test_weights_move_between_keras_and_tfbn():
    shape = (4, 5, 6)
    ours, theirs = tfbn.BatchNormalization(), keras.layers.BatchNormalization()
    ours.build(shape)
    theirs.build(shape)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    weights = random_weights(6)
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())
    theirs.set_weights(ours.get_weights())
    x = RNG.normal(size=shape).astype("float32")
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)

    # Whole models too: same weight lists, layer by layer.
    def build(bn):
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4), bn(), keras.layers.Dense(2)]
        )

    km, tm = build(keras.layers.BatchNormalization), build(tfbn.BatchNormalization)
    tm.set_weights(km.get_weights())
    km.set_weights(tm.get_weights())


def test_mixed_precision_keeps_float32_statistics():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = tfbn.BatchNormalization()
        x = RNG.normal(100.0, 1.0, size=(32, 4)).astype("float32")
        y = layer(x, training=True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert y.dtype == "float16"
    assert all(w.dtype == "float32" for w in layer.weights)
    np.testing.assert_allclose(
        layer.moving_mean, 0.01 * x.astype("float16").astype("float64").mean(0), rtol=1e-3
    )


def test_serialization_and_keras_file_roundtrip(tmp_path):
    layer = tfbn.BatchNormalization(
        axis=[1, 2],
        momentum=None,
        moving_variance_estimator="unbiased",
        virtual_batch_size=2,
        fused=False,
        epsilon=1e-4,
    )
    clone = tfbn.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (
        keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == layer.get_config()
    )

    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(3, 3),
            tfbn.BatchNormalization(),
            keras.layers.Flatten(),
        ]
    )
    model.compile("sgd", "mse")
    x = RNG.normal(size=(8, 5, 5, 2)).astype("float32")
    model.fit(x, RNG.normal(size=(8, 27)).astype("float32"), epochs=2, batch_size=4, verbose=0)
    bn = model.layers[1]
    bn.num_skipped_updates.assign(7)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    lbn = loaded.layers[1]
    assert isinstance(lbn, tfbn.BatchNormalization)
    assert int(lbn.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    assert int(lbn.num_skipped_updates) == 7
    for a, b in zip(lbn.get_weights(), bn.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_loads_weights_saved_from_a_keras_model(tmp_path):
    build = lambda bn: keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), bn()])  # noqa: E731
    km = build(keras.layers.BatchNormalization)
    km.layers[1].set_weights(random_weights(4))
    km.save_weights(tmp_path / "w.weights.h5")
    tm = build(tfbn.BatchNormalization)
    tm.load_weights(tmp_path / "w.weights.h5")
    x = RNG.normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(tm(x), km(x), rtol=1e-5)


# ------------------------------------------------------------------ bad input --


@pytest.mark.parametrize("axis", [4, -5, 0])
def test_axis_out_of_range_names_the_shape(axis):
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
        tfbn.BatchNormalization(axis=axis).build((2, 3, 4, 5))


def test_bad_constructor_arguments():
    for kwargs, name in [
        ({"axis": "x"}, "axis"),
        ({"axis": [1, 1]}, "axis"),
        ({"momentum": 2.0}, "momentum"),
        ({"moving_variance_estimator": "x"}, "moving_variance_estimator"),
        ({"fused": "yes"}, "fused"),
        ({"virtual_batch_size": 0}, "virtual_batch_size"),
        ({"momentum": True}, "momentum"),
        ({"virtual_batch_size": True}, "virtual_batch_size"),
        ({"sync_group_size": True}, "sync_group_size"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"epsilon": -1e-3}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"fused": 1}, "fused"),
        ({"momentum_convention": "x"}, "momentum_convention"),
    ]:
        with pytest.raises(ValueError, match=name):
            tfbn.BatchNormalization(**kwargs)


def test_unknown_channel_dimension():
    with pytest.raises(ValueError, match=r"\(None, 4, None\)"):
        tfbn.BatchNormalization().build((None, 4, None))


def test_rank_change_after_build():
    layer = tfbn.BatchNormalization()
    layer(tf.ones([2, 3, 4]))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        layer(tf.ones([2, 4]))


@pytest.mark.parametrize("fused", [True, False])
def test_empty_batch(fused):
    layer = tfbn.BatchNormalization(fused=fused)
    layer(RNG.normal(size=(4, 3)).astype("float32"), training=True)
    before = layer.get_weights()
    y = layer(tf.zeros([0, 3]), training=True)
    assert y.shape == (0, 3)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_skipped_updates) == 0
