"""Benchmark: what BatchNorm costs at inference, exported folded vs Keras's `model.export()`.

Trains a small CNN (conv-BN-ReLU blocks) for a few steps so its BN statistics are
real, then exports, in one run:

- `tfbn folded`: `tfbn.export.export_saved_model` (BN folded into the convolutions);
- `tfbn unfolded`: the same model converted to tfbn's layer (`tfbn.convert_batch_norm`)
  and exported with `fold=False` (BN kept as a frozen normalisation);
- `keras export`: Keras's `model.export()` of the same trained model (BN kept as
  moving-statistics variables and a decomposed normalisation);
- `no BN`: the same architecture without BN layers (conv with bias), exported both
  ways, the baseline: what the network costs with BN gone entirely.

Every SavedModel is loaded with `tf.saved_model.load` and its `serving_default`
called at batch 1 and batch 64, round-robin: every round calls each model once.
The table gives median milliseconds and, as ratios, the median over rounds of
time / time of the no-BN model in the same round (robust to load from other
processes), against the no-BN model exported the same way (folded vs no BN
through tfbn's exporter; Keras export vs no BN through Keras's) and against the
tfbn-exported no-BN model.

`--model resnet50` / `--model efficientnetb0`: the Keras Applications architecture
(weights=None, 64x64 input, 10 classes) instead of the small CNN, and its no-BN twin
(every BN replaced by the identity; convolutions keep use_bias=False).

    python examples/bench_export.py                # README table
    python examples/bench_export.py --repeats 400 --json bench_export.json
    python examples/bench_export.py --model resnet50 --repeats 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfbn.convert import convert_batch_norm, rewrite_layers  # noqa: E402
from tfbn.export import export_saved_model  # noqa: E402

BATCH_SIZES = (1, 64)
MODELS = ("cnn", "resnet50", "efficientnetb0")


def build(use_bn: bool, size: int = 32, width: int = 32, seed: int = 0) -> keras.Model:
    """conv3x3-BN-ReLU blocks (two strided), global pooling, a 10-way Dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for filters, stride in ((width, 1), (width, 2), (2 * width, 1), (2 * width, 2)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=not use_bn)(x)
        if use_bn:
            x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))


