"""Pure tensor functions behind every tfbn layer: moments, moving-average updates,
Bessel correction, the scale/offset fold and the fused-kernel wrapper.

No layers and no `tf.distribute` here (that is `tfbn.distribute`). Every function
takes and returns tensors, computes statistics in float32 (float64 stays float64)
whatever the input dtype, and is safe on empty inputs (no NaN from a zero count).

Numerical choices:

- Variance is two-pass, `mean((x - mean(x))**2)`, never `E[x^2] - E[x]^2`: the
  latter loses every significant digit when a channel's mean is large against its
  spread (mean 1e4, std 1 leaves float32 with no correct digit of the variance).
- Statistics of float16/bfloat16 inputs are accumulated in float32.
- Cross-replica merging works on *moment sums* (`moment_sums` / `moments_from_sums`)
  in float64, so a sum over replicas of per-replica two-pass moments stays exact
  (Chan et al.'s pairwise merge written as sums; see `moments_from_sums`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

KERAS = "keras"
PYTORCH = "pytorch"
MOMENTUM_CONVENTIONS = (KERAS, PYTORCH)


def stat_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype statistics are computed in for inputs of `dtype` (float32 or float64)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def moments(
    x: tf.Tensor,
    axes: list[int],
    mask: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Biased mean and variance of `x` over `axes`, and the number of values used.

    Two-pass and in float32 (float64 inputs stay float64), so the variance is
    accurate when the mean is large against the spread.

    Args:
        x: Tensor of any float dtype.
        axes: Axes to reduce over; the remaining axes are the channels.
        mask: Optional weights broadcastable to `x` (1 = use, 0 = ignore).

    Returns:
        `(mean, variance, count)`, each of the channel shape, in the statistics
        dtype. `count` is the number of (weighted) values per channel; where it is 0
        the mean and variance are 0, not NaN.
    """
    dtype = stat_dtype(x.dtype)
    x = tf.cast(x, dtype)
    if mask is None:
        mean, variance, count, _ = _centred_moments(x, axes)
        return mean, variance, count
    weights = tf.broadcast_to(tf.cast(mask, dtype), tf.shape(x))
    # Masked-out values never enter the arithmetic (selected away, not multiplied
    # by 0: NaN * 0 and Inf * 0 are NaN), so whatever they hold cannot reach the
    # statistics or their gradient.
    keep = weights > 0
    x = tf.where(keep, x, tf.zeros_like(x))
    count = tf.reduce_sum(weights, axes)
    mean = tf.math.divide_no_nan(tf.reduce_sum(x * weights, axes), count)
    centred = tf.where(keep, x - tf.stop_gradient(_expand(mean, axes)), tf.zeros_like(x))
    variance = tf.math.divide_no_nan(tf.reduce_sum(weights * tf.square(centred), axes), count)
    return mean, variance, count


def _centred_moments(x: tf.Tensor, axes: list[int]):
    """Unmasked `moments` of `x` (already in the statistics dtype), and `x - mean`
    with the mean held constant (`(mean, variance, count, centred)`).

    TensorFlow's Mean (a sum divided by the count, correctly rounded); an empty
    batch, unless its shape says it cannot be, gives 0 instead of NaN.
    """
    mean = tf.reduce_mean(x, axes, keepdims=True)
    centred = x - tf.stop_gradient(mean)
    variance = tf.reduce_mean(tf.square(centred), axes)
    mean = tf.squeeze(mean, axes)
    count = _count_over(x, axes, x.dtype)
    if tf.get_static_value(count) is None or tf.get_static_value(count) == 0:
        nonempty = count > 0
        mean = tf.where(nonempty, mean, tf.zeros_like(mean))
        variance = tf.where(nonempty, variance, tf.zeros_like(variance))
    return mean, variance, tf.broadcast_to(count, tf.shape(mean)), centred


