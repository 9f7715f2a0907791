"""The benchmark behind `tfbn bench`: tfbn vs Keras BatchNormalization vs the raw fused op.

Every implementation is timed in the same process and run, on the same inputs,
as a compiled `tf.function`: a training step (forward in training mode, backward
to the input, gamma and beta, moving-statistics update) and an inference call.
Timings are medians over repeats; the table reports ratios against tfbn measured
in this run, never absolute targets.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tfbn.layers import BatchNormalization

DEFAULT_SHAPES = (
    (32, 56, 56, 64),
    (4096, 1024),
    (64, 256, 128),
    (8, 16, 32, 32, 32),
    # small tensors, where fixed per-call costs dominate
    (256, 64),
    (32, 128),
    (1024, 256),
    (32, 8, 8, 64),
    (16, 14, 14, 128),
)
IMPLEMENTATIONS = ("tfbn", "keras", "keras_xla", "raw_fused")


# Rounds continue past `repeats` until each function has been timed this long (at
# most MAX_ROUNDS): sub-millisecond calls need hundreds of samples for a stable median.
MIN_TIMED_SECONDS = 0.3
MAX_ROUNDS = 1000


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin: `repeats` rounds,
    or more for fast calls (`MIN_TIMED_SECONDS`).

    Interleaving the repeats means CPU frequency, caches and background load
    affect every implementation alike, so ratios within one run are fair. The
    order is shuffled every round (seeded), so each function follows every
    other about equally often: a call right after the fused kernel's inference
    (oneDNN) was measured 1.2-1.4x slower than the same call after another,
    and a fixed (or rotated) order always put the same function there.
    """
    if not fns:
        return {}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, order = list(fns), random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or (
        rounds < MAX_ROUNDS and min(sum(t) for t in times.values()) < MIN_TIMED_SECONDS
    ):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def _layer_steps(layer: keras.layers.Layer, x: tf.Tensor, jit: bool):
    """(train_step, infer) tf.functions for one BN layer on input `x`."""
    layer.build(x.shape)
    upstream = tf.random.stateless_normal(x.shape, seed=(1, 2))

    @tf.function(jit_compile=jit)
    def train():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return [tf.reduce_sum(g) for g in grads]

    @tf.function(jit_compile=jit)
    def infer():
        return tf.reduce_sum(layer(x, training=False))

    return train, infer


def _raw_fused_steps(x: tf.Tensor, momentum: float = 0.99, epsilon: float = 1e-3):
    """The floor: FusedBatchNormV3 on a 4D view of `x`, with its in-kernel EMA update."""
    channels = x.shape[-1]
    x4 = tf.reshape(x, [x.shape[0], -1, 1, channels])
    gamma = tf.Variable(tf.ones([channels]))
    beta = tf.Variable(tf.zeros([channels]))
    mean = tf.Variable(tf.zeros([channels]))
    var = tf.Variable(tf.ones([channels]))
    upstream = tf.random.stateless_normal(x4.shape, seed=(1, 2))

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            tape.watch(x4)
            y, m, v, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x4,
                scale=gamma,
                offset=beta,
                mean=mean,
                variance=var,
                epsilon=epsilon,
                exponential_avg_factor=1.0 - momentum,
                data_format="NHWC",
                is_training=True,
            )
            loss = tf.reduce_sum(y * upstream)
        mean.assign(m)
        var.assign(v)
        grads = tape.gradient(loss, [x4, gamma, beta])
        return [tf.reduce_sum(g) for g in grads]

    @tf.function
    def infer():
        y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x4,
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=epsilon,
            data_format="NHWC",
            is_training=False,
        )
        return tf.reduce_sum(y)

    return train, infer


def _builders(x: tf.Tensor) -> dict[str, Callable]:
    """Constructors of each implementation's (train_step, infer) pair on input `x`."""
    return {
        "tfbn": lambda: _layer_steps(BatchNormalization(), x, jit=False),
        "keras": lambda: _layer_steps(keras.layers.BatchNormalization(), x, jit=False),
        "keras_xla": lambda: _layer_steps(keras.layers.BatchNormalization(), x, jit=True),
        "raw_fused": lambda: _raw_fused_steps(x),
    }


