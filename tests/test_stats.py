"""tfbn.stats against float64 NumPy and the worked examples every BatchNorm text uses."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn import stats

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "shape,axes", [((7, 5), [0]), ((3, 4, 5, 6), [0, 1, 2]), ((4, 6, 3), [0, 2])]
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_moments_match_float64(shape, axes, dtype):
    x = RNG.normal(2.0, 3.0, size=shape)
    xt = tf.cast(tf.constant(x), dtype)
    mean, var, count = stats.moments(xt, axes)
    assert mean.dtype == tf.float32 and var.dtype == tf.float32  # float32 stats for half inputs
    xq = tf.cast(xt, tf.float64).numpy()  # the values the function actually saw
    np.testing.assert_allclose(mean, xq.mean(tuple(axes)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, xq.var(tuple(axes)), rtol=1e-5)
    assert np.all(count.numpy() == np.prod([shape[a] for a in axes]))


def test_moments_with_mask_ignore_masked_values():
    x = RNG.normal(size=(6, 4)).astype("float32")
    mask = np.array([1, 0, 1, 1, 0, 1], "float32")[:, None]
    mean, var, count = stats.moments(tf.constant(x), [0], tf.constant(mask))
    kept = x[mask[:, 0] == 1].astype("float64")
    np.testing.assert_allclose(mean, kept.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, kept.var(0), rtol=1e-5)
    np.testing.assert_array_equal(count, [4] * 4)


def test_large_mean_variance_is_accurate_in_float32():
    # Channel mean 1e4, std 1: E[x^2] - E[x]^2 in float32 has no correct digit here.
    x = RNG.normal(1e4, 1.0, size=(4096, 3))
    _, var, _ = stats.moments(tf.constant(x, tf.float32), [0])
    expected = x.astype("float32").astype("float64").var(0)
    assert np.max(np.abs(var.numpy() / expected - 1)) < 1e-3
    naive = np.mean(np.square(x.astype("float32")), 0) - np.square(np.mean(x.astype("float32"), 0))
    assert np.max(np.abs(naive / expected - 1)) > 1e-2  # the failure mode being avoided


def test_empty_moments_are_zero_not_nan():
    mean, var, count = stats.moments(tf.zeros([0, 3]), [0])
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, 0)
    np.testing.assert_array_equal(count, 0)


def test_moment_sums_merge_exactly():
    parts = [RNG.normal(1e4, 2.0, size=(n, 3)) for n in (5, 3, 0, 8)]
    sums = sum(stats.moment_sums(*stats.moments(tf.constant(p, tf.float32), [0])) for p in parts)
    mean, var, count = stats.moments_from_sums(sums)
    full = np.concatenate(parts).astype("float32").astype("float64")
    np.testing.assert_allclose(mean, full.mean(0), rtol=1e-7)
    np.testing.assert_allclose(var, full.var(0), rtol=1e-4)
    np.testing.assert_array_equal(count, [16] * 3)


def test_bessel_correction():
    var = tf.constant([2.0, 2.0, 2.0])
    np.testing.assert_allclose(
        stats.bessel_correction(var, tf.constant([4.0, 1.0, 0.0])), [8 / 3, 2, 2]
    )


def test_running_mean_worked_example():
    # Running mean from 0 with weight 0.9 on each new batch (Keras momentum 0.1,
    # PyTorch momentum 0.9) over batch means 5, 6, 7 -> 4.5, 5.85, 6.885.
    # (Issue 2 quotes 6.765 for the third step; 0.1 * 5.85 + 0.9 * 7 = 6.885.)
    keras_mean = torch_mean = tf.constant(0.0)
    expected = [4.5, 5.85, 6.885]
    for batch, want in zip([5.0, 6.0, 7.0], expected):
        keras_mean = stats.ema_update(keras_mean, batch, 0.1, stats.KERAS)
        torch_mean = stats.ema_update(torch_mean, batch, 0.9, stats.PYTORCH)
        assert float(keras_mean) == pytest.approx(want)
        assert float(torch_mean) == pytest.approx(want)


def test_ema_rejects_unknown_convention():
    with pytest.raises(ValueError, match="convention"):
        stats.ema_update(tf.constant(0.0), 1.0, 0.9, "jax")


def test_cumulative_average_is_plain_mean():
    moving = tf.constant(123.0)  # the initial value is forgotten after the first batch
    for n, batch in enumerate([1.0, 2.0, 6.0]):
        moving = stats.cumulative_average_update(moving, batch, n) if n else tf.constant(batch)
    assert float(moving) == pytest.approx(3.0)


def test_fold_scale_offset_worked_example():
    # x = [2, 4, 6, 8], gamma = 2, beta = 1, eps = 1e-5 -> [-1.683, 0.106, 1.894, 3.683]
    x = np.array([2.0, 4.0, 6.0, 8.0])
    scale, offset = stats.fold_scale_offset(
        tf.constant(2.0, tf.float64),
        tf.constant(1.0, tf.float64),
        tf.constant(x.mean()),
        tf.constant(x.var()),
        1e-5,
    )
    np.testing.assert_allclose(
        x * scale.numpy() + offset.numpy(), [-1.683, 0.106, 1.894, 3.683], atol=5e-4
    )


def test_fold_without_gamma_beta():
    scale, offset = stats.fold_scale_offset(None, None, tf.constant(3.0), tf.constant(4.0), 0.0)
    assert float(scale) == pytest.approx(0.5) and float(offset) == pytest.approx(-1.5)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_fused_kernel_returns_biased_variance(data_format):
    x = RNG.normal(5, 2, size=(4, 3, 5, 6)).astype("float32")
    axes = (0, 1, 2) if data_format == "NHWC" else (0, 2, 3)
    c = x.shape[3] if data_format == "NHWC" else x.shape[1]
    _, mean, var = stats.fused_batch_norm(
        tf.constant(x), tf.ones([c]), tf.zeros([c]), 1e-3, data_format
    )
    np.testing.assert_allclose(mean, x.astype("float64").mean(axes), rtol=1e-5)
    np.testing.assert_allclose(var, x.astype("float64").var(axes), rtol=1e-4)


def test_batch_normalize_is_stable_at_a_large_mean():
    """Mean 1e4, std 1, float32 vs float64: the stable form is ~1e-7 off, the folded
    `x * scale + offset` ~1e-3 (measured: 4.0e-7 vs 9.3e-4 on 4096 x 8 values)."""
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, size=(4096, 8)).astype("float32")
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0).astype("float32"), x64.var(0).astype("float32")
    ref = (x64 - mean.astype(np.float64)) / np.sqrt(var.astype(np.float64) + 1e-3)
    scale, offset = stats.fold_scale_offset(None, None, tf.constant(mean), tf.constant(var), 1e-3)
    folded = np.asarray(x * scale + offset, np.float64)
    stable = stats.batch_normalize(tf.constant(x), tf.constant(mean), tf.constant(var),
                                   None, None, 1e-3, [1, 8])  # fmt: skip
    assert np.abs(np.asarray(stable, np.float64) - ref).max() < 2e-6
    assert np.abs(folded - ref).max() > 1e-4  # what the stable form avoids


@pytest.mark.parametrize("make", [tfbn.BatchNormalization, tfbn.FrozenBatchNormalization])
def test_inference_form_follows_the_mean_to_spread_ratio(make):
    """Inference folds to Keras's `x * scale + offset` (two passes) only where that is
    as exact as subtracting the mean first: below the ratio bit-identical to the folded
    form, beyond it (mean 1e4, std 1) still within 2e-6 of float64; in a traced call
    the form is the one the statistics asked for when it was traced."""
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2, 8).astype("float32"), rng.normal(0, 1, 8).astype("float32")
    for mean_level, expect_folded in ((3.0, True), (1e4, False)):
        x = rng.normal(mean_level, 1.0, size=(512, 8)).astype("float32")
        mean, var = x.mean(0).astype("float32"), x.var(0).astype("float32")
        assert stats.fold_is_exact(mean, var, 1e-3) == expect_folded
        layer = make()
        layer.build(x.shape)
        layer.set_weights([gamma, beta, mean, var])
        ref = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + 1e-3) * gamma + beta
        scale, offset = stats.fold_scale_offset(
            *(tf.constant(t) for t in (gamma, beta, mean, var)), 1e-3
        )
        folded = (x * scale + offset).numpy()
        traced = tf.function(lambda x, layer=layer: layer(x, training=False))
        for y in (layer(x, training=False), traced(x)):
            y = np.asarray(y)
            assert np.abs(y - ref).max() < 2e-6 * np.abs(ref).max()
            assert np.array_equal(y, folded) == expect_folded
    assert not stats.fold_is_exact(np.array([np.nan]), np.array([1.0]), 1e-3)


def test_bad_statistics_and_outputs_are_judged_without_numpy_warnings():
    """A negative variance (Keras's renorm inference test builds one) or an inf in an
    output is a verdict, not a RuntimeWarning from inside tfbn (CI printed both)."""
    from tfbn.tolerance import Closeness

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not stats.fold_is_exact(np.array([1.0]), np.array([-2.0]), 1e-3)
        inf = np.array([[np.inf, 1.0]])
        assert Closeness(1e-3).compare(inf, inf, allow_nonfinite=True).passed
        assert not Closeness(1e-3).compare(inf, -inf, allow_nonfinite=True).passed


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_batch_norm_grad_sums_against_float64(data_format):
    """The backward sums of synchronised BN: sum(dy * xhat) and sum(dy) per channel."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(4, 6, 5, 7)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    axes = (0, 1, 2) if data_format == "NHWC" else (0, 2, 3)
    if data_format == "NCHW":
        x, dy = x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2)
    mean, var = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
    shape = [1, 1, 1, 7] if data_format == "NHWC" else [1, 7, 1, 1]
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-3)
    sum_dy_xhat, sum_dy = stats.batch_norm_grad_sums(
        tf.constant(dy), tf.constant(x), tf.constant(mean, tf.float32),
        tf.constant(var, tf.float32), 1e-3, data_format,
    )  # fmt: skip
    np.testing.assert_allclose(sum_dy_xhat, (dy * xhat).sum(axes), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sum_dy, dy.astype(np.float64).sum(axes), rtol=1e-5, atol=1e-4)
