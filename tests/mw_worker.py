"""One worker of the MultiWorkerMirroredStrategy tests (run by test_multiworker.py).

Usage: TF_CONFIG=... python mw_worker.py RESULT_JSON [--devices N]
           [--connect-timeout S] [--die-after-steps K] [--steps K]

Every worker holds `--devices` replicas (logical CPUs) and their slices of a global
batch that all workers generate from the same seed. It runs training steps of a
synchronised tfbn BN (fused and unfused paths) under the strategy, made by
`tfbn.distribute.multi_worker_strategy` (bounded connect and collective timeouts),
and the same steps with an unsynchronised BN on the whole global batch on one
device, then writes the max differences (relative above 1) (outputs, input gradients, summed
gamma/beta gradients, moving statistics), whether its replicas' copies of the moving
statistics are identical, and the replica count to RESULT_JSON.

`--die-after-steps K` makes the process vanish (os._exit, as a crash) after K
distributed steps; a surviving worker then fails its next all-reduce, and writes
an error naming the dead peer to stderr and exits 1.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROWS_PER_REPLICA, SHAPE = 6, (3, 3, 4)


def _local_devices(devices):
    """TensorFlow puts one replica on a CPU-only worker; with `devices` logical CPUs
    (test only) the worker holds that many replicas, as a multi-GPU worker would,
    so the hierarchical (local + cross-worker) collective path runs."""
    from tensorflow.python.distribute import collective_all_reduce_strategy as cars

    def local(self, cluster_resolver, worker_device):
        return tuple(f"{worker_device}/device:CPU:{i}" for i in range(devices)), "CPU"

    cars.CollectiveAllReduceExtended._initialize_local_devices = local
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * devices
    )


def _diff(got, want) -> float:
    """max |got - want|, relative to the size of `want` where that exceeds 1."""
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


def main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--die-after-steps", type=int)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.devices > 1:
        _local_devices(args.devices)

    from tfbn import distribute

    strategy = distribute.multi_worker_strategy(
        connect_timeout=args.connect_timeout, collective_timeout=30
    )

    import tfbn  # after the strategy: TensorFlow's runtime must not start before it

    replicas = strategy.num_replicas_in_sync
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(3, 2, (replicas * ROWS_PER_REPLICA, *SHAPE)).astype("float32"),
            rng.normal(0, 1, (replicas * ROWS_PER_REPLICA, *SHAPE)).astype("float32"),
        )
        for _ in range(args.steps)
    ]
    weights = [
        rng.uniform(0.5, 1.5, SHAPE[-1]).astype("float32"),
        rng.normal(0, 0.5, SHAPE[-1]).astype("float32"),
        np.zeros(SHAPE[-1], "float32"),
        np.ones(SHAPE[-1], "float32"),
    ]

    def step_fn(layer):
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            return y, dx, dgamma, dbeta

        return step

    ref = tfbn.BatchNormalization()
    ref.build((None, *SHAPE))
    ref.set_weights(weights)
    ref_step = tf.function(step_fn(ref))
    want = [[np.asarray(t) for t in ref_step(tf.constant(x), tf.constant(dy))] for x, dy in batches]

    result = {"task": task, "replicas": replicas, "max_diff": {}, "copies_identical": {}}
    steps_done = 0
    for fused in (True, False):
        with strategy.scope():
            layer = tfbn.SyncBatchNormalization(fused=fused)
            layer.build((None, *SHAPE))
        layer.set_weights(weights)
        step = step_fn(layer)

        @tf.function
        def run(x, dy, step=step):
            y, dx, dgamma, dbeta = strategy.run(step, (x, dy))
            total = lambda t: strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None)  # noqa: E731
            return y, dx, total(dgamma), total(dbeta)

        diffs = {"y": 0.0, "dx": 0.0, "dgamma": 0.0, "dbeta": 0.0}
        for (x, dy), (y_ref, dx_ref, dg_ref, db_ref) in zip(batches, want, strict=True):

            def shard(ctx, array):
                i = ctx.replica_id_in_sync_group
                return tf.constant(array[i * ROWS_PER_REPLICA : (i + 1) * ROWS_PER_REPLICA])

            xd = strategy.experimental_distribute_values_from_function(lambda c, x=x: shard(c, x))
            dyd = strategy.experimental_distribute_values_from_function(lambda c, d=dy: shard(c, d))
            if args.die_after_steps is not None and steps_done == args.die_after_steps:
                sys.stderr.write(f"worker {task}: crashing on purpose after {steps_done} steps\n")
                sys.stderr.flush()
                os._exit(9)
            try:
                y, dx, dgamma, dbeta = run(xd, dyd)
            except tf.errors.OpError as error:
                _, peers = distribute.cluster_peers()
                sys.stderr.write(
                    f"worker {task}: training step {steps_done} failed "
                    f"({type(error).__name__}): {distribute.describe_peers(peers)}\n"
                )
                sys.stderr.flush()
                os._exit(1)  # the strategy's threads may still wait on the dead peer
            steps_done += 1
            local_rows = [
                slice(r * ROWS_PER_REPLICA, (r + 1) * ROWS_PER_REPLICA)
                for r in range(
                    task * len(strategy.extended.worker_devices),
                    (task + 1) * len(strategy.extended.worker_devices),
                )
            ]
            got_y = np.concatenate([np.asarray(v) for v in strategy.experimental_local_results(y)])
            got_dx = np.concatenate(
                [np.asarray(v) for v in strategy.experimental_local_results(dx)]
            )
            want_y = np.concatenate([y_ref[r] for r in local_rows])
            want_dx = np.concatenate([dx_ref[r] for r in local_rows])
            for name, got, ref_value in (
                ("y", got_y, want_y),
                ("dx", got_dx, want_dx),
                ("dgamma", np.asarray(dgamma), dg_ref),
                ("dbeta", np.asarray(dbeta), db_ref),
            ):
                diffs[name] = max(diffs[name], _diff(got, ref_value))
        path = "fused" if fused is True else "unfused"
        for name, ours, theirs in (
            ("moving_mean", layer.moving_mean, ref.moving_mean),
            ("moving_variance", layer.moving_variance, ref.moving_variance),
        ):
            diffs[name] = _diff(np.asarray(ours), np.asarray(theirs))
            copies = [np.asarray(c) for c in strategy.experimental_local_results(ours.value)]
            result["copies_identical"][f"{path}/{name}"] = all(
                np.array_equal(c, copies[0]) for c in copies
            )
        result["max_diff"][path] = diffs
        result["moving_mean"] = np.asarray(layer.moving_mean).tolist()

    with open(args.result + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(args.result + ".tmp", args.result)


if __name__ == "__main__":
    main(sys.argv[1:])
