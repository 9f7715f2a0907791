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

import tensorflow as tf

from tfbn import stats


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
    gradient gives the local sums `sum(dy)`, `sum(dy * xhat)` in one pass; ONE
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
            _, dgamma, dbeta = stats.fused_batch_norm_frozen_grad(
                dy, x, gamma, mean, variance, epsilon, data_format
            )
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
    values: list[tf.Tensor], keep: tf.Tensor, counts: tf.Tensor
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """Mean of each of `values` over the replicas whose `keep` is True: one all-reduce.

    For unsynchronised BN's moving statistics: a replica that skipped its update
    (non-finite batch statistics) must not pull the mean towards its old value,
    nor push NaN into it. Its values are selected away (never multiplied by 0).

    Args:
        values: Per-replica tensors (e.g. updated moving statistics), float.
        keep: Scalar bool, this replica's decision to apply its values.
        counts: 1-D int64, this replica's event counts (e.g. skipped updates).

    Returns:
        `(means, kept, counts_total)`: the means over keeping replicas (zeros
        where none kept; callers then keep the old value), the number of keeping
        replicas and the sum of `counts` over replicas, the same on every
        replica. Outside a multi-replica context: `values`, `keep` as 0/1, `counts`.
    """
    ctx = replica_context()
    if ctx is None:
        return list(values), tf.cast(keep, tf.int64), counts
    dtype = values[0].dtype
    flat = [tf.where(keep, tf.reshape(v, [-1]), tf.zeros_like(tf.reshape(v, [-1]))) for v in values]
    flags = tf.concat([tf.cast(keep, dtype)[None], tf.cast(counts, dtype)], 0)
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(flat + [flags], 0))
    n = counts.shape[0]
    kept, counts_total = total[-n - 1], total[-n:]
    means, start = [], 0
    for v in values:
        size = v.shape.num_elements()  # per-channel statistics: static shapes
        part = total[start : start + size]
        means.append(tf.reshape(tf.math.divide_no_nan(part, kept), tf.shape(v)))
        start += size
    return means, tf.cast(kept, tf.int64), tf.cast(counts_total, tf.int64)


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
    rows = tf.one_hot(group, replicas // group_size, dtype=value.dtype)
    rows = tf.reshape(rows, [-1] + [1] * value.shape.rank)
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows * value[tf.newaxis])
    return tf.gather(total, group)


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
