"""tfbn running-statistics lifecycle: schedule, watch, inspect, lint, recalibrate.

Trains a small BN classifier on synthetic data with a momentum schedule and
TensorBoard histograms, then moves it to a new "domain" (the same data seen
through a different sensor: every input scaled by 3 and shifted by 5). The
running statistics now describe the old domain and accuracy collapses;
`tfbn.recalibrate` on *unlabelled* new-domain data measures the new statistics
and recovers the accuracy without training a single weight.

    python examples/running_stats.py --out /tmp/tfbn_stats
    tensorboard --logdir /tmp/tfbn_stats/tb        # histograms per epoch

Writes `momentum.png` (running mean/variance, static vs scheduled momentum).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402
from tfbn.callbacks import plot_running_stats  # noqa: E402


def make_data(n: int, seed: int):
    """Two Gaussian classes in 8-D, separable by a non-linear boundary."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).astype("float32")
    return x, y


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8,), name="features"),
            keras.layers.Dense(64, use_bias=False),  # BN's beta absorbs the bias
            tfbn.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Dense(32, use_bias=False),
            tfbn.BatchNormalization(name="bn2"),
            keras.layers.ReLU(),
            keras.layers.Dense(1, activation="sigmoid"),
        ],
        name="classifier",
    )


def accuracy(model, x, y) -> float:
    p = model.predict(x, batch_size=256, verbose=0)[:, 0]
    return float(np.mean((p > 0.5) == y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="tfbn_stats_")
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(0)

    x, y = make_data(4096, seed=0)
    x_test, y_test = make_data(1024, seed=1)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")

    print("lint before training:")
    print(tfbn.lint_model(model, batch_size=args.batch_size))
    print("\ninspect before training (statistics never updated):")
    print(tfbn.inspect_model(model))

    # Low momentum first (statistics follow the fast-changing early activations),
    # high momentum at the end (smooth, low-noise statistics for inference).
    scheduler = tfbn.BatchNormMomentumScheduler("exponential", start=0.8, end=0.99, per="step")
    history = model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
        callbacks=[scheduler, tfbn.BatchNormStatsCallback(os.path.join(out, "tb"))],
    )  # fmt: skip
    print(f"\ntrained {args.epochs} epochs; momentum per epoch: "
          f"{[round(m, 4) for m in history.history['bn_momentum']]}")  # fmt: skip
    print("\ninspect after training:")
    print(tfbn.inspect_model(model))

    source_acc = accuracy(model, x_test, y_test)
    shift = lambda v: v * 3.0 + 5.0  # noqa: E731 - the new sensor
    shifted_acc = accuracy(model, shift(x_test), y_test)
    unlabelled = tf.data.Dataset.from_tensor_slices(shift(x)).batch(256)
    trainable = [w.numpy().copy() for w in model.trainable_weights]
    print("\n" + str(tfbn.recalibrate(model, unlabelled, progress=False)))
    unchanged = all(
        np.array_equal(a, w.numpy())
        for a, w in zip(trainable, model.trainable_weights, strict=True)
    )
    recalibrated_acc = accuracy(model, shift(x_test), y_test)
    print(f"test accuracy: source domain {source_acc:.3f} | new domain {shifted_acc:.3f} | "
          f"new domain after recalibrate {recalibrated_acc:.3f} "
          f"(trainable weights unchanged: {unchanged})")  # fmt: skip

    # What a static 0.99 momentum does to the first BN layer's statistics early in training.
    first = keras.Sequential(model.layers[:1])
    steps = min(60, len(x) // args.batch_size)
    batches = [first(x[i * args.batch_size : (i + 1) * args.batch_size]).numpy()
               for i in range(steps)]  # fmt: skip
    png = os.path.join(out, "momentum.png")
    plot_running_stats(png, batches, "exponential", static_momentum=0.99, start=0.8, end=0.99)
    print(f"wrote {png} and TensorBoard histograms under {os.path.join(out, 'tb')}")
    return 0 if unchanged and recalibrated_acc >= source_acc - 0.02 else 1


if __name__ == "__main__":
    raise SystemExit(main())
