"""Synchronised BatchNorm under MirroredStrategy over 4 logical CPUs (see conftest.py).

Every test asserts `num_replicas_in_sync == 4`, so the multi-replica path really
runs (Keras's own test for `synchronized=True` never does). The reference is
always a single-device BN on the concatenated global batch.
"""

import collections
import json
import os
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn import distribute
from tfbn.convert import convert_sync_batch_norm, revert_sync_batch_norm

REPLICAS = 4
DEVICES = [f"/cpu:{i}" for i in range(REPLICAS)]


@pytest.fixture(scope="module")
def strategy():
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    assert strategy.num_replicas_in_sync == REPLICAS
    return strategy


@pytest.fixture(params=["mixed_bfloat16", "mixed_float16"])
def mixed_policy(request):
    keras.mixed_precision.set_dtype_policy(request.param)
    yield request.param
    keras.mixed_precision.set_dtype_policy("float32")


def _per_replica(strategy, arrays):
    """A PerReplica value whose replica i holds `arrays[i]`."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group])
    )


def _local(strategy, value):
    return [np.asarray(v, np.float32) for v in strategy.experimental_local_results(value)]


def _train_step_fn(layer):
    """Replica function: forward in training mode, then d(sum(y * dy)) / (x, gamma, beta)."""

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return y, dx, dgamma, dbeta

    return step


def _distributed_steps(strategy, layer, batches):
    """Runs `layer` under `strategy` on each `[(xs, dys)]` (per-replica lists of arrays).

    Returns per step `(y, dx, dgamma, dbeta)`: y and dx concatenated over replicas in
    replica order, gamma/beta gradients summed over replicas (what the optimizer applies).
    """
    assert strategy.num_replicas_in_sync == len(batches[0][0])
    step = tf.function(lambda x, dy: strategy.run(_train_step_fn(layer), (x, dy)))
    out = []
    for xs, dys in batches:
        y, dx, dg, db = step(_per_replica(strategy, xs), _per_replica(strategy, dys))
        out.append(
            (
                np.concatenate(_local(strategy, y)),
                np.concatenate(_local(strategy, dx)),
                np.sum(_local(strategy, dg), 0),
                np.sum(_local(strategy, db), 0),
            )
        )
    return out


def _single_device_steps(layer, batches):
    step = tf.function(_train_step_fn(layer))
    out = []
    for xs, dys in batches:
        y, dx, dg, db = step(tf.constant(np.concatenate(xs)), tf.constant(np.concatenate(dys)))
        out.append(tuple(np.asarray(t, np.float32) for t in (y, dx, dg, db)))
    return out


def _init_weights(layer, channels, seed=0):
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [
            rng.uniform(0.5, 1.5, channels).astype("float32"),
            rng.normal(0, 0.5, channels).astype("float32"),
            np.zeros(channels, "float32"),
            np.ones(channels, "float32"),
        ]
    )


def _batches(rows, inner, channels, steps=3, seed=1, loc=2.0, scale=3.0):
    """`steps` batches of per-replica (x, dy) arrays; replica i has `rows[i]` examples."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        xs = [
            (rng.normal(loc, scale, (n, *inner, channels)) * rng.uniform(0.5, 2, channels)).astype(
                "float32"
            )
            for n in rows
        ]
        dys = [rng.normal(0, 1, (n, *inner, channels)).astype("float32") for n in rows]
        out.append((xs, dys))
    return out


def _parity(strategy, rows, inner, channels, make_layer, steps=3, channels_first=False):
    """Sync BN on 4 replicas vs single-device BN: per-step results and both layers."""
    batches = _batches(rows, inner, channels, steps)
    shape = (None, *inner, channels)
    if channels_first:
        batches = [tuple([np.moveaxis(a, -1, 1) for a in arrays] for arrays in b) for b in batches]
        shape = (None, channels, *inner)
    with strategy.scope():
        sync = make_layer(synchronized=True)
        sync.build(shape)
    _init_weights(sync, channels)
    ref = make_layer()
    ref.build(shape)
    _init_weights(ref, channels)
    got = _distributed_steps(strategy, sync, batches)
    want = _single_device_steps(ref, batches)
    return got, want, sync, ref


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))


