"""Synchronised BatchNorm across processes: MultiWorkerMirroredStrategy with two local workers.

Run without arguments, the script is the launcher: it picks two free ports on
127.0.0.1, starts itself twice as workers (`--worker`), each with its TF_CONFIG
(`{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}`), waits
for both with a bounded timeout (killing both if either fails or hangs), and
checks that both workers ended with identical BN moving statistics.

Each worker creates a `tf.distribute.MultiWorkerMirroredStrategy` (one replica
per process here; on a real cluster, list the hosts in TF_CONFIG), builds a small
CNN with `tfbn.BatchNormalization(synchronized=True)` in its scope, and trains a
few steps on its half of each global batch (a custom loop: Keras 3's
`model.fit` does not run under this strategy): the BN statistics are
all-reduced across the two processes, so both normalise with the statistics of
the global batch and write the same moving averages. (Identical
copies alone would not prove the synchronisation: tfbn's moving statistics are
mirrored variables, averaged over replicas on every update, synchronised or not.
tests/test_multiworker.py checks the synchronised outputs, gradients and
statistics against BN on the whole global batch on one device.)

    python examples/multiworker_sync_bn.py
    python examples/multiworker_sync_bn.py --crash-worker 1   # a dead peer, named at once

If a worker dies, the launcher blames the first worker that failed and stops the
others; a worker whose peer is dead names it (`tfbn.distribute.multi_worker_strategy`)
instead of hanging in the strategy's constructor.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

WORKERS = 2
PER_REPLICA_BATCH = 8
STEPS = 8


# ------------------------------------------------------------------- worker --


def worker(result_path: str) -> None:
    """One worker: TF_CONFIG says who it is. Writes its BN statistics to `result_path`."""
    if os.environ.get("TFBN_EXAMPLE_CRASH") == "before-connect":
        sys.exit(3)  # --crash-worker: this worker dies before the cluster forms
    import tensorflow as tf

    from tfbn import distribute

    # The strategy must exist before anything else initialises TensorFlow's runtime,
    # so Keras is imported after it. tfbn's constructor bounds the wait for the
    # peers (a dead peer is named within --connect-timeout instead of a silent hang)
    # and makes all-reduces with a dead peer fail after 60 s.
    strategy = distribute.multi_worker_strategy(
        connect_timeout=float(os.environ.get("TFBN_CONNECT_TIMEOUT", "60")), collective_timeout=60
    )
    import keras
    from sklearn.datasets import load_digits

    import tfbn

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    global_batch = PER_REPLICA_BATCH * strategy.num_replicas_in_sync
    # Every worker builds the same dataset of global batches; the strategy gives each
    # worker its share of every batch (auto-sharding by data).
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, digits.target))
        .shuffle(len(x), seed=0)
        .batch(global_batch, drop_remainder=True)
        .take(STEPS)
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)

    keras.utils.set_random_seed(0)  # the same initial weights on every worker
    with strategy.scope():
        inputs = keras.Input((8, 8, 1), name="image")
        h = inputs
        for i, filters in enumerate((16, 32), start=1):
            h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
            h = tfbn.BatchNormalization(synchronized=True, momentum=0.9, name=f"bn{i}")(h)
            h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction="sum")

    # A custom training loop: Keras 3's model.fit does not work under
    # MultiWorkerMirroredStrategy (keras-team/keras#20585); under MirroredStrategy it does.
    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = cross_entropy(y, model(x, training=True)) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduced
            return loss

        return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    losses = [float(train_step(iterator)) for _ in range(STEPS)]

    result = {
        "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"],
        "replicas": strategy.num_replicas_in_sync,
        "losses": losses,
        "batches_tracked": int(model.get_layer("bn1").num_batches_tracked.numpy()),
        "stats": {
            f"bn{i}/{name}": keras.ops.convert_to_numpy(
                getattr(model.get_layer(f"bn{i}"), name)
            ).tolist()
            for i in (1, 2)
            for name in ("moving_mean", "moving_variance")
        },  # fmt: skip
        "weights": {
            v.path: keras.ops.convert_to_numpy(v).tolist() for v in model.trainable_variables
        },
    }
    Path(result_path + ".tmp").write_text(json.dumps(result))
    os.replace(result_path + ".tmp", result_path)  # the launcher never reads half a file


# ----------------------------------------------------------------- launcher --


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(
    out: Path, timeout: float, connect_timeout: float = 60.0, crash_worker: int | None = None
) -> list[dict]:
    """Starts the workers, waits at most `timeout` seconds in all, returns their results.

    All workers are watched together: the first one to fail is the one blamed (with
    its log), and the others are killed at once instead of waiting for them.
    """
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(WORKERS)]}
    procs, logs = [], []
    deadline = time.monotonic() + timeout
    try:
        for index in range(WORKERS):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(tf_config),
                "CUDA_VISIBLE_DEVICES": "",
                "TFBN_CONNECT_TIMEOUT": str(connect_timeout),
            }
            if index == crash_worker:
                env["TFBN_EXAMPLE_CRASH"] = "before-connect"
            logs.append(open(out / f"worker{index}.log", "w"))  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(out / f"worker{index}.json")],
                env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
            ))  # fmt: skip
        print(f"started {WORKERS} workers, cluster {cluster['worker']}")
        while True:
            codes = [proc.poll() for proc in procs]  # every worker, every round
            if all(code is not None for code in codes):
                break
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                tail = (out / f"worker{index}.log").read_text()[-3000:]
                raise RuntimeError(
                    f"worker {index} ({cluster['worker'][index]}) failed first, exit code {code}; "
                    f"the other workers were stopped. Its log ends:\n{tail}"
                )
            if time.monotonic() > deadline:
                running = [i for i, p in enumerate(procs) if p.poll() is None]
                raise RuntimeError(f"worker(s) {running} did not finish within {timeout:.0f} s")
            time.sleep(0.2)
        for index, proc in enumerate(procs):
            if proc.returncode != 0:
                tail = (out / f"worker{index}.log").read_text()[-3000:]
                raise RuntimeError(f"worker {index} exited with {proc.returncode}:\n{tail}")
    finally:  # on any failure, no worker is left waiting for its peer
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL: a worker waiting for its peers ignores SIGTERM
                proc.wait(timeout=30)
        for log in logs:
            log.close()
    return [json.loads((out / f"worker{i}.json").read_text()) for i in range(WORKERS)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="folder for worker logs and results (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for both workers")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds a worker waits for its peers before naming the missing ones",
    )
    parser.add_argument(
        "--crash-worker",
        type=int,
        choices=range(WORKERS),
        help="simulate a failure: this worker dies before the cluster forms",
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    out = Path(args.out or tempfile.mkdtemp(prefix="tfbn-multiworker-"))
    out.mkdir(parents=True, exist_ok=True)
    results = launch(out, args.timeout, args.connect_timeout, args.crash_worker)
    for r in results:
        print(
            f"worker {r['task']}: {r['replicas']} replicas in sync, {r['batches_tracked']} "
            f"batches tracked, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        )
        assert r["replicas"] == WORKERS and r["batches_tracked"] == STEPS, r
    first, second = (r["stats"] for r in results)
    for key in first:
        diff = float(np.max(np.abs(np.subtract(first[key], second[key]))))
        print(f"  {key:<20} max |worker0 - worker1| = {diff:.1e}")
        assert diff <= 1e-6, (key, diff)
    # The gradients were all-reduced too: the trained weights agree.
    diff = max(
        float(np.max(np.abs(np.subtract(results[0]["weights"][k], results[1]["weights"][k]))))
        for k in results[0]["weights"]
    )
    print(f"  {'trainable weights':<20} max |worker0 - worker1| = {diff:.1e}")
    assert diff <= 1e-6, diff
    moved = any(np.any(np.asarray(first[k]) != 0) for k in first if k.endswith("moving_mean"))
    assert moved, "the moving statistics never moved"
    print("both workers hold the same moving statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
