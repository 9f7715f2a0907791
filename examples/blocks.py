"""Building blocks: Conv-BN-ReLU and the pre-activation residual block, with bias-free convolutions.

A convolution that feeds BatchNormalization needs no bias: BN subtracts each
channel's mean, so the bias cancels, and BN's beta is the offset. This script
builds a tiny ResNet-ish network for scikit-learn's 8x8 digits from

- `conv_bn_relu`: Conv(use_bias=False) -> BN -> ReLU (the stem), and
- `preact_residual_block`: x + Conv(ReLU(BN(Conv(ReLU(BN(x)))))), the
  "identity mappings" block of He et al. (2016), BN-ReLU before each convolution,

trains it a few steps, and shows that `tfbn.lint_model` finds nothing on it,
while on the same network built with `use_bias=True` it reports the
`bias-before-bn` finding for exactly the convolutions that feed a BN.

    python examples/blocks.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tfbn  # noqa: E402


def conv_bn_relu(x, filters: int, name: str, use_bias: bool = False):
    """Conv -> BN -> ReLU. The convolution has no bias: BN's beta replaces it."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=use_bias, name=f"{name}_conv")(x)
    x = tfbn.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def preact_residual_block(x, filters: int, name: str, use_bias: bool = False):
    """Pre-activation residual block: BN -> ReLU -> Conv, twice, plus the identity shortcut."""
    y = tfbn.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(x)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=use_bias, name=f"{name}_conv1")(y)
    y = tfbn.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    # conv2 feeds the addition, not a BN, so a bias there is not flagged (the next
    # block's BN would still cancel it; ResNet v2 leaves it out too).
    y = layers.Conv2D(filters, 3, padding="same", use_bias=use_bias, name=f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([x, y])


def tiny_resnet(use_bias: bool = False) -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = conv_bn_relu(inputs, 16, "stem", use_bias)
    x = preact_residual_block(x, 16, "block1", use_bias)
    x = preact_residual_block(x, 16, "block2", use_bias)
    # A pre-activation network ends with BN-ReLU: the last block's sum is not normalised otherwise.
    x = tfbn.BatchNormalization(momentum=0.9, name="final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="tiny_resnet" + ("_biased" if use_bias else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    y = digits.target
    keras.utils.set_random_seed(0)

    model = tiny_resnet()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    before = float(model.evaluate(x, y, verbose=0)[0])
    model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0)
    loss, accuracy = (float(v) for v in model.evaluate(x, y, verbose=0))
    print(
        f"{model.name}: {model.count_params()} parameters, {args.epochs} epochs: "
        f"loss {before:.3f} -> {loss:.3f}, accuracy {accuracy:.3f}"
    )
    assert loss < before and accuracy > 0.5, (before, loss, accuracy)

    # The lint: nothing on the bias-free network ...
    report = tfbn.lint_model(model, batch_size=64)
    print(report.format())
    assert report.ok, report.format()

    # ... and `bias-before-bn` on each convolution that feeds a BN once it has a bias.
    biased = tiny_resnet(use_bias=True)
    report = tfbn.lint_model(biased, batch_size=64)
    print(report.format())
    flagged = {f.layer for f in report.findings if f.rule == "bias-before-bn"}
    assert flagged == {"stem_conv", "block1_conv1", "block2_conv1"}, flagged
    assert all(f.rule == "bias-before-bn" for f in report.findings), report.format()
    return 0


if __name__ == "__main__":
    sys.exit(main())
