"""tfbn.recalibrate (precise BN) and tfbn.convert.reset_running_stats.

The reference statistics are computed independently of the code under test:
each BN layer's inputs are captured eagerly (a plain Python hook on the layer)
while the model runs in inference mode over the dataset, concatenated, and
reduced with NumPy in float64.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.calibrate import recalibrate
from tfbn.convert import batch_norm_layers, reset_running_stats

RTOL = 1e-5


def _data(n=50, shape=(6, 6, 3), seed=0, scale=3.0, shift=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *shape)) * scale + shift).astype("float32")


def _captured_inputs(model, batches):
    """Every BN layer's inference-mode inputs over `batches`, as float64 arrays."""
    layers = batch_norm_layers(model)
    seen = {id(layer): [] for layer in layers}
    for layer in layers:
        original = layer.call

        def hook(inputs, *args, _layer=layer, _original=original, **kwargs):
            seen[id(_layer)].append(np.asarray(inputs, np.float64))
            return _original(inputs, *args, **kwargs)

        object.__setattr__(layer, "call", hook)
    try:
        for x in batches:
            model(x, training=False)
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)
    return {id(layer): np.concatenate(seen[id(layer)]) for layer in layers}


def _expected(layer, inputs):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = inputs.ndim
    channel_axes = [a % rank for a in axis]
    x = np.moveaxis(inputs, channel_axes, list(range(rank - len(axis), rank)))
    x = x.reshape(-1, *[inputs.shape[a] for a in channel_axes])
    ddof = 1 if getattr(layer, "moving_variance_estimator", "biased") == "unbiased" else 0
    return x.mean(0), x.var(0, ddof=ddof)


def _assert_population_stats(model, batches):
    inputs = _captured_inputs(model, batches)
    for layer in batch_norm_layers(model):
        mean, var = _expected(layer, inputs[id(layer)])
        scale = np.abs(mean).max() + np.sqrt(var).max()
        np.testing.assert_allclose(
            layer.moving_mean.numpy(),
            mean,
            rtol=RTOL,
            atol=RTOL * 1e-2 * scale,
            err_msg=f"moving_mean of {layer.name}",
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(),
            var,
            rtol=RTOL,
            err_msg=f"moving_variance of {layer.name}",
        )


def _state(model):
    """Every variable of the model (weights, moving statistics, tfbn counters)."""
    values = [np.array(v.numpy()) for v in model.weights]
    for layer in batch_norm_layers(model):
        for name in ("num_batches_tracked", "num_skipped_updates"):
            if getattr(layer, name, None) is not None:
                values.append(np.array(getattr(layer, name).numpy()))
    return values


def _assert_same_state(before, model):
    after = _state(model)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def _functional_model():
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, name="conv1")(inp)
    h = tfbn.BatchNormalization(moving_variance_estimator="unbiased", name="bn_tfbn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(5, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn_keras")(h)
    h = keras.layers.Dropout(0.5)(keras.layers.Flatten()(h))
    h = keras.layers.Dense(6)(h)
    h = tfbn.BatchNormalization(momentum=None, name="bn_dense")(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


def test_recalibrate_gives_population_statistics_of_each_layers_inputs():
    model = _functional_model()
    x = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(16)  # 16,16,16,2
    trainable = [np.array(w.numpy()) for w in model.trainable_weights]

    result = recalibrate(model, dataset, progress=False)

    assert result.layers == ["bn_tfbn", "bn_keras", "bn_dense"]  # forward order
    assert (result.batches, result.examples, result.passes, result.replicas) == (4, 50, 3, 1)
    _assert_population_stats(model, [x[i : i + 16] for i in range(0, 50, 16)])
    for before, w in zip(trainable, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy())
    assert int(model.get_layer("bn_tfbn").num_batches_tracked.numpy()) == 4


def test_recalibration_is_batch_size_weighted_not_a_mean_of_batch_statistics():
    # Two batches of 30 and 2 examples with very different means: the average of
    # batch means is far from the population mean; recalibrate must not be fooled.
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(name="bn")])
    big = np.full((30, 3), 1.0, "float32") + np.linspace(0, 1, 30, dtype="float32")[:, None]
    small = np.full((2, 3), 100.0, "float32")
    recalibrate(model, [big, small], progress=False)
    everything = np.concatenate([big, small]).astype(np.float64)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), everything.mean(0), rtol=RTOL)
    np.testing.assert_allclose(bn.moving_variance.numpy(), everything.var(0), rtol=RTOL)
    assert abs(everything.mean(0)[0] - (big.mean() + small.mean()) / 2) > 10


def test_recalibrate_nested_sequential_and_subclassed_models_with_list_batches():
    block = keras.Sequential(
        [keras.layers.Dense(8), keras.layers.BatchNormalization(name="inner_bn"),
         keras.layers.ReLU()],
        name="block",
    )  # fmt: skip
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dropout(0.3), block, tfbn.BatchNormalization(name="outer_bn"),
         keras.layers.Dense(1)]
    )  # fmt: skip
    rng = np.random.default_rng(1)
    batches = [
        (rng.normal(size=(n, 5)).astype("float32") * 2 + 1, np.zeros((n, 1))) for n in (7, 9, 4)
    ]
    result = recalibrate(model, batches, progress=False)
    assert result.layers == ["inner_bn", "outer_bn"]
    _assert_population_stats(model, [b[0] for b in batches])

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)
            self.bn1 = tfbn.BatchNormalization()
            self.bn2 = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            h = self.bn1(self.dense(x), training=training)
            return self.bn2(tf.nn.relu(h) * 3.0 + 1.0, training=training)

    net = Net()
    net(batches[0][0])
    recalibrate(net, [b[0] for b in batches], progress=False)
    _assert_population_stats(net, [b[0] for b in batches])