def _moving(layer):
    return [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]


# ----------------------------------------------------------------- parity --


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("inner", [(), (4, 4)], ids=["2d", "4d"])
def test_sync_parity_float32(strategy, inner, fused):
    assert strategy.num_replicas_in_sync == REPLICAS
    got, want, sync, ref = _parity(
        strategy, [4, 4, 4, 4], inner, 5, lambda **kw: tfbn.BatchNormalization(fused=fused, **kw)
    )
    for step_got, step_want in zip(got, want, strict=True):
        for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), step_got, step_want, strict=True):
            assert _max_diff(g, w) <= 1e-5 * max(1.0, np.abs(w).max()), name
    for g, w in zip(_moving(sync), _moving(ref), strict=True):
        assert _max_diff(g, w) <= 1e-5
    assert int(sync.num_batches_tracked.numpy()) == 3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_sync_parity_channels_first(strategy, fused):
    assert strategy.num_replicas_in_sync == REPLICAS
    got, want, sync, ref = _parity(
        strategy,
        [3, 2, 4, 3],
        (4, 5),
        6,
        lambda **kw: tfbn.BatchNormalization(axis=1, fused=fused, **kw),
        channels_first=True,
    )
    assert sync._fused_format == ("NCHW" if fused is True else None)
    for step_got, step_want in zip(got, want, strict=True):
        for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), step_got, step_want, strict=True):
            assert _max_diff(g, w) <= 1e-5 * max(1.0, np.abs(w).max()), name
    for g, w in zip(_moving(sync), _moving(ref), strict=True):
        assert _max_diff(g, w) <= 1e-5


def test_sync_parity_with_masks(strategy):
    """Masked-out positions count nowhere: not in any replica's sums, not in the global count."""
    assert strategy.num_replicas_in_sync == REPLICAS
    rng = np.random.default_rng(5)
    rows = [3, 0, 2, 4]
    xs = [rng.normal(1, 2, (n, 6, 3)).astype("float32") for n in rows]
    dys = [rng.normal(0, 1, (n, 6, 3)).astype("float32") for n in rows]
    masks = [rng.uniform(size=(n, 6)) < 0.6 for n in rows]
    masks[0][0] = False  # a fully masked example

    def step_fn(layer):
        def step(x, dy, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(y * dy * tf.cast(mask, y.dtype)[..., None])
            return (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))

        return step

    with strategy.scope():
        sync = tfbn.SyncBatchNormalization(momentum=0.5)
        sync.build((None, 6, 3))
    _init_weights(sync, 3)
    ref = tfbn.BatchNormalization(momentum=0.5)
    ref.build((None, 6, 3))
    _init_weights(ref, 3)
    y, dx, dg, db = tf.function(lambda *a: strategy.run(step_fn(sync), a))(
        *(_per_replica(strategy, v) for v in (xs, dys, masks))
    )
    want = step_fn(ref)(*(tf.constant(np.concatenate(v)) for v in (xs, dys, masks)))
    keep = np.concatenate(masks)
    got = (
        np.concatenate(_local(strategy, y))[keep],
        np.concatenate(_local(strategy, dx)),
        np.sum(_local(strategy, dg), 0),
        np.sum(_local(strategy, db), 0),
    )
    want = (np.asarray(want[0])[keep], *(np.asarray(w) for w in want[1:]))
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), got, want, strict=True):
        assert _max_diff(g, w) <= 1e-5 * max(1.0, np.abs(w).max()), name
    for g, w in zip(_moving(sync), _moving(ref), strict=True):
        assert _max_diff(g, w) <= 1e-5
    masked_mean = np.concatenate(xs)[keep].mean(0)
    np.testing.assert_allclose(np.asarray(sync.moving_mean), 0.5 * masked_mean, atol=1e-5)