def _progress(items, desc: str, enabled: bool | None):
    """`items` with a progress bar on stderr (`tfbn.progress`: after 2 s, terminal only)."""
    from tfbn.progress import progress_bar

    items = list(items)
    with progress_bar(len(items), desc, enabled) as bar:
        for item in items:
            bar.set_postfix_str(str(item), refresh=False)
            yield item
            bar.update(1)


def run_benchmark(
    shapes=DEFAULT_SHAPES,
    repeats: int = 20,
    implementations=IMPLEMENTATIONS,
    progress: bool | None = False,
) -> list[dict]:
    """Times every implementation on every shape; returns one row per (shape, impl).
    `progress`: shapes done on stderr (True, False, or None: when stderr is a terminal)."""
    rows = []
    for shape in _progress(shapes, "tfbn bench", progress):
        x = tf.random.stateless_normal(shape, seed=(0, 0))
        steps = {name: _builders(x)[name]() for name in implementations}
        train = _interleaved_medians({n: s[0] for n, s in steps.items()}, repeats)
        infer = _interleaved_medians({n: s[1] for n, s in steps.items()}, repeats)
        timings = {name: (train[name], infer[name]) for name in implementations}
        base_train, base_infer = timings.get("tfbn", next(iter(timings.values())))
        for name, (t_train, t_infer) in timings.items():
            rows.append(
                {
                    "shape": list(shape),
                    "impl": name,
                    "train_ms": t_train * 1e3,
                    "infer_ms": t_infer * 1e3,
                    "train_vs_tfbn": t_train / base_train,
                    "infer_vs_tfbn": t_infer / base_infer,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of `run_benchmark` rows (ratios > 1 mean slower than tfbn)."""
    lines = [
        "| shape | impl | train step ms | x tfbn | inference ms | x tfbn |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['impl']} | {r['train_ms']:.2f} | "
            f"{r['train_vs_tfbn']:.2f} | {r['infer_ms']:.2f} | {r['infer_vs_tfbn']:.2f} |"
        )
    return "\n".join(lines)


def _write_json(json_path: str | None, doc: dict) -> None:
    """A bench report as JSON at `json_path` (if given), with the versions that ran it."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"tf": tf.__version__, "keras": keras.__version__, **doc}, f, indent=2)


def main(
    shapes=DEFAULT_SHAPES,
    repeats: int = 20,
    json_path: str | None = None,
    progress: bool | None = False,
) -> list[dict]:
    rows = run_benchmark(shapes, repeats, progress=progress)
    print(format_table(rows))
    _write_json(json_path, {"rows": rows})
    return rows


# ------------------------------------------------------------------ sync --

SYNC_SHAPES = ((8, 56, 56, 64), (16, 28, 28, 128), (256, 1024))  # per replica
SYNC_IMPLEMENTATIONS = ("tfbn_sync", "tfbn_local", "keras_sync", "keras_local", "tfbn_sync_unfused")
COLLECTIVE_OPS = (
    "CollectiveReduceV2",
    "CollectiveReduce",
    "NcclAllReduce",
    "CollectiveGatherV2",
    "CollectiveBcastSendV2",
    "CollectiveAllToAllV2",
)


def split_cpu(replicas: int) -> list[str]:
    """Splits the first physical CPU into `replicas` logical devices; returns their names.

    Must run before TensorFlow initialises its runtime (the first op or device
    query). If it already did, the existing logical CPUs are used when there are
    enough, and a clear error is raised otherwise.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError:
        pass  # already initialised; check what we have
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < replicas:
        raise ValueError(
            f"The sync benchmark needs {replicas} logical CPU devices but TensorFlow was "
            f"initialised with {len(logical)}; run it in a fresh process (`tfbn bench --sync`)."
        )
    return [d.name for d in logical[:replicas]]


_STRATEGIES: dict[int, tf.distribute.MirroredStrategy] = {}


def _mirrored_strategy(replicas: int) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per replica count and process: a second strategy over the
    same devices would reuse the first one's collective keys and mix up their all-reduces."""
    if replicas not in _STRATEGIES:
        _STRATEGIES[replicas] = tf.distribute.MirroredStrategy(split_cpu(replicas))
    return _STRATEGIES[replicas]


def _sync_layer(name: str) -> keras.layers.Layer:
    return {
        "tfbn_sync": lambda: BatchNormalization(synchronized=True),
        "tfbn_local": lambda: BatchNormalization(),
        "keras_sync": lambda: keras.layers.BatchNormalization(synchronized=True),
        "keras_local": lambda: keras.layers.BatchNormalization(),
        "tfbn_sync_unfused": lambda: BatchNormalization(synchronized=True, fused=False),
    }[name]()


def _sync_train_step(strategy: tf.distribute.Strategy, layer: keras.layers.Layer, shape):
    """A compiled training step of one BN layer on every replica's `shape` batch."""
    with strategy.scope():
        layer.build((None, *shape[1:]))

    def value(seed):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.random.stateless_normal(shape, seed=(seed, ctx.replica_id_in_sync_group))
        )

    x, upstream = value(0), value(1)

    def replica_step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return [tf.reduce_sum(g) for g in grads]

    @tf.function
    def train():
        return strategy.run(replica_step, (x, upstream))

    return train


def communication(fn: Callable, *args, replicas: int | None = None) -> dict[str, float]:
    """Cross-replica communication in a traced tf.function's graph.

    - `all_reduce`: collective ops (`COLLECTIVE_OPS`), counted once per replica
      (every replica runs its own instance of one all-reduce), summed over
      nested functions.
    - `to_one_device`: ops that combine values from several devices on one
      (a mirrored variable's `aggregation="mean"` write: AddN on one device).
    - `broadcast`: values copied from one device to others (that write's copy
      back, or `aggregation="only_first_replica"`), counted once per source.

    Only the top-level graph has devices on its ops (MirroredStrategy traces
    every replica into it), so the last two are found there.
    """
    graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    devices = {n.name: n.device for n in graph_def.node}
    if replicas is None:  # MirroredStrategy: one device per replica
        replicas = max(1, len({d for d in devices.values() if d}))
    all_reduce = sum(node.op in COLLECTIVE_OPS for node in nodes)
    to_one, copied = 0, set()
    for node in graph_def.node:
        if not node.device or node.op in COLLECTIVE_OPS:
            continue
        sources = {}
        for name in node.input:
            if name.startswith("^"):
                continue
            source = name.split(":")[0]
            if devices.get(source):
                sources[source] = devices[source]
        foreign = {s: d for s, d in sources.items() if d != node.device}
        if len(set(foreign.values())) > 1:
            to_one += 1
        elif foreign:
            copied.update(foreign)
    return {
        "all_reduce": all_reduce / replicas,
        "to_one_device": to_one,
        "broadcast": len(copied),
    }


def count_collectives(fn: Callable, *args, replicas: int | None = None) -> float:
    """All cross-replica communications of a traced tf.function (see `communication`)."""
    return sum(communication(fn, *args, replicas=replicas).values())


def run_sync_benchmark(
    shapes=SYNC_SHAPES,
    repeats: int = 20,
    replicas: int = 4,
    implementations=SYNC_IMPLEMENTATIONS,
    progress: bool | None = False,
) -> list[dict]:
    """Training-step time of each implementation under MirroredStrategy over `replicas`
    logical CPUs, per per-replica shape; ratios against tfbn_sync from the same run."""
    strategy = _mirrored_strategy(replicas)
    if strategy.num_replicas_in_sync != replicas:
        raise RuntimeError(f"expected {replicas} replicas, got {strategy.num_replicas_in_sync}")
    rows = []
    for shape in _progress(shapes, "tfbn bench --sync", progress):
        steps = {
            name: _sync_train_step(strategy, _sync_layer(name), shape) for name in implementations
        }
        collectives = {name: count_collectives(fn, replicas=replicas) for name, fn in steps.items()}
        times = _interleaved_medians(steps, repeats)
        base = times.get("tfbn_sync", next(iter(times.values())))
        for name in implementations:
            rows.append(
                {
                    "shape": list(shape),
                    "replicas": replicas,
                    "impl": name,
                    "train_ms": times[name] * 1e3,
                    "vs_tfbn_sync": times[name] / base,
                    "collectives_per_layer_step": collectives[name],
                }
            )
    return rows


def sync_summary(rows: list[dict]) -> list[dict]:
    """Per shape: Keras sync / tfbn sync (target >= 2) and tfbn sync / tfbn local (<= 1.15)."""
    by_shape: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_shape.setdefault(tuple(r["shape"]), {})[r["impl"]] = r["train_ms"]
    out = []
    for shape, t in by_shape.items():
        entry = {"shape": list(shape)}
        if "keras_sync" in t and "tfbn_sync" in t:
            entry["keras_sync_over_tfbn_sync"] = t["keras_sync"] / t["tfbn_sync"]
        if "tfbn_local" in t and "tfbn_sync" in t:
            entry["tfbn_sync_over_tfbn_local"] = t["tfbn_sync"] / t["tfbn_local"]
        out.append(entry)
    return out


def format_sync_table(rows: list[dict]) -> str:
    """Markdown table of `run_sync_benchmark` rows plus the two target ratios per shape."""
    replicas = rows[0]["replicas"] if rows else 0
    lines = [
        f"| per-replica shape (x{replicas} replicas) | impl | train step ms | x tfbn_sync "
        "| all-reduces / layer / step |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['impl']} | {r['train_ms']:.2f} | "
            f"{r['vs_tfbn_sync']:.2f} | {r['collectives_per_layer_step']:g} |"
        )
    lines += [
        "",
        "| per-replica shape | keras sync / tfbn sync (target >= 2) "
        "| tfbn sync / tfbn local (target <= 1.15) |",
        "|---|---:|---:|",
    ]
    for s in sync_summary(rows):
        lines.append(
            f"| {tuple(s['shape'])} | {s.get('keras_sync_over_tfbn_sync', float('nan')):.2f} | "
            f"{s.get('tfbn_sync_over_tfbn_local', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main_sync(
    shapes=SYNC_SHAPES,
    repeats: int = 20,
    replicas: int = 4,
    json_path: str | None = None,
    progress: bool | None = False,
) -> list[dict]:
    rows = run_sync_benchmark(shapes, repeats, replicas, progress=progress)
    print(format_sync_table(rows))
    _write_json(json_path, {"rows": rows, "summary": sync_summary(rows)})
    return rows


if __name__ == "__main__":  # pragma: no cover
    np.set_printoptions(precision=3)
    main()


# ------------------------------------------------------------- whole models --
# A full `model.fit` training step (forward, backward, optimizer update) of whole
# models, `train_on_batch` on a fixed batch, timed round-robin like the layers.
# Single device: Keras BN, tfbn BN, and every BN replaced by a pass-through layer,
# so "BN cost" = step time minus the pass-through model's. Under MirroredStrategy
# (logical CPUs): Keras local/sync and tfbn local/sync, with and without XLA.

MODEL_NAMES = ("resnet", "mobilenetv2", "resnet50", "mobilenetv2_app", "efficientnetb0")
DEFAULT_MODELS = ("resnet", "mobilenetv2")
SINGLE_VARIANTS = ("keras", "tfbn", "passthrough")
MIRRORED_VARIANTS = ("keras_local", "keras_sync", "tfbn_local", "tfbn_sync")


def _resnet(size: int = 32, classes: int = 10) -> keras.Model:
    """ResNet-style CNN: stem + 3 stages x 2 basic blocks (16/32/64 channels), Keras BN."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    h = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = layers.ReLU()(layers.BatchNormalization()(h))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            r = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False)(h)
            r = layers.ReLU()(layers.BatchNormalization()(r))
            r = layers.Conv2D(filters, 3, padding="same", use_bias=False)(r)
            r = layers.BatchNormalization()(r)
            if stride != 1 or h.shape[-1] != filters:
                h = layers.BatchNormalization()(
                    layers.Conv2D(filters, 1, stride, use_bias=False)(h)
                )
            h = layers.ReLU()(layers.Add()([h, r]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes)(h), name="resnet_small")


def _mobilenetv2(size: int = 32, classes: int = 10) -> keras.Model:
    """MobileNetV2-style inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1)."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    h = layers.Conv2D(16, 3, 2, padding="same", use_bias=False)(inputs)
    h = layers.ReLU(6.0)(layers.BatchNormalization()(h))
    for filters, stride, repeat in ((16, 1, 1), (24, 2, 2), (32, 2, 3), (64, 2, 2)):
        for i in range(repeat):
            s = stride if i == 0 else 1
            r = layers.Conv2D(6 * h.shape[-1], 1, use_bias=False)(h)
            r = layers.ReLU(6.0)(layers.BatchNormalization()(r))
            r = layers.DepthwiseConv2D(3, s, padding="same", use_bias=False)(r)
            r = layers.ReLU(6.0)(layers.BatchNormalization()(r))
            r = layers.BatchNormalization()(layers.Conv2D(filters, 1, use_bias=False)(r))
            h = layers.Add()([h, r]) if s == 1 and h.shape[-1] == filters else r
    h = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(128, 1, use_bias=False)(h)))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes)(h), name="mobilenetv2_small")


