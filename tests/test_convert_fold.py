"""freeze_batch_norm / unfreeze_batch_norm / fold_batch_norm and FrozenBatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_helpers import randomize_statistics

import tfbn
from tfbn.convert import (
    find_fold_pairs,
    fold_batch_norm,
    freeze_batch_norm,
    is_batch_norm,
    unfreeze_batch_norm,
)
from tfbn.layers import FrozenBatchNormalization
from tfbn.layers.frozen_batch_norm import FoldedBatchNormalization

RTOL = 1e-5  # the bound: max |folded - model(x, training=False)| / max |...|


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def layer_types(model):
    return [type(layer) for layer in model._flatten_layers(include_self=False, recursive=True)]


def sample(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


BN_CLASSES = [keras.layers.BatchNormalization, tfbn.BatchNormalization]

# (name, input shape, producer factory, BN axis)
PRODUCERS = [
    ("conv1d", (16, 3), lambda: keras.layers.Conv1D(5, 3), -1),
    ("conv2d_no_bias", (8, 8, 3), lambda: keras.layers.Conv2D(5, 3, use_bias=False), -1),
    ("conv2d_groups", (8, 8, 4), lambda: keras.layers.Conv2D(6, 3, groups=2), -1),
    ("conv3d", (6, 6, 6, 2), lambda: keras.layers.Conv3D(4, 3), -1),
    ("conv2d_channels_first", (3, 8, 8),
     lambda: keras.layers.Conv2D(5, 3, data_format="channels_first"), 1),
    ("depthwise2d", (8, 8, 3), lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), -1),
    ("depthwise1d", (16, 3), lambda: keras.layers.DepthwiseConv1D(3, use_bias=False), -1),
    ("separable2d", (8, 8, 3),
     lambda: keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same"), -1),
    ("separable1d", (16, 3), lambda: keras.layers.SeparableConv1D(4, 3, use_bias=False), -1),
    ("dense", (7,), lambda: keras.layers.Dense(5), -1),
    ("dense_3d_input", (4, 7), lambda: keras.layers.Dense(5, use_bias=False), -1),
    # Transposed kernels are (..., out, in): the fold scales axis -2, not -1.
    ("conv1d_transpose", (9, 3), lambda: keras.layers.Conv1DTranspose(5, 3, strides=2), -1),
    ("conv2d_transpose", (6, 6, 2), lambda: keras.layers.Conv2DTranspose(3, 3, use_bias=False), -1),
    ("conv2d_transpose_channels_first", (2, 6, 6),
     lambda: keras.layers.Conv2DTranspose(4, 3, strides=2, data_format="channels_first"), 1),
    ("conv3d_transpose", (4, 4, 4, 3), lambda: keras.layers.Conv3DTranspose(2, 2), -1),
]  # fmt: skip


@pytest.mark.parametrize("bn_class", BN_CLASSES, ids=["keras_bn", "tfbn_bn"])
@pytest.mark.parametrize("name,shape,make,axis", PRODUCERS, ids=[p[0] for p in PRODUCERS])
def test_fold_each_producer_matches_inference(bn_class, name, shape, make, axis):
    inputs = keras.Input(shape)
    outputs = bn_class(axis=axis, epsilon=1e-3)(make()(inputs))
    model = randomize_statistics(keras.Model(inputs, outputs))
    x = sample((4, *shape))
    folded, report = fold_batch_norm(model, return_report=True)
    assert len(report.folded) == 1 and not report.frozen
    types = layer_types(folded)
    assert FoldedBatchNormalization in types
    assert not any(issubclass(t, (*BN_CLASSES, FrozenBatchNormalization)) for t in types)
    want = model(x, training=False)
    assert rel_error(folded(x, training=False), want) < RTOL
    # Folded means no batch statistics at all, even when asked for training.
    assert rel_error(folded(x, training=True), want) < RTOL
    # The original is untouched.
    assert sum(is_batch_norm(layer) for layer in model.layers) == 1


def test_fold_sequential_functional_nested_and_report():
    inner = keras.Sequential(
        [keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 1), keras.layers.BatchNormalization()],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    x = inner(x)
    x = keras.layers.BatchNormalization(name="after_inner")(x)  # producer is a model: frozen
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = tfbn.BatchNormalization(name="head_bn")(keras.layers.Dense(3, name="head")(x))
    model = randomize_statistics(keras.Model(inputs, outputs))
    x = sample((5, 8, 8, 3))
    folded, report = fold_batch_norm(model, return_report=True)
    inner_pair = (inner.layers[1].name, inner.layers[0].name)
    assert sorted(report.folded) == sorted([("stem_bn", "stem"), inner_pair, ("head_bn", "head")])
    assert report.frozen == ["after_inner"]
    assert not report.nothing_folded and "folded 3" in str(report)
    assert folded.output_names == ["head_bn"]  # the output keeps its name
    assert rel_error(folded(x), model(x, training=False)) < RTOL

    seq = randomize_statistics(
        keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(6),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.BatchNormalization(),
            ]  # fmt: skip
        )
    )
    folded_seq, report = fold_batch_norm(seq, return_report=True)
    assert len(report.folded) == 1 and len(report.frozen) == 1
    xs = sample((3, 10))
    assert rel_error(folded_seq(xs), seq(xs, training=False)) < RTOL


def _branch_model():
    """Conv feeding BN and a second consumer: the BN must not be folded."""
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(3, 1)(inputs)
    bn = keras.layers.BatchNormalization()(conv)
    return keras.Model(inputs, keras.layers.Add()([bn, conv]))


def _activation_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 1, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.BatchNormalization()(x))


def _wrong_axis_model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(6, 1)(inputs)  # channels last; BN on axis 1 (height)
    return keras.Model(inputs, keras.layers.BatchNormalization(axis=1)(x))


def _shared_conv_model():
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(2, 1)
    x = keras.layers.BatchNormalization()(conv(inputs))
    return keras.Model(inputs, conv(x))  # conv called twice


@pytest.mark.parametrize(
    "build",
    [
        _branch_model,
        _activation_model,
        _wrong_axis_model,
        _shared_conv_model,
    ],  # fmt: skip
)
def test_unfoldable_batch_norm_becomes_frozen(build):
    model = randomize_statistics(build())
    assert find_fold_pairs(model) == []
    folded, report = fold_batch_norm(model, return_report=True)
    assert report.folded == [] and len(report.frozen) == 1
    assert FrozenBatchNormalization in layer_types(folded)
    x = sample((3, *model.inputs[0].shape[1:]))
    assert rel_error(folded(x, training=True), model(x, training=False)) < RTOL


def test_transposed_kernel_needs_its_own_fold_rule():
    """With as many input as output channels a Conv2DTranspose kernel scaled like a
    Conv2D kernel (along its last axis) has the right shape but folds wrong: the
    table's rule for transposed kernels is what makes the fold right."""
    from tfbn import graph

    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2DTranspose(3, 3)
    model = randomize_statistics(
        keras.Model(inputs, keras.layers.BatchNormalization()(conv(inputs)))
    )
    assert (
        graph.fold_rule(conv).scale_kernel
        is graph.PRODUCERS[keras.layers.Conv2DTranspose].scale_kernel
    )
    x = sample((2, 6, 6, 3))
    assert rel_error(fold_batch_norm(model)(x), model(x, training=False)) < RTOL
    original = graph.PRODUCERS[keras.layers.Conv2DTranspose]
    graph.PRODUCERS[keras.layers.Conv2DTranspose] = graph.PRODUCERS[keras.layers.Conv2D]
    try:
        wrong = fold_batch_norm(model)
    finally:
        graph.PRODUCERS[keras.layers.Conv2DTranspose] = original
    assert rel_error(wrong(x), model(x, training=False)) > 1e-2


