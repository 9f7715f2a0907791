"""Benchmark: XLA passes that were tried in tfbn's training path against what it ships.

Each was tried, measured here and not adopted; every table's ratios are against tfbn
as shipped, from the same run (`tfbn bench`'s interleaved timer):

1. An XLA unfused training path: forward (moments and normalisation) and backward
   (the two per-channel sums and the input gradient) each one `jit_compile=True`
   pass over a `[values, C]` view, with a hand-written gradient, as a whole layer
   training step against tfbn's layer and Keras's.
2. Synchronised BN's local moments as one XLA pass (sum and sum of squares about a
   per-channel shift, the first example) instead of the fused kernel
   (`tfbn.stats.fused_moments`), on the per-replica shapes of `tfbn bench --sync`.
3. Synchronised BN's backward sums `sum(dy * xhat)`, `sum(dy)` as one XLA pass that
   writes nothing per element, instead of the fused gradient kernel with the
   statistics held fixed (`tfbn.stats.batch_norm_grad_sums`), which also writes an
   input gradient that is discarded: the sums alone on one device, and a whole
   synchronised training step on 4 logical CPU replicas with either.

    python examples/bench_xla_variants.py              # README numbers
    python examples/bench_xla_variants.py --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfbn import bench, stats  # noqa: E402
from tfbn.layers import BatchNormalization  # noqa: E402

LAYER_SHAPES = [
    (256, 64),
    (32, 128),
    (1024, 256),
    (32, 8, 8, 64),
    (16, 14, 14, 128),
    (64, 256, 128),
    (4096, 1024),
]
MOMENT_SHAPES = [(8, 56, 56, 64), (16, 28, 28, 128)]


@tf.function(jit_compile=True, reduce_retracing=True)
def _forward_pass(x, gamma, beta, epsilon):
    mean = tf.reduce_mean(x, 0)
    centred = x - mean
    variance = tf.reduce_mean(tf.square(centred), 0)
    r = tf.math.rsqrt(variance + epsilon)
    return centred * (r * gamma) + beta, mean, variance


@tf.function(jit_compile=True, reduce_retracing=True)
def _backward_pass(dy, x, mean, variance, gamma, epsilon):
    n = tf.cast(tf.shape(x)[0], x.dtype)
    r = tf.math.rsqrt(variance + epsilon)
    xhat = (x - mean) * r
    dbeta = tf.reduce_sum(dy, 0)
    dgamma = tf.reduce_sum(dy * xhat, 0)
    dx = (gamma * r) * (dy - dbeta / n - xhat * dgamma / n)
    return dx, dgamma, dbeta


class XlaUnfused(BatchNormalization):
    """tfbn's layer whose training normalisation is the two XLA passes above."""

    def _batch_norm(self, x, mask):
        channels = x.shape[-1]
        x2 = tf.reshape(x, [-1, channels])
        epsilon = tf.constant(self.epsilon, x.dtype)

        @tf.custom_gradient
        def normalize(x2, gamma, beta):
            y, mean, variance = _forward_pass(x2, gamma, beta, epsilon)

            def grad(dy, dmean, dvariance):  # the statistics feed only the moving averages
                return _backward_pass(dy, x2, mean, variance, gamma, epsilon)

            return (y, mean, variance), grad

        y, mean, variance = normalize(x2, *self._gamma_beta())
        count = tf.fill([channels], tf.cast(tf.shape(x2)[0], x.dtype))
        return tf.reshape(y, tf.shape(x)), mean, variance, count


def _layer_fns(x: tf.Tensor) -> dict:
    """Training steps of Keras's layer, tfbn's and the XLA variant on `x`."""
    variants = {"keras": keras.layers.BatchNormalization, "tfbn": BatchNormalization}
    variants["xla unfused"] = XlaUnfused
    return {name: bench._layer_steps(make(), x, jit=False)[0] for name, make in variants.items()}


def time_layers(shapes, repeats: int) -> list[dict]:
    return _timed(shapes, repeats, _layer_fns, "tfbn")


@tf.function(jit_compile=True, reduce_retracing=True)
def _xla_moments(x2):
    shift = x2[0]
    d = x2 - shift
    n = tf.cast(tf.shape(x2)[0], x2.dtype)
    mean_d = tf.reduce_sum(d, 0) / n
    return mean_d + shift, tf.reduce_sum(tf.square(d), 0) / n - tf.square(mean_d)


def _moment_fns(x: tf.Tensor) -> dict:
    """The two ways to the local moments of a 4D NHWC `x`, as tf.functions."""
    return {
        "tfbn (fused kernel)": tf.function(lambda: stats.fused_moments(x, "NHWC")[:2]),
        "xla one pass": tf.function(lambda: _xla_moments(tf.reshape(x, [-1, x.shape[-1]]))),
    }