@pytest.mark.parametrize("inner", [(), (4, 4)], ids=["2d", "4d"])
def test_sync_parity_mixed_precision(strategy, inner, mixed_policy):
    assert strategy.num_replicas_in_sync == REPLICAS
    # fused=True on both sides: "auto" trains inputs this small on the unfused path
    # on one device, which rounds 16-bit values differently from the fused kernel.
    got, want, sync, ref = _parity(
        strategy, [4, 4, 4, 4], inner, 5, lambda **kw: tfbn.BatchNormalization(fused=True, **kw)
    )
    assert sync.compute_dtype == mixed_policy.split("_")[1]
    assert sync.moving_mean.dtype == "float32"
    for step_got, step_want in zip(got, want, strict=True):
        for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), step_got, step_want, strict=True):
            # y and dx are 16-bit: both paths compute in float32 and round once
            # (bfloat16 agrees exactly, float16 to half an ulp in practice); allow
            # one bfloat16 ulp (8 bits) of the largest magnitude. gamma/beta sums
            # accumulate 16-bit products in float32.
            assert _max_diff(g, w) <= 2.0**-8 * np.abs(w).max(), name
    # Statistics are float32 in both paths (from the same bfloat16 inputs).
    for g, w in zip(_moving(sync), _moving(ref), strict=True):
        assert _max_diff(g, w) <= 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_uneven_and_empty_replica_batches(strategy, fused):
    assert strategy.num_replicas_in_sync == REPLICAS
    got, want, sync, ref = _parity(
        strategy, [5, 3, 0, 8], (2, 2), 3, lambda **kw: tfbn.BatchNormalization(fused=fused, **kw)
    )
    for step_got, step_want in zip(got, want, strict=True):
        for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), step_got, step_want, strict=True):
            assert np.all(np.isfinite(g)), name
            assert _max_diff(g, w) <= 1e-5 * max(1.0, np.abs(w).max()), name
    before = _moving(sync)
    for g, w in zip(before, _moving(ref), strict=True):
        assert _max_diff(g, w) <= 1e-5

    # An all-empty global batch: empty outputs, zero gradients, statistics untouched.
    empty = _batches([0, 0, 0, 0], (2, 2), 3, steps=1)
    ((y, dx, dg, db),) = _distributed_steps(strategy, sync, empty)
    assert y.shape == (0, 2, 2, 3) and dx.shape == (0, 2, 2, 3)
    assert np.all(dg == 0) and np.all(db == 0)
    for g, w in zip(_moving(sync), before, strict=True):
        np.testing.assert_array_equal(g, w)
    assert int(sync.num_batches_tracked.numpy()) == 3


# --------------------------------------------------------------- numerics --


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_large_mean_variance_is_accurate_where_keras_sync_is_not(strategy, fused):
    assert strategy.num_replicas_in_sync == REPLICAS
    rng = np.random.default_rng(3)
    xs = [(1e4 + rng.normal(0, 1, (16, 4, 4, 8))).astype("float32") for _ in range(REPLICAS)]
    x64 = np.concatenate(xs).astype(np.float64)
    exact = np.var(x64, axis=(0, 1, 2))

    def run(layer):
        with strategy.scope():
            layer.build((None, 4, 4, 8))
        fn = tf.function(lambda x: strategy.run(lambda x: layer(x, training=True), (x,)))
        y = np.concatenate(_local(strategy, fn(_per_replica(strategy, xs))))
        return y, np.asarray(layer.moving_variance, np.float64)  # momentum 0: the batch's

    y, ours = run(tfbn.SyncBatchNormalization(momentum=0.0, fused=fused))
    _, theirs = run(keras.layers.BatchNormalization(momentum=0.0, synchronized=True))
    ours_err = np.max(np.abs(ours - exact) / exact)
    theirs_err = np.max(np.abs(theirs - exact) / exact)
    assert ours_err <= 1e-3, ours_err
    assert theirs_err > 10 * max(ours_err, 1e-3), (ours_err, theirs_err)
    # The outputs too: float32 inputs at 1e4 are only exact to ~5e-4 themselves.
    y_exact = (x64 - x64.mean((0, 1, 2))) / np.sqrt(exact + 1e-3)
    assert _max_diff(y, y_exact) <= 3e-3, _max_diff(y, y_exact)


