"""tfbn demo: train a small CNN with tfbn BatchNormalization on scikit-learn's digits.

Run with `make demo`. Trains Conv-BN-ReLU blocks (bias-free convolutions: BN's
beta absorbs the bias) on the 8x8 handwritten digits that ship inside
scikit-learn, then prints test accuracy and checks that inference does not
depend on the batch an example lands in.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import tfbn  # noqa: E402


def load_data(seed: int = 0):
    """Digits as (N, 8, 8, 1) float32 in [0, 1], split 80/20, stratified."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)


def build_cnn(bn=tfbn.BatchNormalization, **bn_kwargs) -> keras.Model:
    """Conv-BN-ReLU x2, global pooling, dense softmax.

    The demo trains for only ~200 steps, so BN uses momentum 0.9: with Keras's
    default 0.99 the moving statistics would still be ~13% initial values
    (0.99**200) and inference accuracy would collapse, for Keras's layer alike.
    """
    bn_kwargs.setdefault("momentum", 0.9)

    def block(x, filters):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = bn(**bn_kwargs)(x)
        return keras.layers.ReLU()(x)

    inputs = keras.Input((8, 8, 1), name="image")
    x = block(inputs, 32)
    x = keras.layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=2)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)

    batch = model.predict(x_test, batch_size=len(x_test), verbose=0)
    singles = np.concatenate([model(x_test[i : i + 1], training=False) for i in range(len(x_test))])
    drift = float(np.max(np.abs(batch - singles)))

    print()
    print(f"{'train examples':<34}{len(x_train)}")
    print(f"{'test examples':<34}{len(x_test)}")
    print(f"{'training time':<34}{seconds:.1f} s")
    print(f"{'test accuracy':<34}{accuracy:.4f}")
    print(f"{'batch vs single-example max diff':<34}{drift:.2e}")
    return 0 if accuracy > 0.9 and drift < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