def time_moments(shapes, repeats: int) -> list[dict]:
    return _timed(shapes, repeats, _moment_fns, "tfbn (fused kernel)")


def _xla_grad_sums(dy, x, mean, variance, epsilon, data_format="NHWC"):
    """`(sum(dy * xhat), sum(dy))` of a 4D NHWC `dy`/`x` in one XLA pass."""
    channels = x.shape[-1]
    flat = lambda t: tf.reshape(t, [-1, channels])  # noqa: E731
    sum_dy_xc, sum_dy = stats._grad_sums_pass(flat(dy), flat(x), mean, [0])
    return sum_dy_xc * tf.math.rsqrt(variance + epsilon), sum_dy


def _grad_sum_fns(x: tf.Tensor) -> dict:
    """The two ways to the backward sums of a 4D NHWC `x`, as tf.functions."""
    dy = tf.random.stateless_normal(x.shape, seed=(1, 2))
    mean, variance = tf.nn.moments(x, [0, 1, 2])
    args = (dy, x, mean, variance, 1e-3)
    return {
        "tfbn (fused grad kernel)": tf.function(lambda: stats.batch_norm_grad_sums(*args, "NHWC")),
        "xla one pass": tf.function(lambda: _xla_grad_sums(*args)),
    }


def time_grad_sums(shapes, repeats: int) -> list[dict]:
    return _timed(shapes, repeats, _grad_sum_fns, "tfbn (fused grad kernel)")


@contextlib.contextmanager
def _xla_sums_traced():
    """While tracing inside this block, synchronised BN takes its backward sums from
    one XLA pass instead of the fused gradient kernel."""
    shipped = stats.batch_norm_grad_sums
    stats.batch_norm_grad_sums = _xla_grad_sums
    try:
        yield
    finally:
        stats.batch_norm_grad_sums = shipped


def _sync_step_fns(x: tf.Tensor, replicas: int = 4) -> dict:
    """`tfbn bench --sync`'s step of a synchronised layer, per-replica batch shaped
    like `x`, with either source of the backward sums."""
    strategy = bench._mirrored_strategy(replicas)
    steps = {}
    for name, traced in (
        ("tfbn (fused grad kernel)", contextlib.nullcontext),
        ("xla one pass", _xla_sums_traced),
    ):
        step = bench._sync_train_step(strategy, BatchNormalization(synchronized=True), x.shape)
        with traced():
            step()  # the graph, gradient included, is built by this first call
        steps[name] = step
    return steps


def time_sync_steps(shapes, repeats: int) -> list[dict]:
    return _timed(shapes, repeats, _sync_step_fns, "tfbn (fused grad kernel)")


def _timed(shapes, repeats: int, make_fns, reference: str) -> list[dict]:
    """Interleaved medians of `make_fns(x)`'s functions per shape, against `reference`."""
    rows = []
    for shape in shapes:
        times = bench._interleaved_medians(
            make_fns(tf.random.stateless_normal(shape, seed=(0, 0))), repeats
        )
        rows += [
            {"shape": shape, "variant": n, "us": t * 1e6, "x_tfbn": t / times[reference]}
            for n, t in times.items()
        ]
    return rows


def table(rows: list[dict], title: str, unit: str) -> str:
    lines = [title, "", f"| shape | variant | {unit} us | x tfbn |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['us']:.0f} | {r['x_tfbn']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = lambda text: tuple(int(d) for d in text.split(","))  # noqa: E731
    parser.add_argument(
        "--shape", dest="shapes", action="append", type=shape,
        help=f"layer input shape, e.g. 256,64 (repeatable; default {LAYER_SHAPES})",
    )  # fmt: skip
    parser.add_argument(
        "--moment-shape", dest="moment_shapes", action="append", type=shape,
        help=f"4D NHWC shape for the moments and sums (repeatable; default {MOMENT_SHAPES})",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=30, help="minimum timed rounds")
    args = parser.parse_args(argv)
    bench.split_cpu(4)  # before TensorFlow initialises: the synchronised steps need 4 replicas
    layers = time_layers(args.shapes or LAYER_SHAPES, args.repeats)
    print(table(layers, "Layer training step (forward, backward, update)", "train step"))
    print()
    shapes = args.moment_shapes or MOMENT_SHAPES
    moments = time_moments(shapes, args.repeats)
    print(table(moments, "Synchronised BN's local moments (forward only)", "moments"))
    print()
    sums = time_grad_sums(shapes, args.repeats)
    print(table(sums, "Synchronised BN's backward sums alone, one device", "sums"))
    print()
    steps = time_sync_steps(shapes, args.repeats)
    title = "Synchronised BN's training step on 4 replicas, by source of its backward sums"
    print(table(steps, title, "train step"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