def normalize_with_batch_moments(
    x: tf.Tensor,
    axes: list[int],
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    shape: list[int],
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Training-mode BN over `axes`: `(y, mean, variance, count)`.

    `moments` and `batch_normalize` in one: the pass that subtracts the mean for
    the variance is the one the output is scaled from (one pass over `x` fewer;
    the same values as `batch_normalize` with the moments, gradients through the
    mean and the variance alike).
    """
    mean, variance, count, centred = _centred_moments(tf.cast(x, stat_dtype(x.dtype)), axes)
    _, scale, offset = _stable_scale_offset(mean, variance, gamma, beta, epsilon)
    y = centred * _per_channel(scale, shape) + _per_channel(offset, shape)
    return tf.cast(y, x.dtype), mean, variance, count


def _count_over(x: tf.Tensor, axes: list[int], dtype: tf.DType) -> tf.Tensor:
    """Values per channel of `x` reduced over `axes`: a constant for static shapes."""
    dims = [x.shape[a] for a in axes]
    if all(d is not None for d in dims):
        size = 1
        for d in dims:
            size *= d
        return tf.constant(size, dtype)
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), dtype)


def _expand(stat: tf.Tensor, axes: list[int]) -> tf.Tensor:
    """Re-inserts the reduced `axes` (as size 1) into a reduced statistic."""
    for axis in sorted(axes):
        stat = tf.expand_dims(stat, axis)
    return stat


def moment_sums(mean: tf.Tensor, variance: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Packs per-shard moments into additive float64 sums `[n, n*mean, n*(var+mean^2)]`.

    Summing these over shards (e.g. one all-reduce) and calling `moments_from_sums`
    gives the exact moments of the union. In float64 the final subtraction
    `E[x^2] - E[x]^2` keeps ~9 more digits than float32 two-pass statistics have,
    so no accuracy is lost even at mean/std ratios of 1e5.
    """
    n = tf.cast(count, tf.float64)
    m = tf.cast(mean, tf.float64)
    v = tf.cast(variance, tf.float64)
    return tf.stack([n, n * m, n * (v + tf.square(m))], axis=0)


def moments_from_sums(
    sums: tf.Tensor, dtype: tf.DType = tf.float32
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Inverse of `moment_sums` after summation: `(mean, variance, count)` in `dtype`.

    A zero total count gives mean 0, variance 0 (never NaN).
    """
    n, s1, s2 = sums[0], sums[1], sums[2]
    mean = tf.math.divide_no_nan(s1, n)
    variance = tf.maximum(tf.math.divide_no_nan(s2, n) - tf.square(mean), 0.0)
    return tf.cast(mean, dtype), tf.cast(variance, dtype), tf.cast(n, dtype)


def bessel_correction(variance: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Biased to unbiased variance: `var * n / (n - 1)`; unchanged where `n <= 1`."""
    count = tf.cast(count, variance.dtype)
    factor = tf.where(count > 1, count / tf.maximum(count - 1, 1), tf.ones_like(count))
    return variance * factor


def ema_update(
    moving: tf.Tensor, batch: tf.Tensor, momentum: float | tf.Tensor, convention: str = KERAS
) -> tf.Tensor:
    """Exponential moving average of a statistic.

    `convention="keras"`: `moving * momentum + batch * (1 - momentum)` (Keras/TF,
    momentum ~0.99). `convention="pytorch"`: `moving * (1 - momentum) + batch * momentum`
    (PyTorch, momentum ~0.1).
    """
    if convention not in MOMENTUM_CONVENTIONS:
        raise ValueError(
            f"`convention` must be one of {MOMENTUM_CONVENTIONS}. Received: convention={convention!r}"
        )
    momentum = tf.cast(momentum, moving.dtype)
    keep = momentum if convention == KERAS else 1.0 - momentum
    return moving * keep + tf.cast(batch, moving.dtype) * (1.0 - keep)


def cumulative_average_update(
    moving: tf.Tensor, batch: tf.Tensor, num_batches: tf.Tensor
) -> tf.Tensor:
    """Cumulative (equal-weight) average after `num_batches` earlier batches.

    PyTorch's `momentum=None`: the result is the plain mean of all batch statistics
    seen so far, `moving + (batch - moving) / (num_batches + 1)`.
    """
    n = tf.cast(num_batches, moving.dtype)
    return moving + (tf.cast(batch, moving.dtype) - moving) / (n + 1.0)


def fold_scale_offset(
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    mean: tf.Tensor,
    variance: tf.Tensor,
    epsilon: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The one formula that turns BatchNorm into an affine map `y = x * scale + offset`.

    `scale = gamma / sqrt(variance + epsilon)`, `offset = beta - mean * scale`;
    `gamma=None` means 1 and `beta=None` means 0. Used by the unfused path, by
    frozen BN and when folding BN into the preceding kernel.
    """
    scale = tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype))
    if gamma is not None:
        scale = scale * tf.cast(gamma, scale.dtype)
    if beta is None:
        return scale, -mean * scale
    return scale, tf.cast(beta, scale.dtype) - mean * scale


FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)


def fused_batch_norm(
    x: tf.Tensor,
    scale: tf.Tensor,
    offset: tf.Tensor,
    epsilon: float,
    data_format: str,
    mean: tf.Tensor | None = None,
    variance: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """TensorFlow's fused batch-norm kernel (FusedBatchNormV3) on a 4D tensor.

    With `mean`/`variance` omitted it normalises with the batch statistics
    (training mode) and returns `(y, batch_mean, biased_batch_variance)`; the kernel
    itself returns the Bessel-corrected variance, which is undone here so every
    tfbn path hands back the same (biased) statistic. With `mean`/`variance` given
    it normalises with them (inference mode) and returns them unchanged.

    `x` is float16/bfloat16/float32 in `data_format` "NHWC" or "NCHW"; `scale`,
    `offset`, statistics and `epsilon` are float32; `y` has `x`'s dtype.
    """
    training = mean is None
    empty = tf.zeros([0], tf.float32)
    y, batch_mean, batch_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=scale,
        offset=offset,
        mean=empty if training else mean,
        variance=empty if training else variance,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=data_format,
        is_training=training,
    )
    if not training:
        return y, mean, variance
    n = fused_count(x, data_format)
    batch_var = batch_var * tf.math.divide_no_nan(n - 1.0, n)
    return y, batch_mean, batch_var


def fused_count(x: tf.Tensor, data_format: str) -> tf.Tensor:
    """Values per channel of a 4D `x` in `data_format` (float32 scalar; 0 when empty)."""
    shape = tf.shape(x, out_type=tf.int64)
    channels = shape[3 if data_format == "NHWC" else 1]
    return tf.cast(tf.size(x, tf.int64) // tf.maximum(channels, 1), tf.float32)


def batch_norm_grad_sums(
    dy: tf.Tensor,
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    epsilon: float,
    data_format: str,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(sum(dy * xhat), sum(dy))` per channel, `xhat = (x - mean) * rsqrt(variance + epsilon)`.

    The sums over every axis but the channel of a 4D `dy`/`x` in `data_format`:
    the local gamma and beta gradients, and, all-reduced, what
    `sync_batch_norm_input_grad` needs. Channels last, from the fused kernel's
    gradient with the statistics held fixed (FusedBatchNormGradV3,
    `is_training=False`; it also writes an input gradient, which is discarded).
    On 2 CPU cores that is faster than one XLA pass computing only the two sums,
    alone and in a synchronised training step on 4 logical replicas (`python
    examples/bench_xla_variants.py`). Channels first, where the CPU kernel would
    need two transposes, one XLA-fused pass in float32. The kernel does not read
    `reserve_space_3` here, so an empty one is passed.
    """
    if data_format == "NCHW":
        sum_dy_xc, sum_dy = _grad_sums_pass(dy, x, mean[:, None, None], [0, 2, 3])
        return sum_dy_xc * tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype)), sum_dy
    _, sum_dy_xhat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy,
        x=x,
        scale=tf.ones_like(mean),
        reserve_space_1=mean,
        reserve_space_2=variance,
        reserve_space_3=tf.zeros([0], tf.float32),
        epsilon=epsilon,
        data_format="NHWC",
        is_training=False,
    )
    return sum_dy_xhat, sum_dy