class Identity(keras.layers.Layer):
    """Where a BN layer was, in an Application's no-BN twin."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def build_application(name: str, use_bn: bool, size: int = 64) -> keras.Model:
    """A Keras Application (weights=None); without BN every BN is the identity."""
    keras.utils.set_random_seed(0)
    make = {"resnet50": keras.applications.ResNet50,
            "efficientnetb0": keras.applications.EfficientNetB0}[name]  # fmt: skip
    model = make(weights=None, input_shape=(size, size, 3), classes=10)
    if use_bn:
        return model

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return Identity(name=layer.name)
        return None

    return rewrite_layers(model, replace, transfer=lambda old, new: None)[0]


def train(model: keras.Model, steps: int, size: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (steps * 32, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, steps * 32)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def serving_fn(path: str):
    """serving_default of a reloaded SavedModel, as `fn(x) -> first output`."""
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    out = next(iter(fn.structured_outputs))

    def call(x):
        return fn(**{name: x})[out]

    call.loaded = loaded  # keep the SavedModel alive
    return call


def interleaved_times(fns: dict, x: tf.Tensor, repeats: int, warmup: int = 10) -> dict:
    """Seconds per call of each function, `repeats` rounds, round-robin within a round.

    Round i of every function ran back to back, so the ratio of two functions'
    times in the same round is unaffected by load that drifts between rounds
    (other processes on a shared machine); `paired_ratio` takes their median.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn(x).numpy()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x).numpy()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict, name: str, baseline: str) -> float:
    """Median over rounds of time(name) / time(baseline) in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def run(
    repeats: int = 200, size: int = 32, width: int = 32, steps: int = 20, model: str = "cnn"
) -> list[dict]:
    if model == "cnn":
        bn_model, plain = build(True, size, width), build(False, size, width)
    else:
        bn_model, plain = (
            build_application(model, True, size),
            build_application(model, False, size),
        )
    train(bn_model, steps, size)
    if model == "cnn":  # a deep Application without BN does not train: timed as initialised
        train(plain, steps, size)
    with tempfile.TemporaryDirectory() as tmp:
        export_saved_model(bn_model, os.path.join(tmp, "folded"), version=1)
        export_saved_model(
            convert_batch_norm(bn_model), os.path.join(tmp, "unfolded"), version=1, fold=False
        )
        export_saved_model(plain, os.path.join(tmp, "plain"), version=1)
        bn_model.export(os.path.join(tmp, "keras"), verbose=False)
        plain.export(os.path.join(tmp, "keras_plain"), verbose=False)
        fns = {
            "tfbn folded": serving_fn(os.path.join(tmp, "folded", "1")),
            "tfbn unfolded": serving_fn(os.path.join(tmp, "unfolded", "1")),
            "keras export": serving_fn(os.path.join(tmp, "keras")),
            "no BN (tfbn export)": serving_fn(os.path.join(tmp, "plain", "1")),
            "no BN (keras export)": serving_fn(os.path.join(tmp, "keras_plain")),
        }
        x = np.random.default_rng(1).normal(1.0, 2.0, (64, size, size, 3)).astype("float32")
        folded_out = fns["tfbn folded"](tf.constant(x)).numpy()
        keras_out = fns["keras export"](tf.constant(x)).numpy()
        agree = float(np.max(np.abs(folded_out - keras_out)) / np.max(np.abs(keras_out)))
        baseline = {
            "tfbn folded": "no BN (tfbn export)",
            "tfbn unfolded": "no BN (tfbn export)",
            "keras export": "no BN (keras export)",
            "no BN (tfbn export)": "no BN (tfbn export)",
            "no BN (keras export)": "no BN (keras export)",
        }
        rows = []
        for batch in BATCH_SIZES:
            xb = tf.constant(x[:batch])
            reps = repeats if batch == 1 else max(repeats // 2, 3)
            times = interleaved_times(fns, xb, reps)
            for name, seconds in times.items():
                rows.append(
                    {
                        "batch": batch,
                        "export": name,
                        "ms": statistics.median(seconds) * 1e3,
                        "vs_no_bn": paired_ratio(times, name, baseline[name]),
                        "vs_no_bn_tfbn": paired_ratio(times, name, "no BN (tfbn export)"),
                        "vs_folded": paired_ratio(times, name, "tfbn folded"),
                        "folded_vs_keras_max_rel_diff": agree,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batch | SavedModel | median ms | x no-BN (same exporter) | x no-BN (tfbn export) "
        "| x tfbn folded |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['export']} | {r['ms']:.3f} | {r['vs_no_bn']:.3f} | "
            f"{r['vs_no_bn_tfbn']:.3f} | {r['vs_folded']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=200, help="timed rounds at batch 1 (batch 64: half)"
    )
    parser.add_argument(
        "--model", choices=MODELS, default="cnn",
        help="the small CNN (default) or a Keras Applications architecture at 64x64",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=int, help="input height and width (default: 32, Applications 64)"
    )
    parser.add_argument("--width", type=int, default=32, help="filters of the first block")
    parser.add_argument("--steps", type=int, default=20, help="training steps before export")
    parser.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    size = args.size or (32 if args.model == "cnn" else 64)
    rows = run(args.repeats, size, args.width, args.steps, args.model)
    print(format_table(rows))
    print(
        f"folded vs keras export outputs: max rel. difference {rows[0]['folded_vs_keras_max_rel_diff']:.1e}"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            meta = {"tf": tf.__version__, "keras": keras.__version__, "cpus": os.cpu_count()}
            json.dump({**meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
