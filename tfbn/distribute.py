"""The only tfbn module that touches `tf.distribute`.

Cross-replica batch statistics in ONE packed `ReplicaContext.all_reduce` per call:
each replica computes two-pass moments of its own shard (`tfbn.stats.moments`),
packs them as float64 moment sums `[n, n*mean, n*(var + mean^2)]`
(`tfbn.stats.moment_sums`), and a single SUM all-reduce gives every replica the
count-weighted moments of the global batch (`tfbn.stats.moments_from_sums`).

- Exact for uneven shards: everything is weighted by the per-channel count, so a
  replica with an empty shard contributes nothing, masks count only what they keep,
  and an all-empty global batch reports count 0 (callers then skip the update).
- Stable: shard moments are two-pass and the merge runs in float64, so a channel
  mean of 1e4 against a std of 1 costs no accuracy (Keras's `synchronized=True`
  uses float32 `E[x^2] - E[x]^2` and loses it).
- Differentiable: `ReplicaContext.all_reduce(SUM)` all-reduces its gradient, so
  gradients flow through the global statistics to every replica's inputs.
- Groups: `group_size=k` syncs consecutive groups of k replicas. Still one
  all-reduce: each replica writes its sums into its group's row of a
  `[num_groups, ...]` buffer and reads its own group's row back.

Two paths use it. `global_moments` (any rank, masks, float64): autodiff through
the all-reduce. `sync_fused_batch_norm` (the layer's fused path): local moments
on the fused kernel, normalisation with the global ones held fixed, and a custom
gradient that all-reduces the two backward sums once, as PyTorch's SyncBatchNorm. Both
issue one all-reduce forward and one backward per layer; on 4 logical CPU
replicas the fused path is ~1.8x faster (`tfbn bench --sync`, row
`tfbn_sync_unfused`), so the layer uses it wherever its fused kernel applies.

Outside a strategy (or under the default strategy, or with one replica) the local
moments are returned unchanged and no collective is issued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import tensorflow as tf

from tfbn import _watchdog, stats
from tfbn._watchdog import describe_peers, unreachable_peers  # noqa: F401 (re-exported)


def replica_context() -> tf.distribute.ReplicaContext | None:
    """The current replica context when more than one replica is in sync, else None."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def num_replicas() -> int:
    """Replicas in sync in the current context (1 outside a strategy)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None:
        return ctx.num_replicas_in_sync
    return tf.distribute.get_strategy().num_replicas_in_sync


def validate_group_size(group_size: int | None, replicas: int) -> None:
    """Raises ValueError unless `group_size` is None or divides `replicas`."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size < 1 or replicas % group_size:
        raise ValueError(
            "`sync_group_size` must be a positive integer that divides the number of "
            f"replicas in sync ({replicas}). Received: sync_group_size={group_size!r}"
        )