@tf.function(jit_compile=True, reduce_retracing=True)
def _grad_sums_pass(dy, x, mean, axes):
    """`(sum(dy * (x - mean)), sum(dy))` over `axes`, in float32 (one fused pass)."""
    dy = tf.cast(dy, tf.float32)
    return tf.reduce_sum(dy * (tf.cast(x, tf.float32) - mean), axes), tf.reduce_sum(dy, axes)


def sync_batch_norm_input_grad(
    dy: tf.Tensor,
    x: tf.Tensor,
    scale: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    epsilon: float,
    sum_dy: tf.Tensor,
    sum_dy_xhat: tf.Tensor,
    count: tf.Tensor,
    data_format: str,
) -> tf.Tensor:
    """Input gradient of batch norm whose statistics came from a larger (global) batch.

    `y = scale * xhat + offset` with `xhat = (x - mean) * r`, `r = rsqrt(var + eps)`,
    where `mean`/`var` are the moments of all `count` values per channel (every
    replica's). The gradient of the summed loss of all replicas w.r.t. this
    replica's `x` (Ioffe and Szegedy's formula with global sums, as PyTorch's
    SyncBatchNorm) is

        dx = scale * r * (dy - sum_dy / count - xhat * sum_dy_xhat / count)
           = dy * a + (x - mean) * b + c,    per channel:
        a = scale * r,  b = -a * r * sum_dy_xhat / count,  c = -a * sum_dy / count

    where `sum_dy`, `sum_dy_xhat` are the GLOBAL sums (all-reduced local sums from
    `batch_norm_grad_sums`). One XLA-fused pass over `dy` and `x` in
    float32, rounded once to `x`'s dtype. A zero count (all-empty batch) leaves
    `dy * a`, never NaN.
    """
    r = tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype))
    a = scale * r
    b = -a * r * tf.math.divide_no_nan(sum_dy_xhat, count)
    c = -a * tf.math.divide_no_nan(sum_dy, count)
    if data_format == "NCHW":
        a, b, c, mean = (t[:, None, None] for t in (a, b, c, mean))
    return _input_grad_pass(dy, x, a, mean, b, c)


