"""tfbn.callbacks: momentum schedules inside compiled fit, TensorBoard histograms, the plot."""

import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.callbacks import (
    BatchNormMomentumScheduler,
    BatchNormStatsCallback,
    histogram_buckets,
    momentum_schedule,
    plot_running_stats,
)


def _bn_first_model(jit_compile="auto", **bn_kwargs):
    """BN is the first layer, so its inputs (and batch means) are the raw data."""
    model = keras.Sequential(
        [keras.Input((3,)), tfbn.BatchNormalization(name="bn", **bn_kwargs), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model


def _data(batches=3, batch_size=4):
    rng = np.random.default_rng(0)
    # Batch b has mean ~ 10 * (b + 1): the moving mean's path shows every momentum.
    x = np.concatenate(
        [rng.normal(size=(batch_size, 3)) + 10.0 * (b + 1) for b in range(batches)]
    ).astype("float32")
    return x, np.zeros((len(x), 1), "float32")


def _ema(batch_means, momenta, start=0.0):
    moving = np.full(batch_means[0].shape, start, np.float64)
    for mean, m in zip(batch_means, momenta, strict=True):
        moving = moving * m + mean * (1 - m)
    return moving


@pytest.mark.parametrize("jit_compile", [False, True])
def test_per_step_schedule_changes_the_update_inside_compiled_fit(jit_compile):
    x, y = _data()
    momenta = [0.5, 0.0, 0.9, 0.3, 0.75, 0.1]  # 3 steps x 2 epochs
    model = _bn_first_model(jit_compile)
    scheduler = BatchNormMomentumScheduler(lambda step: momenta[step], per="step")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[scheduler])

    batch_means = [x[i : i + 4].astype(np.float64).mean(0) for i in range(0, 12, 4)] * 2
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), _ema(batch_means, momenta), rtol=1e-5)
    static = _ema(batch_means, [0.99] * 6)
    assert np.abs(bn.moving_mean.numpy() - static).min() > 1.0  # really not the static update
    assert [m for _, m in scheduler.history] == momenta
    assert bn.momentum == momenta[-1]


def test_per_epoch_linear_schedule_and_logged_momentum():
    x, y = _data()
    model = _bn_first_model()
    scheduler = BatchNormMomentumScheduler("linear", start=0.0, end=0.9, per="epoch")
    history = model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                        callbacks=[scheduler])  # fmt: skip
    np.testing.assert_allclose(history.history["bn_momentum"], [0.0, 0.3, 0.6, 0.9], atol=1e-12)
    batch_means = [x[i : i + 4].astype(np.float64).mean(0) for i in range(0, 12, 4)]
    expected = _ema(batch_means * 4, np.repeat([0.0, 0.3, 0.6, 0.9], 3))
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), expected, rtol=1e-5)


def test_schedule_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    assert strategy.num_replicas_in_sync == 4
    with strategy.scope():
        model = _bn_first_model(synchronized=True)
    x, y = _data(batches=2, batch_size=8)
    scheduler = BatchNormMomentumScheduler(lambda step: [0.0, 0.5][step], per="step")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[scheduler])
    batch_means = [x[i : i + 8].astype(np.float64).mean(0) for i in (0, 8)]
    np.testing.assert_allclose(
        model.get_layer("bn").moving_mean.numpy(), _ema(batch_means, [0.0, 0.5]), rtol=1e-5
    )


def test_pytorch_convention_layers_get_converted_values():
    x, y = _data(batches=1)
    model = _bn_first_model(momentum=0.1, momentum_convention="pytorch")
    scheduler = BatchNormMomentumScheduler(lambda epoch: 0.75, per="epoch")  # keras convention
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[scheduler])
    bn = model.get_layer("bn")
    assert bn.momentum == pytest.approx(0.25)
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), x.astype(np.float64).mean(0) * 0.25, rtol=1e-5
    )


