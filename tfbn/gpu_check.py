"""`make gpu-check` / `tfbn gpu-check`: what tfbn assumes about GPUs, checked on the user's GPUs.

tfbn is developed and tested on CPUs only. This script runs, on a machine with one
or more GPUs and TensorFlow's GPU build, the checks that only a GPU can answer and
prints one PASS/FAIL/SKIP table plus JSON (`--json PATH`):

- `fused_<NHWC|NCHW>_<dtype>`: the fused path against the unfused path and against
  `keras.layers.BatchNormalization` (training output, input/gamma/beta gradients,
  moving statistics, inference output), float32/float16/bfloat16.
- `epsilon_floor_<NHWC|NCHW>_<dtype>`: cuDNN documents `epsilon >= CUDNN_BN_MIN_EPSILON`
  (1e-5 in old versions). tfbn never sends a smaller epsilon to the fused kernel
  (`fused="auto"` falls back to the unfused path); checked for epsilon in
  (1e-7, 1e-6, 1.001e-5, 1e-3) against `fused=False`, training and inference.
- `raw_fused_epsilon_1e-7`: records what TensorFlow's raw FusedBatchNormV3 does with
  epsilon 1e-7 on the GPU (passes it through, or clamps it to 1e-5); informational.
- `one_value_per_channel`: the fused kernel in training with one value per channel
  gives variance 0 (not NaN from a Bessel factor), as on CPU.
- `mirrored_sync_parity`: MirroredStrategy over all visible GPUs (NCCL all-reduce):
  synchronised BN equals single-device BN on the global batch, and a training step
  issues exactly 2 all-reduces per layer (`tfbn.bench.communication`). Needs 2+ GPUs.
- `xla_fit`: `model.fit(..., jit_compile=True)` of a small CNN with tfbn BN: finite
  losses, moving statistics updated, inference equal to the non-XLA model's.
- `mixed_float16_fit`: `mixed_float16` fit with loss scaling: finite, statistics float32.
- `bench_layer`: `tfbn bench` on the GPU; PASS when tfbn's training step is never
  slower than Keras's layer (the table is in the JSON).

Without a GPU every check is SKIPPED with the reason, and the exit code is 0; with
GPUs the exit code is 1 when any check FAILS. Takes a few minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# Tolerances per dtype: max |a - b| / max(1, max |b|). float16/bfloat16 round at
# 2^-11 / 2^-8 of the value; the reductions of different kernels differ by that.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}
EPSILONS = (1e-7, 1e-6, 1.001e-5, 1e-3)


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def _rel_diff(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0) / max(1.0, float(np.max(np.abs(b), initial=0))))


def _train_step(layer, x, dy):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return [y, *grads]


def _data(shape, dtype, seed=0, loc=2.0, scale=3.0):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = tf.cast(tf.constant(rng.normal(loc, scale, shape).astype("float32")), dtype)
    dy = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    return x, dy


def _compare_layers(make_a, make_b, shape, axis, dtype, steps=2, seed=0) -> float:
    """Max relative difference between two BN layers over training steps, moving
    statistics and inference."""
    import tensorflow as tf

    a, b = make_a(), make_b()
    for layer in (a, b):
        layer.build(shape)
    b.set_weights(a.get_weights())
    worst = 0.0
    for step in range(steps):
        x, dy = _data(shape, dtype, seed + step)
        got = tf.function(lambda x, dy: _train_step(a, x, dy))(x, dy)
        want = tf.function(lambda x, dy: _train_step(b, x, dy))(x, dy)
        worst = max(worst, *(_rel_diff(g, w) for g, w in zip(got, want, strict=True)))
    worst = max(
        worst,
        _rel_diff(a.moving_mean, b.moving_mean),
        _rel_diff(a.moving_variance, b.moving_variance),
    )
    x, _ = _data(shape, dtype, seed + 99)
    return max(worst, _rel_diff(a(x, training=False), b(x, training=False)))


def _shape_axis(layout):
    return ((8, 6, 6, 16), -1) if layout == "NHWC" else ((8, 16, 6, 6), 1)


# ------------------------------------------------------------------ checks --


def check_fused(layout: str, dtype: str) -> Callable[[str], Check]:
    def run(device):
        import keras
        import tensorflow as tf

        import tfbn

        shape, axis = _shape_axis(layout)
        tol = TOLERANCE[dtype]
        with tf.device(device):
            unfused = _compare_layers(
                lambda: tfbn.BatchNormalization(axis=axis),
                lambda: tfbn.BatchNormalization(axis=axis, fused=False),
                shape,
                axis,
                dtype,
            )
            keras_diff = _compare_layers(
                lambda: tfbn.BatchNormalization(axis=axis),
                lambda: keras.layers.BatchNormalization(axis=axis),
                shape,
                axis,
                dtype,
            )
        ok = unfused <= tol and keras_diff <= tol
        return Check(
            f"fused_{layout}_{dtype}",
            "PASS" if ok else "FAIL",
            f"vs unfused {unfused:.1e}, vs Keras {keras_diff:.1e} (tolerance {tol:g})",
            data={"vs_unfused": unfused, "vs_keras": keras_diff, "tolerance": tol},
        )

    return run


def check_epsilon_floor(layout: str, dtype: str) -> Callable[[str], Check]:
    def run(device):
        import tensorflow as tf

        import tfbn

        shape, axis = _shape_axis(layout)
        tol = {"float32": 1e-5, "float16": 3e-3}[dtype]
        diffs = {}
        with tf.device(device):
            for eps in EPSILONS:
                # Small variances (std 1e-3), where an epsilon of 1e-5 instead of 1e-7 shows.
                def make(fused, eps=eps):
                    return lambda: tfbn.BatchNormalization(axis=axis, epsilon=eps, fused=fused)

                a, b = make("auto")(), make(False)()
                for layer in (a, b):
                    layer.build(shape)
                x, dy = _data(shape, dtype, loc=0.0, scale=1e-3)
                got = tf.function(lambda x, dy, a=a: _train_step(a, x, dy))(x, dy)
                want = tf.function(lambda x, dy, b=b: _train_step(b, x, dy))(x, dy)
                out = max(
                    _rel_diff(got[0], want[0]),
                    _rel_diff(a(x, training=False), b(x, training=False)),
                )
                stats = max(
                    _rel_diff(a.moving_mean, b.moving_mean),
                    _rel_diff(a.moving_variance, b.moving_variance),
                )
                diffs[str(eps)] = {"outputs": out, "moving_stats": stats}
        ok = all(d["outputs"] <= tol and d["moving_stats"] <= 1e-6 for d in diffs.values())
        worst = max(d["outputs"] for d in diffs.values())
        return Check(
            f"epsilon_floor_{layout}_{dtype}",
            "PASS" if ok else "FAIL",
            f"epsilon {EPSILONS}: fused='auto' vs fused=False, worst output diff "
            f"{worst:.1e} (tolerance {tol:g}, statistics 1e-6)",
            data=diffs,
        )

    return run


def check_raw_epsilon(device) -> Check:
    """What FusedBatchNormV3 itself does with epsilon 1e-7 here (informational)."""
    import numpy as np
    import tensorflow as tf

    x, _ = _data((4, 3, 3, 8), "float32", loc=0.0, scale=1e-3)
    ones, zeros = tf.ones([8]), tf.zeros([8])
    try:
        with tf.device(device):
            y = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=ones,
                offset=zeros,
                mean=zeros,
                variance=ones,
                epsilon=1e-7,
                is_training=True,
            )[0]
    except tf.errors.OpError as error:
        return Check(
            "raw_fused_epsilon_1e-7",
            "PASS",
            f"the raw op refuses it: {error.message[:200]}",
            data={"behaviour": "error"},
        )
    xn = np.asarray(x, np.float64)
    var = xn.var((0, 1, 2))
    expected = {e: (xn - xn.mean((0, 1, 2))) / np.sqrt(var + e) for e in (1e-7, 1e-5)}
    diffs = {str(e): _rel_diff(y, v) for e, v in expected.items()}
    behaviour = "passes 1e-7 through" if diffs["1e-07"] < diffs["1e-05"] else "clamps to ~1e-5"
    return Check(
        "raw_fused_epsilon_1e-7",
        "PASS",
        f"the raw op {behaviour} ({diffs})",
        data={"behaviour": behaviour, "diffs": diffs},
    )


def check_one_value(device) -> Check:
    import numpy as np
    import tensorflow as tf

    import tfbn

    with tf.device(device):
        layer = tfbn.BatchNormalization(momentum=0.5, beta_initializer="ones")
        layer.build((1, 1, 1, 4))
        y = layer(tf.fill([1, 1, 1, 4], 3.0), training=False)
        # Training needs > 1 value per channel (PyTorch's rule); the kernel itself:
        out = tf.raw_ops.FusedBatchNormV3(
            x=tf.fill([1, 1, 1, 4], 3.0),
            scale=tf.ones([4]),
            offset=tf.ones([4]),
            mean=tf.zeros([4]),
            variance=tf.ones([4]),
            epsilon=1e-3,
            is_training=True,
        )
    var = np.asarray(out[2])
    ok = np.all(var == 0) and np.all(np.isfinite(np.asarray(out[0]))) and np.all(np.isfinite(y))
    return Check(
        "one_value_per_channel",
        "PASS" if ok else "FAIL",
        f"fused kernel batch variance {var.tolist()} (expected 0), output finite",
        data={"variance": var.tolist()},
    )


def check_mirrored(gpus: list[str]) -> Callable[[str], Check]:
    def run(device):
        import keras
        import numpy as np
        import tensorflow as tf

        import tfbn
        from tfbn import bench

        if len(gpus) < 2:
            return Check(
                "mirrored_sync_parity", "SKIP", f"needs 2 or more GPUs; {len(gpus)} visible"
            )
        strategy = tf.distribute.MirroredStrategy(gpus)
        replicas = strategy.num_replicas_in_sync
        rng = np.random.default_rng(0)
        shape = (None, 6, 6, 8)
        xs = [rng.normal(2, 3, (4, 6, 6, 8)).astype("float32") for _ in range(replicas)]
        weights = [rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.5, 8), np.zeros(8), np.ones(8)]
        with strategy.scope():
            layers = [tfbn.SyncBatchNormalization(), tfbn.SyncBatchNormalization()]
            model = keras.Sequential([keras.Input(shape[1:]), *layers])
        for layer in layers:
            layer.set_weights(weights)
        ref = keras.Sequential(
            [keras.Input(shape[1:]), tfbn.BatchNormalization(), tfbn.BatchNormalization()]
        )
        for layer in ref.layers:
            layer.set_weights(weights)
        x = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(xs[ctx.replica_id_in_sync_group])
        )

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, training=True)
            return y, tape.gradient(tf.reduce_sum(y * y), x)

        fn = tf.function(lambda x: strategy.run(step, (x,)))
        counts = bench.communication(fn, x, replicas=replicas)
        y, dx = fn(x)
        with tf.GradientTape() as tape:
            xr = tf.constant(np.concatenate(xs))
            tape.watch(xr)
            yr = ref(xr, training=True)
        dxr = tape.gradient(tf.reduce_sum(yr * yr), xr)
        local = lambda v: np.concatenate(strategy.experimental_local_results(v))  # noqa: E731
        diff = max(
            _rel_diff(local(y), yr),
            _rel_diff(local(dx), dxr),
            _rel_diff(model.layers[-1].moving_mean, ref.layers[-1].moving_mean),
        )
        per_layer = {k: v / len(layers) for k, v in counts.items()}
        ok = diff <= 1e-4 and per_layer == {"all_reduce": 2, "to_one_device": 0, "broadcast": 0}
        return Check(
            "mirrored_sync_parity",
            "PASS" if ok else "FAIL",
            f"{replicas} GPUs: diff vs one device {diff:.1e} (tolerance 1e-4); per layer "
            f"and step {per_layer} (expected 2 all-reduces, nothing else)",
            data={"diff": diff, "per_layer": per_layer, "replicas": replicas},
        )

    return run


def _small_cnn(tfbn, keras, policy=None):
    inputs = keras.Input((16, 16, 3))
    h = inputs
    for filters in (8, 16):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, dtype=policy)(h)
        h = tfbn.BatchNormalization(dtype=policy)(h)
        h = keras.layers.ReLU(dtype=policy)(h)
    h = keras.layers.GlobalAveragePooling2D(dtype=policy)(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(h))


def check_xla_fit(device) -> Check:
    import keras
    import numpy as np
    import tensorflow as tf

    import tfbn

    rng = np.random.default_rng(0)
    x = rng.normal(1, 2, (64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, 64)
    with tf.device(device):
        keras.utils.set_random_seed(0)
        model = _small_cnn(tfbn, keras)
        model.compile(
            "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True
        )
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        eager = np.asarray(model(x[:8], training=False))
        compiled = np.asarray(model.predict(x[:8], verbose=0))
    losses = history.history["loss"]
    bn = model.layers[2]
    moved = not np.allclose(np.asarray(bn.moving_mean), 0)
    diff = _rel_diff(compiled, eager)
    ok = bool(np.all(np.isfinite(losses))) and moved and diff <= 1e-4
    return Check(
        "xla_fit",
        "PASS" if ok else "FAIL",
        f"losses {[round(v, 4) for v in losses]}, statistics moved {moved}, "
        f"XLA predict vs eager {diff:.1e}",
        data={"losses": losses, "diff": diff},
    )


def check_mixed_float16_fit(device) -> Check:
    import keras
    import numpy as np
    import tensorflow as tf

    import tfbn

    rng = np.random.default_rng(0)
    x = rng.normal(1, 2, (64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, 64)
    with tf.device(device):
        keras.utils.set_random_seed(0)
        model = _small_cnn(tfbn, keras, policy="mixed_float16")
        model.compile(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        out = np.asarray(model(x[:8], training=False))
    losses = history.history["loss"]
    bn = model.layers[2]
    ok = (
        bool(np.all(np.isfinite(losses)))
        and bool(np.all(np.isfinite(out)))
        and bn.moving_mean.dtype == "float32"
    )
    return Check(
        "mixed_float16_fit",
        "PASS" if ok else "FAIL",
        f"losses {[round(v, 4) for v in losses]}, statistics {bn.moving_mean.dtype}",
        data={"losses": losses},
    )


def check_bench(repeats: int) -> Callable[[str], Check]:
    def run(device):
        import tensorflow as tf

        from tfbn import bench

        with tf.device(device):
            rows = bench.run_benchmark(bench.DEFAULT_SHAPES, repeats, ("tfbn", "keras"))
        slower = [r for r in rows if r["impl"] == "keras" and r["train_vs_tfbn"] < 1.0]
        return Check(
            "bench_layer",
            "FAIL" if slower else "PASS",
            "tfbn never slower than Keras's layer"
            if not slower
            else f"Keras faster on {[tuple(r['shape']) for r in slower]}",
            data={"rows": rows, "table": bench.format_table(rows)},
        )

    return run


# ------------------------------------------------------------------- driver --


def checks(gpus: list[str], bench_repeats: int) -> list[tuple[str, Callable[[str], Check]]]:
    """(name, check) in the order they run."""
    out = []
    for layout in ("NHWC", "NCHW"):
        for dtype in ("float32", "float16", "bfloat16"):
            out.append((f"fused_{layout}_{dtype}", check_fused(layout, dtype)))
    for layout in ("NHWC", "NCHW"):
        for dtype in ("float32", "float16"):
            out.append((f"epsilon_floor_{layout}_{dtype}", check_epsilon_floor(layout, dtype)))
    out += [
        ("raw_fused_epsilon_1e-7", check_raw_epsilon),
        ("one_value_per_channel", check_one_value),
        ("mirrored_sync_parity", check_mirrored(gpus)),
        ("xla_fit", check_xla_fit),
        ("mixed_float16_fit", check_mixed_float16_fit),
    ]
    if bench_repeats > 0:
        out.append(("bench_layer", check_bench(bench_repeats)))
    return out


def run_checks(
    device: str | None = None, bench_repeats: int = 10, only: list[str] | None = None
) -> dict:
    """Runs every check on the first GPU (or on `device`, e.g. "/CPU:0" to test the
    script itself); without a GPU (and no `device`) every check is SKIPPED."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    environment = {
        "tensorflow": tf.__version__,
        "built_with_cuda": tf.test.is_built_with_cuda(),
        "gpus": gpus,
        "python": platform.python_version(),
    }
    try:
        import keras

        environment["keras"] = keras.__version__
        info = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        environment["gpu_details"] = {k: str(v) for k, v in info.items()}
    except (IndexError, ValueError, RuntimeError):
        pass
    target = device or (gpus[0] if gpus else None)
    skip_reason = None
    if target is None:
        skip_reason = (
            "no GPU visible to TensorFlow (tf.config.list_logical_devices('GPU') is "
            f"empty; built with CUDA: {environment['built_with_cuda']})"
        )
    results = []
    for name, check in checks(gpus, bench_repeats):
        if only and name not in only:
            continue
        if skip_reason:
            results.append(Check(name, "SKIP", skip_reason))
            continue
        start = time.perf_counter()
        try:
            result = check(target)
        except Exception as error:  # a crashing check is a failed check, not a crashed script
            result = Check(
                name,
                "FAIL",
                f"{type(error).__name__}: {error}"[:500],
                data={"traceback": traceback.format_exc()[-4000:]},
            )
        result.seconds = time.perf_counter() - start
        results.append(result)
    return {"environment": environment, "device": target, "checks": [asdict(r) for r in results]}


def format_table(report: dict) -> str:
    lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
    for c in report["checks"]:
        detail = c["detail"].replace("|", "/")
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {detail} |")
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(
        f"device: {report['device'] or 'none'}; " + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfbn gpu-check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    parser.add_argument(
        "--bench-repeats",
        type=int,
        default=10,
        help="timed calls per implementation in the bench check (0: skip it)",
    )
    parser.add_argument("--only", action="append", help="run only this check (repeatable)")
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="run the checks on this device instead of the GPUs, e.g. /CPU:0 "
        "(to test the script itself on a machine without a GPU)",
    )


def run_from_args(args) -> int:
    report = run_checks(args.device, args.bench_repeats, args.only)
    if not report["environment"]["gpus"] and args.device is None:
        print("No GPU is visible to TensorFlow: every check is skipped (this is not a failure).")
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 1 if any(c["status"] == "FAIL" for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