@tf.function(jit_compile=True, reduce_retracing=True)
def _input_grad_pass(dy, x, a, mean, b, c):
    """`dy * a + (x - mean) * b + c` in float32 (one fused pass), in `x`'s dtype."""
    dx = tf.cast(dy, tf.float32) * a + (tf.cast(x, tf.float32) - mean) * b + c
    return tf.cast(dx, x.dtype)


def fused_moments(x: tf.Tensor, data_format: str) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`moments` of a 4D `x` over all but the channel axis, on the fused kernel.

    Same contract as `moments` (biased variance, float32, zeros for an empty
    batch). On a CPU the kernel computes them for less than TensorFlow's
    reductions alone cost, and its variance is two-pass: at mean 1e4 / std 1 it
    is within 1e-4 relative of float64 (tested). (The kernel also writes a
    normalised copy of `x`, which is discarded.)
    """
    channels = x.shape[3] if data_format == "NHWC" else x.shape[1]
    ones, zeros = tf.ones([channels], tf.float32), tf.zeros([channels], tf.float32)
    _, mean, variance = fused_batch_norm(x, ones, zeros, 1e-3, data_format)
    count = tf.fill([channels], fused_count(x, data_format))
    empty = count == 0.0  # the kernel returns NaN statistics for an empty batch
    mean = tf.where(empty, tf.zeros_like(mean), mean)
    variance = tf.where(empty, tf.zeros_like(variance), variance)
    return mean, variance, count


def normalize_with_moments(
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    data_format: str,
) -> tf.Tensor:
    """`(x - mean) * gamma * rsqrt(variance + epsilon) + beta` for a 4D `x`.

    One XLA-fused pass in float32, rounded once to `x`'s dtype (about half the
    cost of the fused inference kernel on a CPU). Subtracting the mean before
    scaling keeps the precision of `x` when the mean is large against the spread,
    where the folded form `x * scale + offset` cancels.
    """
    scale, offset = fold_scale_offset(gamma, beta, tf.zeros_like(mean), variance, epsilon)
    if data_format == "NCHW":
        mean, scale, offset = (t[:, None, None] for t in (mean, scale, offset))
    return _normalize_pass(x, mean, scale, offset)


@tf.function(jit_compile=True, reduce_retracing=True)
def _normalize_pass(x, mean, scale, offset):
    """`(x - mean) * scale + offset` in float32 (one fused pass), in `x`'s dtype."""
    return tf.cast((tf.cast(x, tf.float32) - mean) * scale + offset, x.dtype)