def test_fold_model_without_batch_norm_says_nothing_folded():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    folded, report = fold_batch_norm(model, return_report=True)
    assert report.nothing_folded and report.frozen == []
    assert str(report).startswith("nothing folded")
    x = sample((2, 4))
    np.testing.assert_array_equal(folded(x), model(x))


def test_fold_rejects_bad_models():
    with pytest.raises(ValueError, match="not built"):
        fold_batch_norm(
            keras.Sequential([keras.layers.Dense(2), keras.layers.BatchNormalization()])
        )

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    sub = Sub()
    sub(np.zeros((2, 3), "float32"))
    # A subclassed model has no known graph: nothing folds, every BN is frozen.
    frozen_sub, report = fold_batch_norm(sub, return_report=True)
    assert report.folded == [] and report.frozen == [sub.bn.name]
    assert isinstance(frozen_sub.bn, FrozenBatchNormalization)
    batch_stats = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            tfbn.BatchNormalization(track_running_stats=False),
        ]
    )
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_batch_norm(batch_stats)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze_batch_norm(batch_stats)


def test_folded_model_saves_and_loads(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, use_bias=False)(inputs))
    x = keras.layers.BatchNormalization()(keras.layers.ReLU()(x))
    model = randomize_statistics(keras.Model(inputs, x))
    folded = fold_batch_norm(model)
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    loaded = keras.saving.load_model(path)
    xs = sample((2, 8, 8, 3))
    assert rel_error(loaded(xs), model(xs, training=False)) < RTOL


