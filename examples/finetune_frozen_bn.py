"""Fine-tuning with frozen BatchNorm: keep the pretrained statistics while the weights adapt.

Pretrains a small CNN on scikit-learn's digits 0-4, then fine-tunes it on digits
5-9 with small batches. `tfbn.freeze_batch_norm(model)` returns a new model whose
BN layers are `FrozenBatchNormalization`: they normalise with the pretrained
moving statistics whatever `training` says and never update them, so small,
differently distributed fine-tuning batches cannot corrupt them (the usual recipe
for fine-tuning detection/segmentation backbones). The script asserts the
statistics are bit-for-bit unchanged after fine-tuning, then
`tfbn.unfreeze_batch_norm` turns the layers back into trainable
`tfbn.BatchNormalization` with the same statistics, outputs and momentum.

    python examples/finetune_frozen_bn.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tfbn  # noqa: E402


def build_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = tfbn.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def bn_statistics(model: keras.Model) -> dict[str, np.ndarray]:
    """{"bn1/moving_mean": array, ...} for every BN layer, frozen or not."""
    return {
        f"{layer.name}/{name}": keras.ops.convert_to_numpy(getattr(layer, name))
        for layer in model.layers if layer.name.startswith("bn")
        for name in ("moving_mean", "moving_variance")
    }  # fmt: skip


def accuracy(model: keras.Model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def compile_(model: keras.Model, learning_rate: float) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy"
    )
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    first, second = y < 5, y >= 5
    keras.utils.set_random_seed(0)

    # 1. Pretrain on digits 0-4 (batches of 64: good batch statistics).
    model = compile_(build_cnn(), 1e-2)
    model.fit(x[first], y[first], batch_size=64, epochs=args.pretrain_epochs, verbose=0)
    print(
        f"pretrained on 0-4: accuracy {accuracy(model, x[first], y[first]):.3f} on 0-4, "
        f"{accuracy(model, x[second], y[second]):.3f} on 5-9"
    )
    pretrained = bn_statistics(model)

    # 2. Freeze BN and fine-tune everything else on 5-9 with batches of 8.
    frozen = tfbn.freeze_batch_norm(model)
    print(
        "frozen:",
        ", ".join(
            f"{layer.name} -> {type(layer).__name__}"
            for layer in frozen.layers
            if layer.name.startswith("bn")
        ),
    )
    assert all(
        isinstance(frozen.get_layer(f"bn{i}"), tfbn.FrozenBatchNormalization) for i in (1, 2)
    )
    compile_(frozen, 3e-3).fit(
        x[second], y[second], batch_size=8, epochs=args.finetune_epochs, verbose=0
    )
    acc = accuracy(frozen, x[second], y[second])
    print(f"fine-tuned on 5-9 with frozen BN: accuracy {acc:.3f} on 5-9")
    assert acc > 0.8, acc
    after = bn_statistics(frozen)
    for key, value in pretrained.items():  # training=True did not touch the statistics
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    print(f"BN statistics unchanged by fine-tuning: {len(after)} arrays identical")

    # 3. Round trip: trainable tfbn BN again, same statistics, same outputs, same momentum.
    unfrozen = tfbn.unfreeze_batch_norm(frozen)
    bn1 = unfrozen.get_layer("bn1")
    assert type(bn1) is tfbn.BatchNormalization and bn1.trainable and bn1.momentum == 0.9
    for key, value in bn_statistics(unfrozen).items():
        np.testing.assert_array_equal(value, after[key], err_msg=key)
    probe = x[second][:32]
    np.testing.assert_allclose(
        unfrozen.predict(probe, verbose=0), frozen.predict(probe, verbose=0), rtol=1e-5, atol=1e-6
    )
    unfrozen(probe, training=True)  # an unfrozen layer updates its statistics again
    moved = not np.array_equal(
        keras.ops.convert_to_numpy(bn1.moving_mean), after["bn1/moving_mean"]
    )
    print(
        f"unfrozen: {type(bn1).__name__}(momentum={bn1.momentum}), same outputs, "
        f"statistics update again: {moved}"
    )
    assert moved
    return 0


if __name__ == "__main__":
    sys.exit(main())