def batch_normalize(
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    shape: list[int],
) -> tf.Tensor:
    """`(x - mean) * gamma * rsqrt(variance + epsilon) + beta` for any rank, in `x`'s dtype.

    The per-channel statistics are reshaped to `shape` (1 on every reduced axis).
    Computed in the statistics' dtype (float32 for float16/bfloat16 inputs) and
    rounded once. The mean is subtracted before scaling: the folded form
    `x * scale + (beta - mean * scale)` loses the digits of `x - mean` when the
    mean is large against the spread (mean 1e4, std 1 in float32: ~1e-3 absolute
    error against float64 for the folded form, ~1e-7 for this one; measured by
    `tests/test_stats.py::test_batch_normalize_is_stable_at_a_large_mean`).
    Gradients flow through `mean` and `variance`: the pass over `x` subtracts the
    mean held constant, and the mean enters again, with its gradient, through the
    per-channel offset `(held - mean) * scale`, which is exactly 0. The values are
    the stable form's; the backward pass then takes the mean's gradient from the
    one reduction of `dy` that beta's needs anyway instead of negating and reducing
    the whole gradient a second time (4-6% of a training step on (16, 16, 16, 32)
    and (32, 8, 8, 64) on 2 CPU cores).
    """
    held, scale, offset = _stable_scale_offset(mean, variance, gamma, beta, epsilon)
    return _subtract_then_scale(x, held, scale, offset, shape)


def _stable_scale_offset(mean, variance, gamma, beta, epsilon):
    """`(held, scale, offset)` with `(x - held) * scale + offset` equal to the stable
    form: `held` is the mean without gradient, `offset = (held - mean) * scale + beta`
    is exactly beta and carries the mean's gradient (see `batch_normalize`)."""
    scale = tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype))
    if gamma is not None:
        scale = scale * tf.cast(gamma, scale.dtype)
    held = tf.stop_gradient(mean)
    offset = (held - mean) * scale
    if beta is not None:
        offset = offset + tf.cast(beta, scale.dtype)
    return held, scale, offset


def _subtract_then_scale(x, mean, scale, beta, shape):
    """`(x - mean) * scale + beta` in the statistics' dtype, rounded once to `x`'s."""
    y = (tf.cast(x, scale.dtype) - _per_channel(mean, shape)) * _per_channel(scale, shape)
    if beta is not None:
        y = y + _per_channel(tf.cast(beta, scale.dtype), shape)
    return tf.cast(y, x.dtype)


# Inference folds BN into `x * scale + offset` (Keras's form: two passes over `x`,
# one fewer than the stable form) only where that is as exact as subtracting the
# mean first: its rounding error grows with |mean| * scale = |mean| / std * |gamma|,
# so at a ratio |mean| / sqrt(variance + epsilon) <= 8 on every channel it is
# within a few float32 ulps of the output's scale (|gamma|), and beyond it (raw
# features, mean 1e4 / std 1: ~1e-3 off) the stable form is used.
FOLD_EXACT_MAX_RATIO = 8.0