def _model_spec(name: str) -> tuple[Callable[[], keras.Model], int]:
    """(builder with Keras BN, input size) of a bench model."""
    apps = keras.applications

    def app(build, size):  # logits, as the bench's loss expects (from_logits=True)
        return lambda: build(
            weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
        )

    specs = {
        "resnet": (lambda: _resnet(32), 32),
        "mobilenetv2": (lambda: _mobilenetv2(32), 32),
        "resnet50": (app(apps.ResNet50, 64), 64),
        "mobilenetv2_app": (app(apps.MobileNetV2, 96), 96),
        "efficientnetb0": (app(apps.EfficientNetB0, 64), 64),
    }
    if name not in specs:
        raise ValueError(f"Unknown bench model {name!r}; accepted: {', '.join(MODEL_NAMES)}")
    return specs[name]


def _variant(model: keras.Model, variant: str) -> keras.Model:
    """`model` (Keras BN) with every BN layer replaced as `variant` says."""
    from tfbn.convert import batch_norm_config, rewrite_layers

    if variant in ("keras", "keras_local"):
        return model
    if variant == "keras_sync":

        def replace(layer):
            if isinstance(layer, keras.layers.BatchNormalization):
                return keras.layers.BatchNormalization.from_config(
                    {**layer.get_config(), "synchronized": True}
                )
            return None
    elif variant == "passthrough":

        def replace(layer):
            if isinstance(layer, keras.layers.BatchNormalization):
                return _PassThrough(name=layer.name)
            return None
    else:
        synchronized = variant == "tfbn_sync"

        def replace(layer):
            if isinstance(layer, keras.layers.BatchNormalization):
                return BatchNormalization.from_config(
                    {**batch_norm_config(layer), "synchronized": synchronized}
                )
            return None

    return rewrite_layers(model, replace, transfer=lambda old, new: None)[0]