# ------------------------------------------------------------- group sync --


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_group_sync_matches_independent_groups(strategy, fused):
    assert strategy.num_replicas_in_sync == REPLICAS
    batches = _batches([3, 3, 3, 3], (2, 2), 4, steps=2)

    def make():
        return tfbn.BatchNormalization(synchronized=True, fused=fused, sync_group_size=2)

    with strategy.scope():
        grouped = make()
        grouped.build((None, 2, 2, 4))
    _init_weights(grouped, 4)
    got = _distributed_steps(strategy, grouped, batches)

    halves = []
    for devices, part in ((DEVICES[:2], slice(0, 2)), (DEVICES[2:], slice(2, 4))):
        # Reduction-to-one-device: a second collective group over a subset of the
        # devices would clash with the 4-replica strategy's collective keys.
        pair = tf.distribute.MirroredStrategy(devices, tf.distribute.ReductionToOneDevice())
        assert pair.num_replicas_in_sync == 2
        with pair.scope():
            layer = tfbn.SyncBatchNormalization(fused=fused)
            layer.build((None, 2, 2, 4))
        _init_weights(layer, 4)
        halves.append(
            (_distributed_steps(pair, layer, [(xs[part], dys[part]) for xs, dys in batches]), layer)
        )
    for step, step_got in enumerate(got):
        (y0, dx0, dg0, db0), (y1, dx1, dg1, db1) = halves[0][0][step], halves[1][0][step]
        want = (np.concatenate([y0, y1]), np.concatenate([dx0, dx1]), dg0 + dg1, db0 + db1)
        for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), step_got, want, strict=True):
            assert _max_diff(g, w) <= 1e-5 * max(1.0, np.abs(w).max()), name
    # Moving statistics are mirrored, so they hold the mean over the groups.
    for g, a, b in zip(_moving(grouped), _moving(halves[0][1]), _moving(halves[1][1]), strict=True):
        assert _max_diff(g, (a + b) / 2) <= 1e-5


def test_group_size_must_divide_replicas(strategy):
    assert strategy.num_replicas_in_sync == REPLICAS
    with strategy.scope():
        layer = tfbn.BatchNormalization(synchronized=True, sync_group_size=3)
        layer.build((None, 4))
    x = _per_replica(strategy, [np.ones((2, 4), "float32")] * REPLICAS)
    with pytest.raises(
        ValueError, match=r"sync_group_size.*divides.*\(4\).*Received: sync_group_size=3"
    ):
        strategy.run(lambda x: layer(x, training=True), (x,))


