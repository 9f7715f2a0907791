"""Synchronised BatchNorm under MirroredStrategy: every replica normalises with the global batch.

With 4 replicas and 4 examples each, plain BN computes its statistics over 4
examples per replica: noisy in training, and unlike the statistics inference sees.
Synchronised BN all-reduces them, so each replica normalises with the statistics
of all 16 examples. This script

1. splits the CPU into 4 logical devices (use GPUs instead where you have them)
   and creates a `tf.distribute.MirroredStrategy` over them;
2. builds an ordinary Keras CNN (keras.layers.BatchNormalization) in the
   strategy's scope, and `tfbn.convert_sync_batch_norm` rewrites every BN
   into `tfbn.BatchNormalization(synchronized=True)` (building with
   `tfbn.BatchNormalization(synchronized=True)` directly is the same);
3. shows `tfbn.lint_model` flags the unsynchronised small per-replica batches and
   not the converted model, trains with `model.fit`, and checks that 4 replicas
   really ran and that every replica holds the same moving statistics.

    python examples/mirrored_sync_bn.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

REPLICAS = 4


def cpu_replicas(n: int = REPLICAS) -> list[str]:
    """Splits the CPU into `n` logical devices; must run before TensorFlow initialises."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:  # already initialised (e.g. under pytest, whose conftest split it)
        pass
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < n:
        raise RuntimeError(
            f"need {n} logical CPUs, found {devices}: split the CPU before "
            "anything initialises TensorFlow"
        )
    return devices[:n]


import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tfbn  # noqa: E402


def build_cnn() -> keras.Model:
    """An existing model, as you may already have it: Keras's own BatchNormalization."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-replica-batch", type=int, default=4)
    args = parser.parse_args(argv)

    strategy = tf.distribute.MirroredStrategy(cpu_replicas())
    assert strategy.num_replicas_in_sync == REPLICAS, strategy.num_replicas_in_sync
    global_batch = args.per_replica_batch * strategy.num_replicas_in_sync

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    keras.utils.set_random_seed(0)
    with strategy.scope():  # variables created here are mirrored on the 4 replicas
        local = build_cnn()
        model = tfbn.convert_sync_batch_norm(local)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    bns = [layer for layer in model.layers if layer.name.startswith("bn")]
    assert all(isinstance(bn, tfbn.BatchNormalization) and bn.synchronized for bn in bns)

    print(
        f"{strategy.num_replicas_in_sync} replicas, {args.per_replica_batch} examples each "
        f"(global batch {global_batch})"
    )
    before = tfbn.lint_model(local, batch_size=global_batch, strategy=strategy)
    after = tfbn.lint_model(model, batch_size=global_batch, strategy=strategy)
    print(f"lint, Keras BN:        {[f'{f.rule} at {f.layer}' for f in before.findings]}")
    print(f"lint, synchronised BN: {[f'{f.rule} at {f.layer}' for f in after.findings] or 'OK'}")
    assert {f.rule for f in before.findings} == {"unsynced-small-batch"}, before.format()
    assert after.ok, after.format()

    # drop_remainder: a last batch smaller than the replica count leaves some replica an
    # empty shard, and TensorFlow's CPU Conv2D returns a wrongly shaped empty output for
    # it (Keras's own BN fails on it the same way).
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
    history = model.fit(
        train.batch(global_batch, drop_remainder=True), epochs=args.epochs, verbose=0, shuffle=False
    )
    test = tf.data.Dataset.from_tensor_slices((x, y)).batch(256, drop_remainder=True)
    loss, accuracy = (float(v) for v in model.evaluate(test, verbose=0))
    print(
        f"trained {args.epochs} epochs: loss {history.history['loss'][0]:.3f} -> {loss:.3f}, "
        f"accuracy {accuracy:.3f}"
    )
    assert accuracy > 0.8, accuracy

    # The moving statistics are mirrored: all 4 replicas hold the same values. (`.value`
    # is the tf.Variable behind the Keras variable: a MirroredVariable, one copy per replica.)
    for bn in bns:
        for name in ("moving_mean", "moving_variance"):
            copies = [
                np.asarray(c) for c in strategy.experimental_local_results(getattr(bn, name).value)
            ]
            assert len(copies) == REPLICAS and all(np.array_equal(c, copies[0]) for c in copies)
    print(f"moving statistics identical on all {REPLICAS} replicas for {[bn.name for bn in bns]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
