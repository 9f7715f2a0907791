"""Batch renormalization: tfbn.BatchNormalization(renorm=True) against Keras's layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_helpers import needs_keras_renorm

import tfbn

RNG = np.random.default_rng(7)
RENORM_STATE = ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
KERAS_NAMES = ["gamma", "beta"] + RENORM_STATE[:2] + RENORM_STATE[2:]


def _pair(shape, fused="auto", **kwargs):
    """A Keras and a tfbn renorm layer, built, with the same random non-default state."""
    theirs = keras.layers.BatchNormalization(renorm=True, **kwargs)
    ours = tfbn.BatchNormalization(renorm=True, fused=fused, **kwargs)
    theirs.build(shape)
    ours.build(shape)
    channels = theirs.moving_mean.shape[0]
    weights = [
        RNG.uniform(0.5, 1.5, channels), RNG.normal(size=channels),  # gamma, beta
        RNG.normal(size=channels), RNG.uniform(0.5, 2.0, channels),  # moving mean / var
        RNG.uniform(0.5, 2.0, channels), RNG.normal(size=channels),  # moving_stddev, renorm_mean
        RNG.uniform(0.5, 2.0, channels),  # renorm_stddev
    ]  # fmt: skip
    theirs.set_weights([w.astype("float32") for w in weights])
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def _step(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.cos(y))  # a non-trivial upstream gradient
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return y, grads


CASES = [
    ((16, 5), -1, {}, "auto"),
    ((16, 5), -1, {}, False),
    ((4, 6, 6, 3), -1, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, "auto"),
    ((4, 6, 6, 3), -1, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, False),
    ((4, 3, 5, 5), 1, {"rmax": 2.0}, "auto"),
    ((4, 7, 3), -1, {"dmax": 0.1}, "auto"),
]


@needs_keras_renorm
@pytest.mark.parametrize("shape,axis,clipping,fused", CASES)
def test_outputs_gradients_and_all_state_match_keras_over_steps(shape, axis, clipping, fused):
    theirs, ours = _pair(shape, fused=fused, axis=axis, momentum=0.9, renorm_momentum=0.8,
                         renorm_clipping=clipping)  # fmt: skip
    assert (ours._fused_format is not None) == (fused == "auto")
    for step in range(4):
        x = tf.constant(RNG.normal(2.0 + step, 1.0 + step, size=shape).astype("float32"))
        y_theirs, g_theirs = _step(theirs, x)
        y_ours, g_ours = _step(ours, x)
        np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=2e-5)
        for a, b in zip(g_ours, g_theirs):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        for name in RENORM_STATE:
            np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name),
                                       rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
    x = RNG.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        ours(x, training=False), theirs(x, training=False), rtol=1e-5, atol=1e-5
    )


def test_corrections_are_clipped_and_change_the_output():
    """Guards the comparison above: renorm differs from plain BN once the renorm
    statistics are off, and clipping bounds it."""
    x = RNG.normal(3.0, 2.0, size=(32, 4)).astype("float32")
    plain = tfbn.BatchNormalization(center=False, scale=False)(x, training=True)
    layer = tfbn.BatchNormalization(renorm=True, center=False, scale=False,
                                    renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.25})  # fmt: skip
    y = layer(x, training=True)  # renorm_mean 0, renorm_stddev 1: d = mean > dmax
    np.testing.assert_allclose(y, np.asarray(plain) + 0.25, rtol=1e-5, atol=1e-5)


@needs_keras_renorm
def test_variables_names_order_and_lists_are_keras():
    theirs, ours = _pair((8, 3))
    for attr in ("weights", "variables", "trainable_variables", "non_trainable_variables"):
        assert [v.path.split("/")[-1] for v in getattr(ours, attr)] == [
            v.path.split("/")[-1] for v in getattr(theirs, attr)
        ], attr
    assert [v.path.split("/")[-1] for v in ours.weights] == KERAS_NAMES


def test_stddev_initializers_are_square_roots():
    layer = tfbn.BatchNormalization(
        renorm=True, moving_variance_initializer=keras.initializers.Constant(9.0)
    )
    layer.build((None, 2))
    np.testing.assert_allclose(layer.moving_stddev, [3.0, 3.0])
    np.testing.assert_allclose(layer.renorm_stddev, [3.0, 3.0])


@needs_keras_renorm
def test_configs_load_both_ways():
    theirs = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.9
    )
    ours = tfbn.BatchNormalization.from_config(theirs.get_config())
    assert ours.renorm and ours.renorm_clipping == {"rmax": 3.0} and ours.renorm_momentum == 0.9
    back = keras.layers.BatchNormalization.from_config(ours.keras_config())
    assert back.get_config() == theirs.get_config()
    with pytest.raises(ValueError, match="virtual_batch_size"):
        tfbn.BatchNormalization(virtual_batch_size=2).keras_config()


@needs_keras_renorm
@pytest.mark.parametrize("direction", ["keras_to_tfbn", "tfbn_to_keras"])
def test_weight_files_load_both_ways(tmp_path, direction):
    def build(bn):
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), bn(renorm=True)])

    src_bn, dst_bn = (keras.layers.BatchNormalization, tfbn.BatchNormalization)
    if direction == "tfbn_to_keras":
        src_bn, dst_bn = dst_bn, src_bn
    src, dst = build(src_bn), build(dst_bn)
    x = RNG.normal(1.0, 2.0, size=(16, 6)).astype("float32")
    for _ in range(3):
        src(x, training=True)
    src.save_weights(tmp_path / "w.weights.h5")
    dst.load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(dst.get_weights(), src.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(dst(x, training=True), src(x, training=True), rtol=1e-5, atol=1e-5)


def test_validation_is_keras():
    with pytest.raises(ValueError, match="Received invalid keys"):
        tfbn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.0, "x": 1})
    with pytest.raises(ValueError, match="rmax should be"):
        tfbn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 1.0})
    with pytest.raises(ValueError, match="dmax should be non-negative"):
        tfbn.BatchNormalization(renorm=True, renorm_clipping={"dmax": -1.0})
    with pytest.raises(ValueError, match="renorm_clipping\\['rmax'\\]"):
        tfbn.BatchNormalization(renorm=True, renorm_clipping={"rmax": "big"})
    with pytest.raises(ValueError, match="renorm_momentum"):
        tfbn.BatchNormalization(renorm=True, renorm_momentum=1.5)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        tfbn.BatchNormalization(renorm=True, virtual_batch_size=2)
    # As Keras: without renorm, renorm_clipping is stored, not validated.
    assert tfbn.BatchNormalization(renorm_clipping={"x": 1}).renorm_clipping == {"x": 1}


def test_nonfinite_batch_leaves_all_renorm_state_unchanged():
    layer = tfbn.BatchNormalization(renorm=True)
    x = RNG.normal(size=(8, 3)).astype("float32")
    layer(x, training=True)
    before = [np.array(w) for w in layer.weights]
    x[1, 2] = np.inf
    layer(x, training=True)
    for a, b in zip(layer.weights, before):
        np.testing.assert_array_equal(a, b)
    assert int(layer.num_skipped_updates) == 1


def test_synchronized_renorm_on_4_replicas_equals_one_device():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    assert strategy.num_replicas_in_sync == 4
    shape, momentum = (16, 6, 3), dict(momentum=0.8, renorm_momentum=0.7)
    clipping = {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}
    with strategy.scope():
        synced = tfbn.BatchNormalization(
            renorm=True, synchronized=True, renorm_clipping=clipping, **momentum
        )
        synced.build(shape)
    single = tfbn.BatchNormalization(renorm=True, renorm_clipping=clipping, **momentum)
    single.build(shape)

    @tf.function
    def replica_step(x):
        assert tf.distribute.get_replica_context().num_replicas_in_sync == 4
        y, (dx, dgamma, dbeta) = _step(synced, x)
        ctx = tf.distribute.get_replica_context()
        return y, dx, ctx.all_reduce("sum", dgamma), ctx.all_reduce("sum", dbeta)

    for step in range(3):
        x = RNG.normal(1.0 + step, 2.0, size=shape).astype("float32")
        shards = np.split(x, 4)
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx, shards=shards: shards[ctx.replica_id_in_sync_group]
        )
        y, dx, dgamma, dbeta = strategy.run(replica_step, args=(per_replica,))
        y_single, (dx_single, dgamma_single, dbeta_single) = _step(single, tf.constant(x))
        np.testing.assert_allclose(strategy.gather(y, axis=0), y_single, rtol=1e-5, atol=1e-5)
        # The input gradient flows through the global statistics (an all-reduce).
        np.testing.assert_allclose(strategy.gather(dx, axis=0), dx_single, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dgamma.values[0], dgamma_single, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbeta.values[0], dbeta_single, rtol=1e-4, atol=1e-4)
        for name in RENORM_STATE:
            np.testing.assert_allclose(getattr(synced, name), getattr(single, name),
                                       rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip


def test_fold_and_freeze_use_the_moving_statistics():
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3),
                              tfbn.BatchNormalization(renorm=True), keras.layers.Flatten()])  # fmt: skip
    x = RNG.normal(2.0, 3.0, size=(8, 5, 5, 2)).astype("float32")
    for _ in range(3):
        model(x, training=True)
    expected = model(x, training=False)
    np.testing.assert_allclose(tfbn.fold_batch_norm(model)(x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tfbn.freeze_batch_norm(model)(x), expected, rtol=1e-5, atol=1e-5)


@needs_keras_renorm
def test_keras_renorm_layers_convert():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(renorm=True, renorm_momentum=0.5)]
    )
    x = RNG.normal(size=(8, 4)).astype("float32")
    model(x, training=True)
    converted = tfbn.convert_sync_batch_norm(model)
    bn = converted.layers[0]
    assert isinstance(bn, tfbn.BatchNormalization) and bn.renorm and bn.renorm_momentum == 0.5
    np.testing.assert_allclose(
        converted(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-5
    )


def test_recalibration_keeps_the_renorm_state_consistent():
    layer = tfbn.BatchNormalization(renorm=True, epsilon=1e-2)
    model = keras.Sequential([keras.Input((3,)), layer])
    data = [RNG.normal(4.0, 3.0, size=(32, 3)).astype("float32") for _ in range(3)]
    tfbn.recalibrate(model, data, progress=False)
    allx = np.concatenate(data).astype(np.float64)
    np.testing.assert_allclose(layer.moving_variance, allx.var(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_stddev, np.sqrt(allx.var(0) + 1e-2), rtol=1e-5)
    np.testing.assert_allclose(layer.renorm_mean, allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.renorm_stddev, np.sqrt(allx.var(0) + 1e-2), rtol=1e-5)


def test_momentum_schedule_drives_the_inference_statistics_only():
    layer = tfbn.BatchNormalization(renorm=True, momentum=0.0, renorm_momentum=1.0)
    x = RNG.normal(5.0, 1.0, size=(16, 2)).astype("float32")
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, x.mean(0), rtol=1e-5)  # momentum 0: batch's
    np.testing.assert_allclose(layer.renorm_mean, 0.0)  # renorm_momentum 1: unchanged
    layer.momentum = 1.0  # what a schedule does
    layer(x + 10.0, training=True)
    np.testing.assert_allclose(layer.moving_mean, x.mean(0), rtol=1e-5)


def test_freeze_and_unfreeze_round_trip_a_renorm_layer():
    model = keras.Sequential(
        [keras.Input((4,)), tfbn.BatchNormalization(renorm=True, epsilon=1e-2)]
    )
    x = RNG.normal(3.0, 2.0, size=(16, 4)).astype("float32")
    for _ in range(3):
        model(x, training=True)
    back = tfbn.unfreeze_batch_norm(tfbn.freeze_batch_norm(model))
    bn, orig = back.layers[0], model.layers[0]
    assert bn.renorm
    np.testing.assert_allclose(
        back(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        bn.moving_stddev, np.sqrt(np.asarray(orig.moving_variance) + 1e-2), rtol=1e-5
    )