def test_group_validation_and_fallback_outside_strategy():
    with pytest.raises(ValueError, match="Received: sync_group_size=0"):
        distribute.validate_group_size(0, 4)
    distribute.validate_group_size(2, 4)
    assert distribute.replica_context() is None and distribute.num_replicas() == 1
    x = tf.constant(np.arange(12, dtype="float32").reshape(6, 2))
    mean, var, count = distribute.global_moments(x, [0])
    np.testing.assert_allclose(mean, [5, 6])
    np.testing.assert_allclose(var, np.var(x.numpy(), 0))
    np.testing.assert_allclose(count, [6, 6])
    # synchronized=True without a strategy is ordinary BN.
    layer = tfbn.SyncBatchNormalization()
    ref = tfbn.BatchNormalization()
    np.testing.assert_allclose(layer(x, training=True), ref(x, training=True), atol=1e-6)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_sync_gradient_formula_reduces_to_batch_norm_gradient_on_one_device(data_format):
    """With the "global" sums taken over one device, the sync input gradient is
    ordinary batch norm's gradient (autodiff through the batch statistics)."""
    from tfbn import stats

    rng = np.random.default_rng(7)
    shape = (5, 3, 4, 6) if data_format == "NHWC" else (5, 6, 3, 4)
    axes = [0, 1, 2] if data_format == "NHWC" else [0, 2, 3]
    x = tf.constant(rng.normal(4, 2, shape).astype("float32"))
    dy = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    gamma = tf.constant(rng.uniform(0.5, 2, 6).astype("float32"))
    beta = tf.constant(rng.normal(0, 1, 6).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        mean, var, _ = stats.moments(x, axes)
        y = stats.normalize_with_moments(x, mean, var, gamma, beta, 1e-3, data_format)
        y_ref = tf.nn.batch_normalization(
            x,
            *(tf.reshape(t, stats._expand(t, axes).shape) for t in (mean, var, beta, gamma)),
            1e-3,
        )
        loss = tf.reduce_sum(y_ref * dy)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    want = tape.gradient(loss, x)

    mean, var, count = stats.fused_moments(x, data_format)
    dgamma, dbeta = stats.batch_norm_grad_sums(dy, x, mean, var, 1e-3, data_format)
    got = stats.sync_batch_norm_input_grad(
        dy, x, gamma, mean, var, 1e-3, dbeta, dgamma, count, data_format
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------ collectives --


def _communication(fn, *args):
    from tfbn import bench

    return bench.communication(fn, *args, replicas=REPLICAS)


# Per BN layer and training step (forward + backward + moving statistics + counters):
# (all-reduces, reductions to one device, broadcasts). Synchronised: the forward and
# the backward all-reduce only, since every replica already holds the same statistics
# and writes its own copy; grouped: one more all-reduce for the mean over groups;
# unsynchronised: one packed all-reduce of the new moving statistics and flags.
EXPECTED_TRAIN_COMMUNICATION = {
    "tfbn-fused": (2, 0, 0),
    "tfbn-unfused": (2, 0, 0),
    "tfbn-group": (3, 0, 0),
    "tfbn-group-unfused": (3, 0, 0),
    "tfbn-local": (1, 0, 0),
    "tfbn-local-unfused": (1, 0, 0),
    "tfbn-ghost": (1, 0, 0),
}
LAYER_FACTORIES = {
    # fused=True: "auto" takes the unfused path for inputs as small as these.
    "tfbn-fused": lambda: tfbn.SyncBatchNormalization(fused=True),
    "tfbn-unfused": lambda: tfbn.SyncBatchNormalization(fused=False),
    "tfbn-group": lambda: tfbn.SyncBatchNormalization(sync_group_size=2, fused=True),
    "tfbn-group-unfused": lambda: tfbn.SyncBatchNormalization(sync_group_size=2, fused=False),
    "tfbn-local": lambda: tfbn.BatchNormalization(fused=True),
    "tfbn-local-unfused": lambda: tfbn.BatchNormalization(fused=False),
    # Ghost batches normalise per replica (no forward all-reduce): averaged like local BN.
    "tfbn-ghost": lambda: tfbn.BatchNormalization(virtual_batch_size=2),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_TRAIN_COMMUNICATION))
def test_communication_per_layer_and_step_is_the_minimum(strategy, kind):
    """Counted in the traced graph of a training step (forward in training mode,
    backward, moving-statistics and counter writes) of a model of two BN layers."""
    assert strategy.num_replicas_in_sync == REPLICAS
    layers = 2
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((3, 3, 4))] + [LAYER_FACTORIES[kind]() for _ in range(layers)]
        )
    x = _per_replica(strategy, [np.ones((2, 3, 3, 4), "float32")] * REPLICAS)

    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=True)
        return tape.gradient(y, [x] + model.trainable_weights)

    @tf.function
    def train_fn(x):
        return strategy.run(train_step, (x,))

    counts = _communication(train_fn, x)
    train_fn(x)  # and it runs
    got = tuple(counts[k] / layers for k in ("all_reduce", "to_one_device", "broadcast"))
    assert got == EXPECTED_TRAIN_COMMUNICATION[kind], counts