def global_moments(
    x: tf.Tensor,
    axes: list[int],
    mask: tf.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Moments of `x` over `axes` and over all replicas (or the replica's group).

    Returns `(mean, variance, count)` like `tfbn.stats.moments`, where `count` is
    the global number of values per channel. One all-reduce when replicated.
    """
    return all_reduce_moments(*stats.moments(x, axes, mask), group_size)


def all_reduce_moments(
    mean: tf.Tensor, variance: tf.Tensor, count: tf.Tensor, group_size: int | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Merges per-replica `(mean, variance, count)` into global ones: one all-reduce.

    The local moments come back unchanged outside a multi-replica context.
    """
    ctx = replica_context()
    if ctx is None:
        return mean, variance, count
    total = _all_reduce_sum(ctx, stats.moment_sums(mean, variance, count), group_size)
    return stats.moments_from_sums(total, mean.dtype)


def sync_fused_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    epsilon: float,
    data_format: str,
    group_size: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Synchronised batch norm of a 4D `x` on the fused kernel, with a custom gradient.

    Forward: local moments on the fused kernel (`tfbn.stats.fused_moments`), one
    all-reduce merges them (`all_reduce_moments`), and one XLA-fused pass
    normalises with the global statistics (`tfbn.stats.normalize_with_moments`):
    two passes over the data, as in local BN, plus the per-channel all-reduce.
    Backward (as PyTorch's SyncBatchNorm): the fused kernel's fixed-statistics
    gradient gives the local sums `sum(dy)`, `sum(dy * xhat)` in one pass
    (`tfbn.stats.batch_norm_grad_sums`); ONE
    all-reduce of those two sums; then one fused pass computes the input
    gradient including the terms that flow through the global mean and variance
    (`tfbn.stats.sync_batch_norm_input_grad`). gamma/beta gradients stay local
    (the optimizer sums them over replicas, as for any weight).

    Must run in a replica context (see `replica_context`). `x` is NHWC or NCHW
    (`data_format`) float16/bfloat16/float32; `gamma`/`beta` float32 tensors.

    Returns:
        `(y, mean, variance, count)` with the global statistics, as the layer's
        other paths return them.
    """
    ctx = replica_context()
    if ctx is None:
        raise RuntimeError("sync_fused_batch_norm needs a replica context with > 1 replica.")
    local = stats.fused_moments(tf.stop_gradient(x), data_format)
    mean, variance, count = all_reduce_moments(*local, group_size)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        y = stats.normalize_with_moments(x, mean, variance, gamma, beta, epsilon, data_format)

        def grad(dy):
            dgamma, dbeta = stats.batch_norm_grad_sums(dy, x, mean, variance, epsilon, data_format)
            sum_dy, sum_dy_xhat = tf.unstack(
                _all_reduce_sum(ctx, tf.stack([dbeta, dgamma]), group_size)
            )
            dx = stats.sync_batch_norm_input_grad(
                dy, x, gamma, mean, variance, epsilon, sum_dy, sum_dy_xhat, count, data_format
            )
            return dx, dgamma, dbeta

        return y, grad

    return normalize(x, gamma, beta), mean, variance, count


def mean_over_replicas_where(
    values: list[tf.Tensor],
    keep: tf.Tensor,
    counts: tf.Tensor,
    equal_within: int | None = 1,
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """Mean of each of `values` over the replicas whose `keep` is True: at most ONE all-reduce.

    For BN's moving statistics: a replica that skipped its update (non-finite
    batch statistics) must not pull the mean towards its old value, nor push NaN
    into it. Its values are selected away (never multiplied by 0).

    Args:
        values: Per-replica tensors (e.g. updated moving statistics), float.
        keep: Scalar bool, this replica's decision to apply its values.
        counts: 1-D int64, this replica's event counts (e.g. skipped updates).
        equal_within: How many consecutive replicas are already known to hold
            identical arguments: None or the replica count (synchronised BN: no
            collective, the arguments come back as they are), a group size
            (grouped sync BN: means and counts are over groups), or 1
            (unsynchronised: over replicas).

    Returns:
        `(means, kept, counts_total)`: the means over keeping replicas (groups)
        (zeros where none kept; callers then keep the old value), the number of
        keeping replicas (groups) and the sum of `counts` over replicas (groups),
        the same on every replica. Without communication: `values`, `keep` as
        0/1, `counts`.
    """
    ctx = replica_context()
    replicas = 1 if ctx is None else ctx.num_replicas_in_sync
    if equal_within is None or equal_within == replicas:
        return list(values), tf.cast(keep, tf.int64), counts
    validate_group_size(equal_within, replicas)
    dtype = values[0].dtype
    flat = [tf.where(keep, tf.reshape(v, [-1]), tf.zeros_like(tf.reshape(v, [-1]))) for v in values]
    flags = tf.concat([tf.cast(keep, dtype)[None], tf.cast(counts, dtype)], 0)
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(flat + [flags], 0))
    n = counts.shape[0]
    # Each group's members contributed identical values: the sums are equal_within
    # times the sums over groups, so the means are unchanged and counts are divided.
    kept = total[-n - 1]
    counts_total = total[-n:] / tf.cast(equal_within, dtype)
    means, start = [], 0
    for v in values:
        size = v.shape.num_elements()  # per-channel statistics: static shapes
        part = total[start : start + size]
        means.append(tf.reshape(tf.math.divide_no_nan(part, kept), tf.shape(v)))
        start += size
    kept_groups = kept / tf.cast(equal_within, dtype)
    return (
        means,
        tf.cast(tf.round(kept_groups), tf.int64),
        tf.cast(tf.round(counts_total), tf.int64),
    )


def _all_reduce_sum(
    ctx: tf.distribute.ReplicaContext, value: tf.Tensor, group_size: int | None
) -> tf.Tensor:
    """SUM of `value` over all replicas, or over the replica's group: one all-reduce.

    Groups share the collective: each replica writes `value` into its group's row
    of a `[num_groups, ...]` zero buffer, all replicas sum the buffer, and each
    reads its own group's row back.
    """
    replicas = ctx.num_replicas_in_sync
    validate_group_size(group_size, replicas)
    if group_size is None or group_size == replicas:
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
    group = ctx.replica_id_in_sync_group // group_size
    rows = tf.one_hot(group, replicas // group_size, on_value=True, off_value=False)
    rows = tf.reshape(rows, [-1] + [1] * value.shape.rank)
    zeros = tf.zeros_like(value)[tf.newaxis]
    # tf.where, not a one-hot product: 0 * NaN would carry one group's NaN into every
    # group. A dense read-back, not tf.gather: the gradient of a gather is
    # IndexedSlices, whose all-reduce in the backward pass becomes extra all-gathers.
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(rows, value[tf.newaxis], zeros))
    return tf.reduce_sum(tf.where(rows, total, zeros), 0)


# ------------------------------------------------ moving-statistics writes --
# A training step writes the moving statistics (and counters) of every BN layer.
# Mirrored variables aggregate replica-context writes (`aggregation="mean"`: a
# reduction to one device and a broadcast back; `"only_first_replica"`: a
# broadcast), although synchronised layers already hold identical values on
# every replica. `mean_over_replicas_where` makes the values identical with at most one
# packed all-reduce (none when they already are), and `assign_own_copy` then
# writes each replica's own copy without any communication. Because every copy
# receives the same value computed from the same inputs, the copies never drift.


def assign_own_copy(variable, value: tf.Tensor, add: bool = False) -> None:
    """`variable.assign(value)` (or `assign_add`) on this replica's own copy only.

    `value` must be identical on every replica (synchronised statistics, or the
    output of `mean_over_replicas_where`): each replica then writes the same value into its
    own copy of the mirrored variable, with no aggregation and no communication.
    Outside a multi-replica context, or for a variable that is not mirrored per
    replica, it is the variable's ordinary (aggregated) assignment.
    """
    target = _own_copy(variable)
    if target is None:
        # The tf.Variable under a Keras variable: its assign_add is one
        # AssignAddVariableOp where Keras's is a read, an add and an assign.
        target = variable.value if isinstance(variable, keras.Variable) else variable
    if add:
        target.assign_add(tf.cast(value, target.dtype))
    else:
        target.assign(tf.cast(value, target.dtype))


def _own_copy(variable):
    """The component of a mirrored `variable` that belongs to the current replica, or None."""
    if replica_context() is None:
        return None
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if not isinstance(value, tf.distribute.DistributedValues):
        return None
    # TensorFlow's own replica-local read: the component of this replica.
    local = getattr(value, "_get_on_device_or_primary", None)
    return None if local is None else local()


# ------------------------------------------------- whole-dataset reductions --
# For `tfbn.calibrate`: run a function on every replica and sum its outputs.


def model_strategy(model) -> tf.distribute.Strategy | None:
    """The strategy `model` was created under (Keras records it), else the one in
    scope, else None (no strategy: run locally)."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def strategy_replicas(strategy: tf.distribute.Strategy | None) -> int:
    """Replicas in sync of `strategy` (1 for None)."""
    return 1 if strategy is None else strategy.num_replicas_in_sync


def distribute_dataset(strategy: tf.distribute.Strategy | None, dataset):
    """`dataset` split into per-replica shards of each global batch (unchanged for None)."""
    return dataset if strategy is None else strategy.experimental_distribute_dataset(dataset)


def run_and_sum(strategy: tf.distribute.Strategy | None, fn, *args):
    """Runs `fn(*args)` on every replica of `strategy` and returns the SUM of its
    outputs (a structure of tensors) over replicas; `fn(*args)` without a strategy.

    Cross-replica SUM of float64 moment sums is what makes whole-dataset statistics
    global and exact (`tfbn.stats.moments_from_sums`). Call it inside a
    `tf.function`; `args` come from a dataset made by `distribute_dataset`.
    """
    if strategy is None:
        return fn(*args)
    per_replica = strategy.run(fn, args=args)
    return tf.nest.map_structure(
        lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None), per_replica
    )


# ------------------------------------------------------- multi-worker start --
# `tf.distribute.MultiWorkerMirroredStrategy()` blocks in C++ until every worker of
# TF_CONFIG has connected: with a peer that died before connecting it never returns
# (and ignores SIGTERM). `multi_worker_strategy` bounds that wait and names the
# peers that could not be reached.


def cluster_peers(tf_config: str | None = None) -> tuple[dict, list[tuple[str, int, str]]]:
    """`(task, [(job, index, "host:port"), ...])` of the other tasks in TF_CONFIG.

    Raises ValueError naming TF_CONFIG when it is missing or malformed.
    """
    text = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    try:
        config = json.loads(text or "")
        cluster, task = config["cluster"], config["task"]
        me = (task["type"], int(task["index"]))
        peers = [
            (job, index, address)
            for job, addresses in cluster.items()
            for index, address in enumerate(addresses)
            if (job, index) != me
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            "A multi-worker strategy needs TF_CONFIG as JSON with a cluster and this "
            '"task": {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
            f'"worker", "index": i}}}}. Received: TF_CONFIG={text!r} ({error})'
        ) from None
    return task, peers


def multi_worker_strategy(
    connect_timeout: float | None = 60.0,
    collective_timeout: float | None = 60.0,
    **kwargs,
) -> tf.distribute.MultiWorkerMirroredStrategy:
    """`tf.distribute.MultiWorkerMirroredStrategy` that fails fast when a peer is dead.

    Args:
        connect_timeout: Seconds to wait for every worker of TF_CONFIG to connect.
            TensorFlow's constructor waits in C++ holding the GIL and ignores
            SIGTERM, so when it has not returned by then a watchdog process
            (`tfbn._watchdog`) prints which peers do not accept connections
            (e.g. "worker 1 at 127.0.0.1:4242 is not reachable (Connection
            refused)") to stderr and ends this process with SIGKILL. None waits
            forever (TensorFlow's behaviour).
        collective_timeout: Seconds after which a collective (all-reduce) whose
            peer has died fails with an error (`CommunicationOptions`), so a
            worker dying mid-training stops the others too. None: no timeout.
        **kwargs: Passed to the strategy (e.g. `cluster_resolver`).

    Must run before anything initialises TensorFlow's runtime, as the strategy itself.
    """
    for name, value in (
        ("connect_timeout", connect_timeout),
        ("collective_timeout", collective_timeout),
    ):
        if value is not None and not value > 0:
            raise ValueError(
                f"`{name}` must be a positive number of seconds or None. Received: {name}={value!r}"
            )
    task, peers = cluster_peers()
    if collective_timeout is not None and "communication_options" not in kwargs:
        kwargs["communication_options"] = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout
        )
    watchdog = None
    if connect_timeout is not None:
        # A process, not a thread: the constructor holds the GIL while it waits.
        watchdog = subprocess.Popen(
            # Run by path: `-m tfbn._watchdog` would import tfbn, hence TensorFlow.
            [
                sys.executable,
                _watchdog.__file__,
                str(os.getpid()),
                str(connect_timeout),
                f"{task.get('type')} {task.get('index')}",
                json.dumps(peers),
            ],
            stdin=subprocess.PIPE,
        )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(**kwargs)
    finally:
        if watchdog is not None:
            watchdog.stdin.close()  # connected (or failed): the watchdog exits
            try:
                watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                watchdog.kill()