def test_named_schedules():
    linear = momentum_schedule("linear", 0.9, 0.99, total=11)
    cosine = momentum_schedule("cosine", 0.9, 0.99, total=11)
    exponential = momentum_schedule("exponential", 0.9, 0.999, total=3)
    assert [linear(t) for t in (0, 5, 10, 50)] == pytest.approx([0.9, 0.945, 0.99, 0.99])
    assert [cosine(t) for t in (0, 5, 10)] == pytest.approx([0.9, 0.945, 0.99])
    assert cosine(2) == pytest.approx(0.99 + (0.9 - 0.99) * (1 + math.cos(math.pi * 0.2)) / 2)
    assert [1 - exponential(t) for t in (0, 1, 2)] == pytest.approx([0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="schedule"):
        momentum_schedule("step", total=3)
    with pytest.raises(ValueError, match="< 1"):
        momentum_schedule("exponential", 0.9, 1.0, total=3)
    with pytest.raises(ValueError, match="start"):
        momentum_schedule("linear", 1.5, 0.9, total=3)
    with pytest.raises(ValueError, match="total"):
        momentum_schedule("linear", total=0)


def test_scheduler_refuses_what_it_cannot_schedule():
    x, y = _data(batches=1)

    def fit(model, **kwargs):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[BatchNormMomentumScheduler(**kwargs)])  # fmt: skip

    keras_bn = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="kbn"),
                                 tfbn.BatchNormalization(name="tbn")])  # fmt: skip
    keras_bn.compile("sgd", "mse")
    with pytest.raises(TypeError, match="kbn.*baked into the compiled train step"):
        fit(keras_bn)
    fit(keras_bn, keras_layers="skip")
    assert keras_bn.get_layer("kbn").momentum == 0.99
    assert keras_bn.get_layer("tbn").momentum == 0.9  # first epoch of the default linear schedule

    with pytest.raises(ValueError, match="cumulative average"):
        fit(_bn_first_model(momentum=None))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit(_bn_first_model(), schedule=lambda epoch: 1.5)
    with pytest.raises(ValueError, match="per"):
        BatchNormMomentumScheduler(per="batch")
    with pytest.raises(ValueError, match="keras_layers"):
        BatchNormMomentumScheduler(keras_layers="ignore")


def test_momentum_property_validates():
    bn = tfbn.BatchNormalization(momentum=0.9)
    bn.build((None, 2))
    bn.momentum = 0.5
    assert float(bn._momentum_variable.numpy()) == 0.5
    with pytest.raises(ValueError, match="momentum"):
        bn.momentum = 2.0
    with pytest.raises(ValueError, match="cumulative average"):
        bn.momentum = None
    assert bn.get_config()["momentum"] == 0.5
    assert [w.name for w in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]


# --------------------------------------------------------------- TensorBoard --


def _events(log_dir):
    out = {}
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value))
    return out


def test_stats_callback_writes_histograms_per_epoch(tmp_path):
    inner = keras.Sequential([keras.layers.Dense(5, use_bias=False),
                              keras.layers.BatchNormalization(name="kbn")], name="inner")  # fmt: skip
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(name="bn"), inner,
                              keras.layers.Dense(1)])  # fmt: skip
    model.compile("sgd", "mse")
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=3, verbose=0,
              callbacks=[BatchNormStatsCallback(tmp_path / "tb")])  # fmt: skip
    events = _events(tmp_path / "tb")
    for layer, channels in (("bn", 3), ("inner/kbn", 5)):
        for name in ("moving_mean", "moving_variance", "gamma", "beta"):
            tag = next(t for t in events if t.endswith(f"{layer}/{name}"))
            steps = [step for step, _ in events[tag]]
            assert steps == [0, 1, 2]
            _, value = events[tag][-1]
            assert value.metadata.plugin_data.plugin_name == "histograms"
            buckets = tf.make_ndarray(value.tensor)
            assert buckets.shape[1] == 3 and buckets[:, 2].sum() == channels
    tag = next(t for t in events if t.endswith("bn/num_batches_tracked"))
    assert [float(tf.make_ndarray(v.tensor)) for _, v in events[tag]] == [3, 6, 9]
    with pytest.raises(ValueError, match="freq"):
        BatchNormStatsCallback(tmp_path, freq=0)


def test_histogram_buckets():
    b = histogram_buckets(np.array([0.0, 1.0, 1.0, 2.0]), buckets=2)
    np.testing.assert_array_equal(b, [[0.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(histogram_buckets(np.ones(3)), [[0.5, 1.5, 3.0]])
    assert histogram_buckets(np.array([])).shape == (0, 3)


# ------------------------------------------------------------------ plotting --


def test_plot_running_stats_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 2.0, size=(16, 4)).astype("float32") for _ in range(60)]
    out = plot_running_stats(tmp_path / "stats.png", batches, "exponential", static_momentum=0.99,
                             start=0.5, end=0.99)  # fmt: skip
    data = (tmp_path / "stats.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert len(out["static_mean"]) == len(out["scheduled_mean"]) == 60
    assert out["momentum"][0] == pytest.approx(0.5) and out["momentum"][-1] == pytest.approx(0.99)
    # Starting low, the scheduled average reaches the population mean; 0.99 is still far.
    pop = out["population_mean"]
    assert abs(out["scheduled_mean"][-1] - pop) < 0.2 < abs(out["static_mean"][-1] - pop)
    with pytest.raises(ValueError, match="empty"):
        plot_running_stats(tmp_path / "x.png", [])