def fold_is_exact(mean, variance, epsilon: float) -> bool:
    """Whether `x * scale + offset` is as exact as `(x - mean) * scale + beta` for
    these statistics (NumPy arrays): `max |mean| / sqrt(variance + epsilon)` is at
    most `FOLD_EXACT_MAX_RATIO` (False for non-finite statistics)."""
    mean = np.asarray(mean, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # a negative variance gives nan: False
        ratio = np.abs(mean) / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    return bool(ratio.size == 0 or np.max(ratio) <= FOLD_EXACT_MAX_RATIO)


def normalize_with_statistics(
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    shape: list[int],
    fold: bool,
) -> tf.Tensor:
    """Inference with fixed statistics: `x * scale + offset` if `fold` (Keras's two
    passes; see `fold_is_exact`), else `batch_normalize`'s stable form."""
    if not fold:
        return batch_normalize(x, mean, variance, gamma, beta, epsilon, shape)
    dtype = stat_dtype(x.dtype)
    scale, offset = fold_scale_offset(
        gamma, beta, tf.cast(mean, dtype), tf.cast(variance, dtype), epsilon
    )
    y = tf.cast(x, dtype) * _per_channel(scale, shape) + _per_channel(offset, shape)
    return tf.cast(y, x.dtype)


def _per_channel(stat: tf.Tensor, shape: list[int]) -> tf.Tensor:
    """`stat` reshaped to `shape`; as it is when it already broadcasts (channels last)."""
    if len(stat.shape) == 1 and all(d == 1 for d in shape[:-1]) and stat.shape[0] == shape[-1]:
        return stat
    return tf.reshape(stat, shape)


def renorm_correction(
    mean: tf.Tensor,
    variance: tf.Tensor,
    renorm_mean: tf.Tensor,
    renorm_stddev: tf.Tensor,
    epsilon: float,
    clipping: dict,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Batch renormalization's corrections `(r, d)` (Ioffe, 2017), as Keras computes them.

        stddev = sqrt(variance + epsilon)
        r = stddev / max(renorm_stddev, sqrt(epsilon)),   clipped to [rmin, rmax]
        d = (mean - renorm_mean) / max(renorm_stddev, sqrt(epsilon)),   clipped to [-dmax, dmax]

    Missing `clipping` keys mean no bound. `r` and `d` are constants for the
    gradient (`tf.stop_gradient`), as in the paper and in Keras.
    """
    dtype = mean.dtype
    eps = tf.cast(epsilon, dtype)
    stddev = tf.sqrt(variance + eps)
    denom = tf.maximum(tf.cast(renorm_stddev, dtype), tf.sqrt(eps))
    r = stddev / denom
    d = (mean - tf.cast(renorm_mean, dtype)) / denom
    if clipping.get("rmin") is not None:
        r = tf.maximum(r, tf.cast(clipping["rmin"], dtype))
    if clipping.get("rmax") is not None:
        r = tf.minimum(r, tf.cast(clipping["rmax"], dtype))
    if clipping.get("dmax") is not None:
        dmax = tf.cast(clipping["dmax"], dtype)
        d = tf.clip_by_value(d, -dmax, dmax)
    return tf.stop_gradient(r), tf.stop_gradient(d)


def renorm_scale_offset(
    r: tf.Tensor, d: tf.Tensor, gamma: tf.Tensor | None, beta: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Composes the renorm correction with the affine part:
    `(xhat * r + d) * gamma + beta = xhat * (r * gamma) + (d * gamma + beta)`."""
    if gamma is None:
        scale, offset = r, d
    else:
        gamma = tf.cast(gamma, r.dtype)
        scale, offset = r * gamma, d * gamma
    if beta is not None:
        offset = offset + tf.cast(beta, r.dtype)
    return scale, offset


def example_moment_sums(
    x: tf.Tensor, channel_axes: list[int], weights: tf.Tensor | None = None
) -> tf.Tensor:
    """Float64 moment sums of each example of `x`, per channel: shape `[batch, 3, C]`.

    Row `b` holds `[n, sum(x), sum(x**2)]` over example `b`'s values of each channel
    (every axis but 0 and `channel_axes`; `C` is the product of the channel
    dimensions, in axis order): the layout of `moment_sums`, kept per example.
    Summing over axis 0, over any number of batches, gives the exact float64 sums
    of all of them, so `moments_from_sums` of the total is the moments of the union.
    Nothing is reduced over the batch axis: an example's row does not depend on
    the rest of its batch. `weights` (broadcastable to `x`; 1 = use, 0 = ignore)
    weight each value, e.g. a mask.
    """
    rank = len(x.shape)
    channel_axes = sorted(a % rank for a in channel_axes)
    if 0 in channel_axes:
        raise ValueError(
            f"`channel_axes` must not include the batch axis. Received: {channel_axes}"
        )
    dims = [x.shape[a] for a in channel_axes]
    if any(d is None for d in dims):
        raise ValueError(f"The channel dimensions must be known. Received shape: {x.shape}")
    channels = 1
    for d in dims:
        channels *= int(d)
    perm = [0, *[a for a in range(1, rank) if a not in channel_axes], *channel_axes]

    def per_example(t):  # [batch, values per channel, C]
        return tf.reshape(tf.transpose(t, perm), [tf.shape(t)[0], -1, channels])

    x64 = tf.cast(x, tf.float64)
    w = None if weights is None else tf.broadcast_to(tf.cast(weights, tf.float64), tf.shape(x64))
    x64 = per_example(x64)
    if w is None:
        n = tf.fill([tf.shape(x64)[0], channels], tf.cast(tf.shape(x64)[1], tf.float64))
        wx = x64
    else:
        w = per_example(w)
        n = tf.reduce_sum(w, axis=1)
        # Selected, not multiplied: a masked-out NaN/Inf must not reach the sums.
        wx = tf.where(w > 0, w * tf.where(w > 0, x64, tf.zeros_like(x64)), tf.zeros_like(x64))
    return tf.stack([n, tf.reduce_sum(wx, axis=1), tf.reduce_sum(wx * x64, axis=1)], axis=1)