@pytest.mark.parametrize(
    "make_layer, forward, train",
    [
        (lambda: tfbn.SyncBatchNormalization(fused=True), 1, 2),
        (lambda: tfbn.SyncBatchNormalization(fused=False), 1, 2),
        (lambda: tfbn.SyncBatchNormalization(sync_group_size=2, fused=True), 2, 3),
        (lambda: tfbn.BatchNormalization(fused=True), 1, 1),
        (lambda: keras.layers.BatchNormalization(synchronized=True), 3, 5),
    ],
    ids=["tfbn-fused", "tfbn-unfused", "tfbn-group", "tfbn-local", "keras-sync"],
)
def test_all_reduces_per_layer(strategy, make_layer, forward, train):
    """ReplicaContext.all_reduce calls (every replica equally) and all-reduce ops in the
    graph; forward includes the moving-statistics write (tfbn-group: the mean over the
    groups, tfbn-local: the packed mean over replicas). Keras sync: 3 + 2."""
    assert strategy.num_replicas_in_sync == REPLICAS
    layers = 2
    with strategy.scope():
        model = keras.Sequential([keras.Input((3, 3, 4))] + [make_layer() for _ in range(layers)])
    x = _per_replica(strategy, [np.ones((2, 3, 3, 4), "float32")] * REPLICAS)

    calls = collections.Counter()
    all_reduce = tf.distribute.ReplicaContext.all_reduce

    def counting_all_reduce(self, *args, **kwargs):
        calls[id(self)] += 1  # one ReplicaContext per replica
        return all_reduce(self, *args, **kwargs)

    def forward_step(x):
        return model(x, training=True)

    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=True)
        return tape.gradient(y, x)

    @tf.function
    def forward_fn(x):
        return strategy.run(forward_step, (x,))

    @tf.function
    def train_fn(x):
        return strategy.run(train_step, (x,))

    with mock.patch.object(tf.distribute.ReplicaContext, "all_reduce", counting_all_reduce):
        forward_fn(x)
        assert sum(calls.values()) == REPLICAS * layers * forward
        assert set(calls.values()) == {layers * forward}  # every replica, equally
        assert _communication(forward_fn, x)["all_reduce"] == layers * forward
        train_fn(x)
    assert _communication(train_fn, x)["all_reduce"] == layers * train


@pytest.mark.parametrize("kind", sorted(EXPECTED_TRAIN_COMMUNICATION))
def test_replica_copies_never_drift_apart(strategy, kind):
    """Many steps with different data on every replica (an empty shard, a NaN batch
    on one replica, large means): every replica's copy of the moving statistics and
    of the counters stays bit-for-bit identical."""
    assert strategy.num_replicas_in_sync == REPLICAS
    rng = np.random.default_rng(3)
    with strategy.scope():
        layer = LAYER_FACTORIES[kind]()
        if kind != "tfbn-ghost":
            layer = type(layer).from_config({**layer.get_config(), "momentum": 0.7})
        layer.build((None, 3, 3, 4))

    def replica_step(x):
        return layer(x, training=True)

    step = tf.function(lambda x: strategy.run(replica_step, (x,)))
    for i in range(12):
        rows = [4, 0, 6, 4] if i % 4 == 1 else [4, 2, 6, 4] if i % 3 else [4, 4, 4, 4]
        xs = [
            (rng.normal(1e3 * r, 1 + r, (n, 3, 3, 4))).astype("float32") for r, n in enumerate(rows)
        ]
        if i == 5:
            xs[2][0, 0, 0, 0] = np.nan  # one replica's statistics are not finite
        step(_per_replica(strategy, xs))
    for variable in (
        layer.moving_mean,
        layer.moving_variance,
        layer.num_batches_tracked,
        layer.num_skipped_updates,
    ):
        copies = [np.asarray(c) for c in strategy.experimental_local_results(variable.value)]
        assert len(copies) == REPLICAS
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0], err_msg=variable.name)
    assert not np.allclose(np.asarray(layer.moving_mean), 0)
    # The NaN step was skipped on one replica (unsynchronised) or everywhere (synced).
    assert int(layer.num_skipped_updates.numpy()) == 1
    # Fully synchronised layers skip the NaN step everywhere; otherwise some replica
    # (group) applied its update, and the step counts as tracked.
    fully_synced = kind in ("tfbn-fused", "tfbn-unfused")
    assert int(layer.num_batches_tracked.numpy()) == (11 if fully_synced else 12)


