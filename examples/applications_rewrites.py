"""Keras Applications through tfbn's rewrites: convert, train under a strategy, freeze, fold, export.

For each model (weights=None, small inputs, 10 classes; nothing is downloaded):

1. build it outside any strategy, as a user's existing model;
2. `with strategy.scope(): model = tfbn.convert_sync_batch_norm(model)`, compile and
   `fit` two steps on 2 replicas (the CPU split into 2 logical devices); the
   original model's variables must be untouched;
3. `tfbn.freeze_batch_norm`: outputs equal `model(x, training=False)` (inference: the
   models with dropout would drop in training mode);
4. `tfbn.fold_batch_norm`: how many BN layers folded / froze, and the folded model's
   max relative error against `model(x, training=False)`;
5. `tfbn.export_saved_model` (folded) with its gate (parity, batch-size invariance,
   training-mode lint) passing.

It prints one Markdown table row per model (the README's table). Run:

    python examples/applications_rewrites.py                    # all eight
    python examples/applications_rewrites.py --models ResNet50 MobileNetV2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

REPLICAS = 2

# name -> input side (the smallest each architecture accepts, rounded up)
APPLICATIONS = {
    "ResNet50": 32,
    "ResNet50V2": 32,
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "EfficientNetB0": 32,
    "DenseNet121": 32,
    "Xception": 71,
    "InceptionV3": 75,
}


def cpu_replicas(n: int = REPLICAS) -> list[str]:
    """Splits the CPU into `n` logical devices; must run before TensorFlow initialises."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:  # already initialised (e.g. under pytest, whose conftest split it)
        pass
    return [d.name for d in tf.config.list_logical_devices("CPU")][:n]


def rel_error(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def trained_like(model, rng) -> None:
    """Statistics, gamma and beta as after training (a fresh model's are 0/1, which
    would make freezing and folding trivially exact)."""
    import tfbn

    for bn in tfbn.convert.batch_norm_layers(model):
        shape = bn.moving_mean.shape
        bn.moving_mean.assign(rng.normal(0.0, 0.2, shape))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, shape))
        if bn.gamma is not None:
            bn.gamma.assign(rng.uniform(0.5, 1.5, shape))
        if bn.beta is not None:
            bn.beta.assign(rng.normal(0.0, 0.2, shape))


def run_one(name: str, side: int, strategy, batch: int = 8, seed: int = 0) -> dict:
    import keras
    import numpy as np

    import tfbn

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    original = getattr(keras.applications, name)(
        weights=None, input_shape=(side, side, 3), classes=10, classifier_activation=None
    )
    trained_like(original, rng)
    before = [np.array(v.numpy()) for v in original.variables]
    n_bn = len(tfbn.convert.batch_norm_layers(original))

    with strategy.scope():
        model = tfbn.convert_sync_batch_norm(original)
        model.compile(keras.optimizers.SGD(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    assert strategy.num_replicas_in_sync == REPLICAS
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.variables)
    x = rng.uniform(-1, 1, (2 * batch, side, side, 3)).astype("float32")
    y = rng.integers(0, 10, 2 * batch)
    loss = model.fit(x, y, batch_size=batch, epochs=1, verbose=0).history["loss"][-1]
    assert np.isfinite(loss), f"{name}: loss {loss}"
    untouched = all(np.array_equal(a, v.numpy()) for a, v in zip(before, original.variables))
    assert untouched, f"{name}: training the converted model changed the original"

    xs = x[:4]
    reference = model(xs, training=False)
    frozen = tfbn.freeze_batch_norm(model)
    freeze_err = rel_error(frozen(xs, training=False), reference)
    folded, report = tfbn.fold_batch_norm(model, return_report=True)
    fold_err = rel_error(folded(xs), reference)
    with tempfile.TemporaryDirectory() as tmp:
        result = tfbn.export_saved_model(model, os.path.join(tmp, name.lower()), sample_inputs=xs)
    parity = max(result.gate.parity.values())
    return {
        "name": name,
        "input": f"{side}x{side}",
        "bn": n_bn,
        "loss": float(loss),
        "freeze_err": freeze_err,
        "folded": len(report.folded),
        "frozen": len(report.frozen),
        "fold_err": fold_err,
        "gate": result.gate.ok,
        "parity": parity,
        "seconds": time.perf_counter() - start,
    }


HEADER = (
    "| model | input | BN layers | convert + fit 2 steps (2 replicas), original untouched "
    "| freeze: max rel. err | fold: folded / frozen | fold: max rel. err | export gate (parity) | s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['name']} | {r['input']} | {r['bn']} | yes (loss {r['loss']:.2f}) "
        f"| {r['freeze_err']:.1e} | {r['folded']} / {r['frozen']} | {r['fold_err']:.1e} "
        f"| {'passed' if r['gate'] else 'FAILED'} ({r['parity']:.1e}) | {r['seconds']:.0f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(APPLICATIONS),
                        choices=list(APPLICATIONS), help="which applications to run")  # fmt: skip
    args = parser.parse_args(argv)
    strategy = tf.distribute.MirroredStrategy(cpu_replicas())
    print(HEADER, flush=True)
    failed = 0
    for name in args.models:
        try:
            r = run_one(name, APPLICATIONS[name], strategy)
        except Exception as err:  # noqa: BLE001 - one row per model, failures included
            failed += 1
            print(f"| {name} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]} |",
                  flush=True)  # fmt: skip
            continue
        print(row(r), flush=True)
        failed += not r["gate"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