def _fit_step(
    name: str, variant: str, batch: int, jit: bool, strategy=None, return_model: bool = False
):
    """A compiled `train_on_batch` closure for one model variant (and the model)."""
    build, size = _model_spec(name)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    scope = strategy.scope() if strategy is not None else _null_scope()
    with scope:
        keras.utils.set_random_seed(0)
        model = _variant(build(), variant)
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
    step = lambda: model.train_on_batch(x, y)  # noqa: E731
    return (step, model) if return_model else step


class _PassThrough(keras.layers.Layer):
    """What a BN layer costs nothing as: returns its input (accepts BN's call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _time_variants(builders: dict[str, Callable], repeats: int) -> dict[str, float | str]:
    """Median step seconds per variant; a variant that cannot run gives its error."""
    steps, errors = {}, {}
    for key, make in builders.items():
        try:
            step = make()
            step()  # compile
            steps[key] = step
        except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
            errors[key] = f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    times: dict[str, float | str] = dict(_interleaved_medians(steps, repeats, warmup=2))
    times.update(errors)
    return times


def run_model_benchmark(
    models=DEFAULT_MODELS,
    batch: int = 16,
    repeats: int = 10,
    replicas: int = 4,
    jit=(False, True),
    single: bool = True,
    mirrored: bool = True,
    progress: bool | None = False,
) -> dict:
    """Whole-model training steps: the single-device table (issue: BN cost) and the
    MirroredStrategy table over `replicas` logical CPUs (global batch `batch`)."""
    strategy = _mirrored_strategy(replicas) if mirrored else None
    out = {"batch": batch, "replicas": replicas, "single": [], "mirrored": []}
    for name in _progress(models, "tfbn bench --model", progress):
        _model_spec(name)
        if single:
            t = _time_variants(
                {v: (lambda v=v, n=name: _fit_step(n, v, batch, False)) for v in SINGLE_VARIANTS},
                repeats,
            )
            row = {"model": name, **{f"{v}_ms": _ms(t[v]) for v in SINGLE_VARIANTS}}
            if all(isinstance(t[v], float) for v in SINGLE_VARIANTS):
                bn_keras, bn_tfbn = t["keras"] - t["passthrough"], t["tfbn"] - t["passthrough"]
                row.update(
                    step_keras_over_tfbn=t["keras"] / t["tfbn"],
                    bn_cost_keras_over_tfbn=bn_keras / bn_tfbn if bn_tfbn > 0 else None,
                    bn_share_keras=bn_keras / t["keras"],
                    bn_share_tfbn=bn_tfbn / t["tfbn"],
                )
            out["single"].append(row)
        if mirrored:
            for compiled in jit:
                t = _time_variants(
                    {
                        v: (lambda v=v, n=name, c=compiled: _fit_step(n, v, batch, c, strategy))
                        for v in MIRRORED_VARIANTS
                    },
                    repeats,
                )
                row = {
                    "model": name,
                    "jit_compile": compiled,
                    **{f"{v}_ms": _ms(t[v]) for v in MIRRORED_VARIANTS},
                }
                if all(isinstance(t[v], float) for v in MIRRORED_VARIANTS):
                    row.update(
                        keras_sync_over_tfbn_sync=t["keras_sync"] / t["tfbn_sync"],
                        keras_local_over_tfbn_local=t["keras_local"] / t["tfbn_local"],
                        tfbn_sync_over_tfbn_local=t["tfbn_sync"] / t["tfbn_local"],
                    )
                out["mirrored"].append(row)
    return out


def _ms(value):
    return value * 1e3 if isinstance(value, float) else value


def _fmt(value, spec):
    """A number as `spec`; a variant's error as "n/a (ErrorType)" (the JSON keeps it whole)."""
    if isinstance(value, (int, float)):
        return format(value, spec)
    if isinstance(value, str) and value.startswith("n/a ("):
        return value.split(":", 1)[0] + ")"
    return str(value or "-")