# ------------------------------------------------------------ freeze/unfreeze --


def _freeze_model(bn_class=keras.layers.BatchNormalization, **bn_kwargs):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = bn_class(**bn_kwargs)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return randomize_statistics(keras.Model(inputs, keras.layers.Dense(2)(x)))


@pytest.mark.parametrize("bn_class", BN_CLASSES, ids=["keras_bn", "tfbn_bn"])
def test_freeze_uses_statistics_in_training_and_round_trips(bn_class):
    model = _freeze_model(bn_class, momentum=0.9, center=False)
    x = sample((4, 6, 6, 3))
    frozen = freeze_batch_norm(model)
    bn = next(layer for layer in frozen.layers if isinstance(layer, FrozenBatchNormalization))
    assert bn.beta is None and bn.trainable_weights == []
    np.testing.assert_allclose(
        frozen(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-5
    )
    # unfreeze restores a trainable tfbn BN with the same statistics and arguments
    restored = unfreeze_batch_norm(frozen)
    bn2 = next(layer for layer in restored.layers if isinstance(layer, tfbn.BatchNormalization))
    assert bn2.trainable and bn2.momentum == pytest.approx(0.9) and not bn2.center
    original = next(layer for layer in model.layers if is_batch_norm(layer))
    for name in ("gamma", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(getattr(bn2, name).numpy(), getattr(original, name).numpy())
    np.testing.assert_allclose(
        restored(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5
    )
    assert len(bn2.trainable_weights) == 1  # gamma


def test_freeze_trainable_affine_and_counters_survive():
    model = _freeze_model(tfbn.BatchNormalization, momentum=None)
    bn = next(layer for layer in model.layers if is_batch_norm(layer))
    bn.num_batches_tracked.assign(7)
    frozen = freeze_batch_norm(model, trainable_affine=True)
    fbn = next(layer for layer in frozen.layers if isinstance(layer, FrozenBatchNormalization))
    assert {w.name for w in fbn.trainable_weights} == {"gamma", "beta"}
    assert [w.name for w in fbn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert int(fbn.num_batches_tracked.numpy()) == 7
    # fine-tuning moves gamma/beta, never the statistics
    mean_before = fbn.moving_mean.numpy().copy()
    frozen.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    frozen.fit(sample((8, 6, 6, 3)), np.ones((8, 2), "float32"), epochs=1, verbose=0)
    np.testing.assert_array_equal(fbn.moving_mean.numpy(), mean_before)
    restored = unfreeze_batch_norm(frozen)
    bn2 = next(layer for layer in restored.layers if isinstance(layer, tfbn.BatchNormalization))
    assert bn2.momentum is None and int(bn2.num_batches_tracked.numpy()) == 7


def test_frozen_layer_serializes_and_keeps_restore_config(tmp_path):
    frozen = freeze_batch_norm(_freeze_model(momentum=0.8))
    path = str(tmp_path / "frozen.keras")
    frozen.save(path)
    loaded = keras.saving.load_model(path)
    x = sample((2, 6, 6, 3))
    np.testing.assert_allclose(loaded(x), frozen(x), rtol=1e-6, atol=1e-6)
    restored = unfreeze_batch_norm(loaded)
    bn = next(layer for layer in restored.layers if isinstance(layer, tfbn.BatchNormalization))
    assert bn.momentum == pytest.approx(0.8)


def test_frozen_layer_channels_first_multi_axis_and_float16():
    layer = FrozenBatchNormalization(axis=[1, 3], epsilon=1e-5)
    x = sample((2, 3, 4, 5))
    y = layer(x)
    scale, offset = layer.scale_offset()  # defaults: gamma 1, beta 0, mean 0, var 1
    assert scale.shape == (3, 5)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    half = FrozenBatchNormalization(axis=1, dtype="mixed_float16")
    assert half(tf.constant(x, tf.float16)).dtype == tf.float16
    assert half.moving_mean.dtype == "float32"  # statistics stay float32
    with pytest.raises(ValueError, match="epsilon"):  # 0 is allowed (Keras's rule); NaN is not
        FrozenBatchNormalization(epsilon=float("nan"))
    with pytest.raises(ValueError, match="axis"):
        FrozenBatchNormalization(axis="last")