# -------------------------------------------------- unsynchronised replicas --


def test_unsynchronized_moving_stats_stay_equal_across_replicas(strategy):
    assert strategy.num_replicas_in_sync == REPLICAS
    xs = [
        np.full((4, 3), float(i), "float32") + np.arange(4, dtype="float32")[:, None]
        for i in range(REPLICAS)
    ]
    with strategy.scope():
        ours = tfbn.BatchNormalization(momentum=0.5)
        keras_bn = keras.layers.BatchNormalization(momentum=0.5)
        ours.build((None, 3))
        keras_bn.build((None, 3))
    for layer in (ours, keras_bn):
        tf.function(lambda x, layer=layer: strategy.run(lambda x: layer(x, training=True), (x,)))(
            _per_replica(strategy, xs)
        )
    # Each replica's own update: 0.5 * init + 0.5 * its batch statistic.
    per_replica_mean = [0.5 * 0 + 0.5 * x.mean(0) for x in xs]
    per_replica_var = [0.5 * 1 + 0.5 * x.var(0) for x in xs]
    for variable, updates in (
        (ours.moving_mean, per_replica_mean),
        (ours.moving_variance, per_replica_var),
    ):
        components = [np.asarray(v) for v in variable.value.values]
        assert len(components) == REPLICAS
        for c in components:
            np.testing.assert_allclose(c, np.mean(updates, 0), atol=1e-6)
    # Keras's layer keeps each replica's own update: its copies drift apart.
    keras_components = [np.asarray(v) for v in keras_bn.moving_mean.value.values]
    assert _max_diff(keras_components[0], keras_components[-1]) > 1.0


# ------------------------------------------------------ training and saving --


def _cnn(bn):
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )


