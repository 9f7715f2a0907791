"""Quick start: tfbn.BatchNormalization is a drop-in replacement for keras.layers.BatchNormalization.

Builds the same small digits classifier twice, once with Keras's BatchNormalization
and once with tfbn's (same arguments, same weight names and order), copies the
weights across with `set_weights`, checks both give the same outputs in inference
and in training mode, then trains the tfbn model for a few steps. An existing
Keras model converts in one call: `tfbn.convert_batch_norm(model)`.

    python examples/quickstart.py
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


def build_model(batch_norm) -> keras.Model:
    """Dense (no bias: BN's beta is the bias) -> BN -> ReLU -> softmax, with `batch_norm` the BN class."""
    inputs = keras.Input((64,), name="pixels")
    x = keras.layers.Dense(64, use_bias=False, name="hidden")(inputs)
    x = batch_norm(momentum=0.9, name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # (1797, 64) in [0, 1]
    y = digits.target
    keras.utils.set_random_seed(0)

    # 1. The same model with either layer; copy the weights across.
    reference = build_model(keras.layers.BatchNormalization)
    model = build_model(tfbn.BatchNormalization)
    model.set_weights(reference.get_weights())
    names = lambda layer: [w.name for w in layer.weights]  # noqa: E731
    assert (
        names(model.get_layer("bn"))
        == names(reference.get_layer("bn"))
        == ["gamma", "beta", "moving_mean", "moving_variance"]
    )

    # Or, for a model you already have, in one call (arguments, names, weights and
    # dtype policy kept; the result is a new model with its own variables).
    converted = tfbn.convert_batch_norm(reference)
    assert isinstance(converted.get_layer("bn"), tfbn.BatchNormalization)
    diff = float(
        np.max(np.abs(keras.ops.convert_to_numpy(converted(x[:128]) - reference(x[:128]))))
    )
    print(f"tfbn.convert_batch_norm(reference): max |tfbn - keras| = {diff:.1e}")
    assert diff < 1e-5, diff

    # 2. Same outputs, inference and training mode (the batch statistics of the same batch).
    batch = x[:128]
    for training in (False, True):
        want = keras.ops.convert_to_numpy(reference(batch, training=training))
        got = keras.ops.convert_to_numpy(model(batch, training=training))
        diff = float(np.max(np.abs(got - want)))
        print(f"training={training!s:<5}  max |tfbn - keras| = {diff:.1e}")
        assert diff < 1e-5, diff
    # Training mode updated both layers' moving statistics the same way.
    for ours, theirs in zip(
        model.get_layer("bn").get_weights(), reference.get_layer("bn").get_weights(), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)

    # 3. Train the tfbn model a few steps; it learns and its statistics track the data.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0)
    accuracy = float(model.evaluate(x, y, verbose=0)[1])
    bn = model.get_layer("bn")
    print(
        f"trained {args.epochs} epochs: loss {history.history['loss'][0]:.3f} -> "
        f"{history.history['loss'][-1]:.3f}, accuracy {accuracy:.3f}, "
        f"{int(bn.num_batches_tracked.numpy())} batches tracked by '{bn.name}'"
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert accuracy > 0.9, accuracy
    return 0


if __name__ == "__main__":
    sys.exit(main())