def test_steps_limits_the_batches_used():
    model = keras.Sequential([keras.Input((2,)), tfbn.BatchNormalization(name="bn")])
    x = _data(40, (2,))
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(10).repeat()  # infinite
    result = recalibrate(model, dataset, steps=2, progress=False)
    assert result.batches == 2
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), x[:20].mean(0), rtol=RTOL)


def test_masked_positions_are_ignored():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 3, mask_zero=True)(inp)
    out = tfbn.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, out)
    tokens = np.array([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0]], "int32")
    recalibrate(model, [tokens], progress=False)
    table = model.layers[1].embeddings.numpy().astype(np.float64)
    kept = table[tokens[tokens != 0]]
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), kept.mean(0), rtol=RTOL)
    np.testing.assert_allclose(
        model.get_layer("bn").moving_variance.numpy(), kept.var(0), rtol=RTOL
    )


def test_recalibrate_under_mirrored_strategy_is_global():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    assert strategy.num_replicas_in_sync == 4
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6), tfbn.BatchNormalization(name="a"),
             keras.layers.ReLU(), keras.layers.BatchNormalization(name="b")]
        )  # fmt: skip
    x = _data(50, (4,), seed=3)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(12)  # last batch of 2: uneven shards
    result = recalibrate(model, dataset, progress=False)
    assert result.replicas == 4 and result.examples == 50 and result.batches == 5
    _assert_population_stats(model, [x[i : i + 12] for i in range(0, 50, 12)])


@pytest.mark.parametrize(
    "make_dataset, error, match",
    [
        (lambda x: tf.data.Dataset.from_tensor_slices(x).batch(8).take(0), ValueError, "empty"),
        (lambda x: [], ValueError, "empty"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x[:, :2]).batch(8), ValueError,
         "do not fit the model"),
        (lambda x: [x[:8, :2]], ValueError, "do not fit the model"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x).batch(8).repeat(), ValueError, "infinite"),
        (lambda x: (b for b in [x[:8]]), TypeError, "re-iterable"),
        (lambda x: x, TypeError, "single array"),
    ],
)  # fmt: skip
def test_bad_datasets_raise_clearly_and_modify_nothing(make_dataset, error, match):
    model = keras.Sequential(
        [keras.Input((3,)), tfbn.BatchNormalization(), keras.layers.Dense(2),
         keras.layers.BatchNormalization()]
    )  # fmt: skip
    model.layers[0].moving_mean.assign([1.0, 2.0, 3.0])
    before = _state(model)
    with pytest.raises(error, match=match):
        recalibrate(model, make_dataset(_data(20, (3,))), progress=False)
    _assert_same_state(before, model)


def test_failure_in_a_later_pass_restores_every_layer():
    model = keras.Sequential(
        [keras.Input((3,)), tfbn.BatchNormalization(name="a"), tfbn.BatchNormalization(name="b")]
    )
    before = _state(model)

    class Flaky:
        """Iterable that works for the first pass only."""

        def __init__(self):
            self.passes = 0

        def __iter__(self):
            def batches():
                self.passes += 1
                if self.passes > 1:
                    raise RuntimeError("disk went away")
                yield _data(8, (3,))

            return batches()

    flaky = Flaky()
    with pytest.raises(RuntimeError, match="disk went away"):
        recalibrate(model, flaky, progress=False)
    assert flaky.passes == 2  # layer "a" had been recalibrated when the second pass failed
    _assert_same_state(before, model)


def test_model_without_batch_norm_and_bad_arguments():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = _state(model)
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        recalibrate(model, [_data(4, (3,))], progress=False)
    _assert_same_state(before, model)
    bn_model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization()])
    with pytest.raises(ValueError, match="steps"):
        recalibrate(bn_model, [_data(4, (3,))], steps=0, progress=False)
    with pytest.raises(ValueError, match="not built"):
        recalibrate(keras.Sequential([tfbn.BatchNormalization()]), [_data(4, (3,))])


def test_progress_bar_is_shown(capsys):
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(name="bn")])
    recalibrate(model, [_data(4, (3,))], progress=True)
    assert "recalibrate" in capsys.readouterr().err


def test_reset_running_stats_returns_a_new_model_and_keeps_gamma_beta():
    model = _functional_model()
    recalibrate(model, [_data(8)], progress=False)
    for layer in batch_norm_layers(model):
        layer.gamma.assign(np.full(layer.gamma.shape, 2.0))
    before = _state(model)

    fresh = reset_running_stats(model)

    _assert_same_state(before, model)  # the original is untouched
    for layer in batch_norm_layers(fresh):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)
        np.testing.assert_array_equal(layer.gamma.numpy(), 2.0)
        if isinstance(layer, tfbn.BatchNormalization):
            assert int(layer.num_batches_tracked.numpy()) == 0
    x = _data(4)
    assert fresh(x, training=False).shape == model(x, training=False).shape

    same = reset_running_stats(model, inplace=True)
    assert same is model
    np.testing.assert_array_equal(model.get_layer("bn_keras").moving_variance.numpy(), 1.0)
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        reset_running_stats(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_running_stats_example_recovers_accuracy_after_a_domain_shift(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "running_stats.py"
    spec = importlib.util.spec_from_file_location("running_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--epochs", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "new domain after recalibrate" in out and "never_updated" in out
    assert (tmp_path / "momentum.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
