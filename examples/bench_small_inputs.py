"""Benchmark: where a training step of tfbn's layer spends its time on small inputs.

On inputs of a few thousand values a BN training step is a few dozen small ops, and
fixed per-op costs decide. This times, in one run and interleaved (the same timer as
`tfbn bench`), Keras's layer, tfbn's, and tfbn's with parts of its moving-statistics
update switched off:

- `tfbn`: the layer as shipped;
- `no counters`: without the three int64 counters (`num_batches_tracked`,
  `num_skipped_updates`, `num_single_value_batches`);
- `no counters, no guard`: also without the non-finite guard (every batch is applied);
- `no update`: no moving-statistics update at all (forward and backward only).

    python examples/bench_small_inputs.py                  # README numbers
    python examples/bench_small_inputs.py --shape 32,128 --shape 1024,256
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfbn import bench  # noqa: E402
from tfbn.layers import BatchNormalization  # noqa: E402


class NoCounters(BatchNormalization):
    """The update with the non-finite guard, without the counters."""

    def _update_moving_stats(self, mean, variance, count):
        finite = tf.reduce_all(tf.math.is_finite(mean)) & tf.reduce_all(tf.math.is_finite(variance))
        for moving, new in self._moving_targets(mean, variance, variance):
            moving.assign(tf.where(finite, new, moving))


class NoGuard(BatchNormalization):
    """The plain exponential moving average, as Keras's layer updates."""

    def _update_moving_stats(self, mean, variance, count):
        for moving, new in self._moving_targets(mean, variance, variance):
            moving.assign(new)


class NoUpdate(BatchNormalization):
    """Forward and backward only."""

    def _update_moving_stats(self, mean, variance, count):
        pass


VARIANTS = {
    "keras": keras.layers.BatchNormalization,
    "tfbn": BatchNormalization,
    "no counters": NoCounters,
    "no counters, no guard": NoGuard,
    "no update": NoUpdate,
}


def run(shapes, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        x = tf.random.stateless_normal(shape, seed=(0, 0))
        steps = {
            name: bench._layer_steps(make(), x, jit=False)[0] for name, make in VARIANTS.items()
        }
        times = bench._interleaved_medians(steps, repeats)
        for name, seconds in times.items():
            rows.append(
                {
                    "shape": list(shape),
                    "variant": name,
                    "train_us": seconds * 1e6,
                    "vs_keras": seconds / times["keras"],
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| shape | variant | train step us | x Keras |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['variant']} | {r['train_us']:.0f} | {r['vs_keras']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        dest="shapes",
        action="append",
        type=lambda text: tuple(int(d) for d in text.split(",")),
        help="input shape, e.g. 256,64 (repeatable; default (256, 64) and (32, 128))",
    )
    parser.add_argument("--repeats", type=int, default=200, help="minimum timed rounds")
    args = parser.parse_args(argv)
    print(format_table(run(args.shapes or [(256, 64), (32, 128)], args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
