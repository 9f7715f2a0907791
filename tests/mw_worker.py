"""One worker of the MultiWorkerMirroredStrategy parity check (run by test_multiworker.py).

Usage: TF_CONFIG=... python mw_worker.py RESULT_JSON

Every worker holds one replica and its slice of a global batch that all workers
generate from the same seed. It runs 2 training steps of a synchronised tfbn BN
(fused and unfused paths) under the strategy, and the same steps with an
unsynchronised BN on the whole global batch on one device, then writes the max
abs differences (outputs, input gradients, summed gamma/beta gradients, moving
statistics) and the replica count to RESULT_JSON.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STEPS, ROWS_PER_REPLICA, SHAPE = 2, 6, (3, 3, 4)


def main(result_path: str) -> None:
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    import tfbn  # after the strategy: TensorFlow's runtime must not start before it

    replicas = strategy.num_replicas_in_sync
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(3, 2, (replicas * ROWS_PER_REPLICA, *SHAPE)).astype("float32"),
            rng.normal(0, 1, (replicas * ROWS_PER_REPLICA, *SHAPE)).astype("float32"),
        )
        for _ in range(STEPS)
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

    result = {"task": task, "replicas": replicas, "max_abs_diff": {}}
    for fused in ("auto", False):
        with strategy.scope():
            layer = tfbn.SyncBatchNormalization(fused=fused)
            layer.build((None, *SHAPE))
        layer.set_weights(weights)
        step = step_fn(layer)

        @tf.function
        def run(x, dy, step=step):
            y, dx, dgamma, dbeta = strategy.run(step, (x, dy))
            total = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
            return y, dx, total(dgamma), total(dbeta)

        diffs = {"y": 0.0, "dx": 0.0, "dgamma": 0.0, "dbeta": 0.0}
        for (x, dy), (y_ref, dx_ref, dg_ref, db_ref) in zip(batches, want, strict=True):

            def shard(ctx, array):
                i = ctx.replica_id_in_sync_group
                return tf.constant(array[i * ROWS_PER_REPLICA : (i + 1) * ROWS_PER_REPLICA])

            xd = strategy.experimental_distribute_values_from_function(lambda c, x=x: shard(c, x))
            dyd = strategy.experimental_distribute_values_from_function(lambda c, d=dy: shard(c, d))
            y, dx, dgamma, dbeta = run(xd, dyd)
            rows = slice(task * ROWS_PER_REPLICA, (task + 1) * ROWS_PER_REPLICA)
            local = lambda v: np.asarray(strategy.experimental_local_results(v)[0])  # noqa: E731
            for name, got, ref_value in (
                ("y", local(y), y_ref[rows]),
                ("dx", local(dx), dx_ref[rows]),
                ("dgamma", np.asarray(dgamma), dg_ref),
                ("dbeta", np.asarray(dbeta), db_ref),
            ):
                diffs[name] = max(diffs[name], float(np.max(np.abs(got - ref_value))))
        for name, ours, theirs in (
            ("moving_mean", layer.moving_mean, ref.moving_mean),
            ("moving_variance", layer.moving_variance, ref.moving_variance),
        ):
            diffs[name] = float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))
        result["max_abs_diff"]["fused" if fused == "auto" else "unfused"] = diffs

    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main(sys.argv[1])