def test_fit_save_and_reload(strategy, tmp_path):
    assert strategy.num_replicas_in_sync == REPLICAS
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    images = rng.normal(0, 1, (64, 8, 8, 3)).astype("float32") + labels[:, None, None, None]
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _cnn(lambda: tfbn.SyncBatchNormalization(momentum=0.9))
        model.compile(
            keras.optimizers.Adam(0.02),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(images, labels, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    bns = [layer for layer in model.layers if isinstance(layer, tfbn.BatchNormalization)]
    assert all(int(bn.num_batches_tracked.numpy()) == 12 for bn in bns)
    assert not np.allclose(np.asarray(bns[0].moving_mean), 0)

    path = tmp_path / "sync_cnn.keras"
    model.save(path)
    x = images[:8]
    want = np.asarray(model(x, training=False))
    reloaded = keras.models.load_model(path)
    new_bns = [layer for layer in reloaded.layers if isinstance(layer, tfbn.BatchNormalization)]
    for old, new in zip(bns, new_bns, strict=True):
        assert new.synchronized
        for a, b in zip(old.get_weights(), new.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(new.num_batches_tracked.numpy()) == 12
    np.testing.assert_allclose(reloaded(x, training=False), want, atol=1e-5)
    with strategy.scope():  # and it loads back under a strategy, mirrored
        again = keras.models.load_model(path)
    assert isinstance(again.layers[1].moving_mean.value, tf.distribute.DistributedValues)
    np.testing.assert_allclose(again(x, training=False), want, atol=1e-5)


# -------------------------------------------------------------- conversion --


def _models():
    seq = _cnn(keras.layers.BatchNormalization)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = tfbn.BatchNormalization()(h)
    functional = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
    inner = _cnn(keras.layers.BatchNormalization)
    outer_in = keras.Input((8, 8, 3))
    nested = keras.Model(outer_in, keras.layers.Dense(1)(inner(outer_in)))
    return {"sequential": seq, "functional": functional, "nested": nested}


def _bn_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _bn_layers(layer)
        elif isinstance(layer, (keras.layers.BatchNormalization, tfbn.BatchNormalization)):
            found.append(layer)
    return found


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested"])
def test_convert_sync_batch_norm_and_back_in_scope(strategy, kind):
    assert strategy.num_replicas_in_sync == REPLICAS
    rng = np.random.default_rng(0)
    with strategy.scope():
        model = _models()[kind]
        for bn in _bn_layers(model):
            c = bn.gamma.shape[0]
            bn.set_weights(
                [
                    rng.uniform(0.5, 2, c),
                    rng.normal(0, 1, c),
                    rng.normal(0, 1, c),
                    rng.uniform(0.5, 2, c),
                ]
            )
        synced = convert_sync_batch_norm(model, sync_group_size=2)
    old_bns, new_bns = _bn_layers(model), _bn_layers(synced)
    assert len(old_bns) == len(new_bns) >= 2
    for old, new in zip(old_bns, new_bns, strict=True):
        assert isinstance(new, tfbn.BatchNormalization) and new.synchronized
        assert new.sync_group_size == 2
        assert isinstance(new.moving_mean.value, tf.distribute.DistributedValues)
        for a, b in zip(old.get_weights(), new.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    x = rng.normal(0, 1, (8, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(synced(x, training=False), model(x, training=False), atol=1e-5)

    # One synchronised training step under the strategy runs, is finite and
    # updates the moving statistics.
    xd = _per_replica(strategy, np.split(x, REPLICAS))
    out = strategy.run(tf.function(lambda x: synced(x, training=True)), (xd,))
    assert all(np.all(np.isfinite(o)) for o in _local(strategy, out))

    with strategy.scope():
        local = revert_sync_batch_norm(synced)
    for old, new in zip(_bn_layers(synced), _bn_layers(local), strict=True):
        assert isinstance(new, tfbn.BatchNormalization) and not new.synchronized
        assert new.sync_group_size is None
        for a, b in zip(old.get_weights(), new.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(local(x, training=False), synced(x, training=False), atol=1e-5)


# -------------------------------------------------------------- benchmark --


def test_bench_sync_cli_reports_times_ratios_and_collectives(tmp_path):
    """`tfbn bench --sync` in a fresh process: it must split the CPU itself before
    TensorFlow starts (and a second strategy over this process's devices would
    share the test strategy's collective keys)."""
    from tfbn import bench

    out = tmp_path / "sync.json"
    argv = ["bench", "--sync", "--shape", "2,4,4,3", "--repeats", "1", "--json", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tfbn.cli", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for impl in bench.SYNC_IMPLEMENTATIONS:
        assert f"| {impl} |" in proc.stdout
    assert "target >= 2" in proc.stdout and "target <= 1.15" in proc.stdout
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["replicas"] == REPLICAS for r in rows.values())
    collectives = {name: r["collectives_per_layer_step"] for name, r in rows.items()}
    assert collectives == {
        "tfbn_sync": 2,
        "tfbn_local": 1,
        "keras_sync": 5,
        "keras_local": 0,
        "tfbn_sync_unfused": 2,
    }


def test_bench_sync_cli_rejects_one_replica(capsys):
    from tfbn import cli

    assert cli.main(["bench", "--sync", "--replicas", "1"]) == 2
    assert "--replicas must be at least 2" in capsys.readouterr().err


def test_synchronized_ghost_batches_are_refused():
    """A ghost batch is part of one replica's batch: `synchronized=True` with
    `virtual_batch_size` used to normalise per replica silently; now a ValueError,
    also when converting a model whose BN has virtual batches."""
    with pytest.raises(ValueError, match="synchronized=True cannot be combined with virtual"):
        tfbn.SyncBatchNormalization(virtual_batch_size=2)
    with pytest.raises(ValueError, match="'ghost'.*virtual_batch_size=2"):
        tfbn.BatchNormalization(synchronized=True, virtual_batch_size=2, name="ghost")
    model = keras.Sequential(
        [keras.Input((4,)), tfbn.BatchNormalization(virtual_batch_size=2, name="ghost_bn")]
    )
    with pytest.raises(ValueError, match="ghost_bn"):
        convert_sync_batch_norm(model)