def format_model_tables(result: dict) -> str:
    lines = []
    if result["single"]:
        lines += [
            f"Single device, float32, batch {result['batch']}: a full training step "
            "(train_on_batch: forward, backward, SGD update).",
            "",
            "| model | Keras ms | tfbn ms | pass-through ms | step Keras/tfbn "
            "| BN cost Keras/tfbn | BN share Keras / tfbn |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["single"]:
            share = (
                f"{r['bn_share_keras']:.0%} / {r['bn_share_tfbn']:.0%}"
                if "bn_share_keras" in r
                else "-"
            )
            lines.append(
                f"| {r['model']} | {_fmt(r['keras_ms'], '.1f')} | {_fmt(r['tfbn_ms'], '.1f')} | "
                f"{_fmt(r['passthrough_ms'], '.1f')} | {_fmt(r.get('step_keras_over_tfbn'), '.2f')}x"
                f" | {_fmt(r.get('bn_cost_keras_over_tfbn'), '.2f')}x | {share} |"
            )
    if result["mirrored"]:
        lines += [
            "",
            f"MirroredStrategy over {result['replicas']} logical CPUs, global batch "
            f"{result['batch']}: a full training step.",
            "",
            "| model | jit_compile | Keras local ms | Keras sync ms | tfbn local ms | tfbn sync ms "
            "| Keras sync / tfbn sync | Keras local / tfbn local | tfbn sync / tfbn local |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["mirrored"]:
            lines.append(
                f"| {r['model']} | {r['jit_compile']} | "
                + " | ".join(_fmt(r[f"{v}_ms"], ".1f") for v in MIRRORED_VARIANTS)
                + f" | {_fmt(r.get('keras_sync_over_tfbn_sync'), '.2f')}"
                f" | {_fmt(r.get('keras_local_over_tfbn_local'), '.2f')}"
                f" | {_fmt(r.get('tfbn_sync_over_tfbn_local'), '.2f')} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------ profile --
# Where a whole training step's BN time goes: TensorFlow's profiler records every
# op the step's executor runs (name "scope/.../op:Type", CPU time on its thread);
# the ops under a BN layer's name scope, its gradient included, are that layer's.


def profile_model(name: str, variants=("keras", "tfbn"), batch: int = 16, steps: int = 5) -> dict:
    """Per-op-type CPU time per training step of the BN layers' ops, by variant.

    Returns `{"model", "steps", "variants": {variant: {"bn_us": total, "all_us":
    every op's total, "ops": {op type: microseconds per step}}}}`. Op times are
    CPU time summed over threads, not wall time (ops run in parallel).
    """
    out = {"model": name, "batch": batch, "steps": steps, "variants": {}}
    for variant in variants:
        step, model = _fit_step(name, variant, batch, False, return_model=True)
        for _ in range(3):  # compile and warm up
            step()
        scopes = {layer.name for layer in _batch_norm_layers(model)}
        out["variants"][variant] = _profiled_op_times(step, steps, scopes)
    return out


def _batch_norm_layers(model):
    from tfbn.convert import is_batch_norm

    return [layer for layer in model.layers if is_batch_norm(layer)]


# An op's event is "<scope>/<op name>:<op type>"; runtime events ("ExecutorState::
# Process", "EagerLocalExecute: ...") and Python ones have other shapes.
_OP_EVENT = re.compile(r"^[^\s:]+:[A-Za-z_][A-Za-z0-9_]*$")


def _profiled_op_times(step: Callable, steps: int, scopes: set[str]) -> dict:
    import glob
    import tempfile

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    # A layer's ops live under "<layer name>" or "<layer name>_<call index>".
    names = "|".join(map(re.escape, sorted(scopes)))
    in_scope = re.compile(rf"(?:^|/)({names})(?:_\d+)?/")
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(steps):
                step()
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    ops: dict[str, float] = {}
    total = 0.0
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                op = plane.event_metadata[event.metadata_id].name
                if not _OP_EVENT.match(op):
                    continue  # executor, runtime and Python events, not ops
                us = event.duration_ps / 1e6 / steps
                total += us
                if in_scope.search(op):
                    kind = op.rsplit(":", 1)[1]
                    ops[kind] = ops.get(kind, 0.0) + us
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return {"bn_us": sum(ops.values()), "all_us": total, "ops": ops}


def format_profile_table(result: dict, top: int = 15) -> str:
    """Markdown: the BN op types costing most (any variant), microseconds per step."""
    variants = list(result["variants"])
    kinds: dict[str, float] = {}
    for v in variants:
        for kind, us in result["variants"][v]["ops"].items():
            kinds[kind] = max(kinds.get(kind, 0.0), us)
    header = " | ".join(f"{v} us/step" for v in variants)
    lines = [
        f"{result['model']}, batch {result['batch']}: CPU time of the BN layers' ops "
        f"(forward, gradient, updates) per training step, {result['steps']} profiled steps.",
        "",
        f"| op type | {header} |",
        "|---|" + "---:|" * len(variants),
    ]
    for kind in sorted(kinds, key=lambda k: -kinds[k])[:top]:
        cells = " | ".join(f"{result['variants'][v]['ops'].get(kind, 0.0):.0f}" for v in variants)
        lines.append(f"| {kind} | {cells} |")
    totals = " | ".join(f"**{result['variants'][v]['bn_us']:.0f}**" for v in variants)
    shares = " | ".join(
        f"{result['variants'][v]['bn_us'] / max(result['variants'][v]['all_us'], 1e-9):.0%}"
        for v in variants
    )
    lines += [f"| all BN ops | {totals} |", f"| BN share of all op time | {shares} |"]
    return "\n".join(lines)


def main_profile(
    models=DEFAULT_MODELS, batch: int = 16, steps: int = 5, json_path: str | None = None
) -> list[dict]:
    results = [profile_model(name, batch=batch, steps=steps) for name in models]
    print("\n\n".join(format_profile_table(r) for r in results))
    _write_json(json_path, {"profiles": results})
    return results


def main_model(
    models=DEFAULT_MODELS,
    batch: int = 16,
    repeats: int = 10,
    replicas: int = 4,
    json_path: str | None = None,
    mirrored: bool = True,
    progress: bool | None = False,
) -> dict:
    result = run_model_benchmark(
        models, batch, repeats, replicas, mirrored=mirrored, progress=progress
    )
    print(format_model_tables(result))
    _write_json(json_path, result)
    return result
