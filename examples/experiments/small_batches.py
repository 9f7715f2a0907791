"""Experiment 1: small per-replica batches, local BN vs synchronised BN.

Claim (practice: Peng et al. 2018 "MegDet", Wu & He 2018 "Group Normalization",
PyTorch's SyncBatchNorm docs): with only a few examples per device, BN's batch
statistics are noisy and accuracy drops; synchronising the statistics across
replicas (BN over the global batch) restores it.

Setup: 4 replicas (logical CPUs under `tf.distribute.MirroredStrategy`) with 2 or 4
examples each, the demo's CNN (Conv-BN-ReLU x2, global pooling, dense softmax)
with `tfbn.BatchNormalization(synchronized=False)` ("local": each replica
normalises with its own 2-4 examples) vs `synchronized=True` (statistics of the
global batch of 8-16 via one all-reduce), trained with Adam on scikit-learn's digits,
test accuracy in inference mode over several seeds (mean +- std).

    python examples/experiments/small_batches.py            # full: ~2-3 min on 2 cores
    python examples/experiments/small_batches.py --quick    # one seed, one short epoch
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import experiment_utils as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402

NAME = "small_batches"


def train_one(
    strategy,
    data,
    synchronized: bool,
    per_replica: int,
    seed: int,
    epochs: int,
    steps: int | None,
    lr: float,
) -> dict:
    x_train, x_test, y_train, y_test = data
    global_batch = per_replica * strategy.num_replicas_in_sync
    keras.utils.set_random_seed(seed)
    # drop_remainder: every replica always gets exactly `per_replica` examples.
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(global_batch, drop_remainder=True)
    )
    if steps is not None:
        dataset = dataset.take(steps)
    with strategy.scope():
        model = common.build_cnn(synchronized)
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
        )
    history = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)  # already shuffled
    bns = [la for la in model.layers if isinstance(la, tfbn.BatchNormalization)]
    assert all(bn.synchronized == synchronized for bn in bns)
    # Inference mode, on one device: `model.predict` would split the last partial
    # batch over the replicas, and with 8 replicas one gets an empty shard, which
    # TensorFlow's CPU Conv2D mishandles (it returns its input unchanged).
    probs = model(x_test, training=False)
    return {
        "accuracy": common.accuracy(probs, y_test),
        "final_loss": float(history.history["loss"][-1]),
        "steps": int(bns[0].num_batches_tracked.numpy()),
    }


def verdict_for(rows: list[dict]) -> str:
    parts, signs = [], []
    for per_replica in sorted({r["per_replica_batch"] for r in rows}):
        local = next(
            r for r in rows if r["per_replica_batch"] == per_replica and r["bn"] == "local"
        )
        sync = next(r for r in rows if r["per_replica_batch"] == per_replica and r["bn"] == "sync")
        gain = 100 * (sync["acc_mean"] - local["acc_mean"])
        noise = 100 * max(local["acc_std"], sync["acc_std"], 0.005)
        if gain > noise:
            signs.append("+")
            word = "improved"
        elif gain < -noise:
            signs.append("-")
            word = "lowered"
        else:
            signs.append("0")
            word = "changed (within seed noise)"
        parts.append(
            f"{per_replica}/replica: sync BN {word} mean test accuracy by {gain:+.1f} points "
            f"({100 * local['acc_mean']:.1f} -> {100 * sync['acc_mean']:.1f}%)"
        )
    if all(s == "+" for s in signs):
        head = "Reproduced"
    elif "-" in signs:
        head = "Contradicted"
    elif "+" in signs:
        head = "Partly reproduced"
    else:
        head = "Did not reproduce (differences within seed noise)"
    caveat = " (one seed: no estimate of seed noise)" if min(r["seeds"] for r in rows) < 2 else ""
    return f"{head}{caveat}: " + "; ".join(parts) + "."


def main(argv=None) -> dict:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = common.base_parser(__doc__.splitlines()[0], full_seeds=3)
    parser.add_argument("--replicas", type=int, default=4, choices=(4, 8))
    parser.add_argument(
        "--per-replica",
        type=int,
        nargs="+",
        default=None,
        help="examples per replica (default: 2 4; 2 with --quick)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    seeds = common.seeds_from(args)
    sizes = args.per_replica or ([2] if args.quick else [2, 4])
    epochs = args.epochs or (1 if args.quick else 2)
    steps = 60 if args.quick else None

    with common.Timer() as timer:
        strategy = common.mirrored_strategy(args.replicas)
        replicas = strategy.num_replicas_in_sync
        print(f"MirroredStrategy: num_replicas_in_sync = {replicas}")
        assert replicas == args.replicas
        data = common.load_digits_split(seed=0)
        runs = []
        for per_replica in sizes:
            for bn in ("local", "sync"):
                for seed in seeds:
                    r = train_one(
                        strategy, data, bn == "sync", per_replica, seed, epochs, steps, args.lr
                    )
                    runs.append({"per_replica_batch": per_replica, "bn": bn, "seed": seed, **r})
                    print(
                        f"  {per_replica}/replica {bn:>5} seed {seed}: "
                        f"accuracy {r['accuracy']:.4f} ({r['steps']} steps)"
                    )
        rows = []
        for per_replica in sizes:
            for bn in ("local", "sync"):
                accs = [
                    r["accuracy"]
                    for r in runs
                    if r["per_replica_batch"] == per_replica and r["bn"] == bn
                ]
                mean, std = common.mean_std(accs)
                rows.append(
                    {
                        "per_replica_batch": per_replica,
                        "global_batch": per_replica * replicas,
                        "bn": bn,
                        "bn_batch": per_replica if bn == "local" else per_replica * replicas,
                        "seeds": len(accs),
                        "acc_mean": mean,
                        "acc_std": std,
                        "acc_min": min(accs),
                        "acc_max": max(accs),
                    }
                )
        verdict = verdict_for(rows)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        width = 0.35
        xs = np.arange(len(sizes))
        for i, bn in enumerate(("local", "sync")):
            sel = [
                next(r for r in rows if r["per_replica_batch"] == s and r["bn"] == bn)
                for s in sizes
            ]
            bars = ax.bar(
                xs + (i - 0.5) * width,
                [100 * r["acc_mean"] for r in sel],
                width,
                yerr=[100 * r["acc_std"] for r in sel],
                capsize=4,
                label=f"{bn} BN" + (" (synchronized=True)" if bn == "sync" else ""),
            )
            ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
            for s_i, s in enumerate(sizes):
                pts = [
                    100 * r["accuracy"]
                    for r in runs
                    if r["per_replica_batch"] == s and r["bn"] == bn
                ]
                ax.plot(
                    [xs[s_i] + (i - 0.5) * width] * len(pts),
                    pts,
                    "k.",
                    ms=4,
                    label="one seed" if i == 0 and s_i == 0 else None,
                )
        ax.set_xticks(xs, [f"{s} per replica\n(global batch {s * replicas})" for s in sizes])
        ax.set_xlabel("examples per replica (BN statistics: local = per replica, sync = global)")
        ax.set_ylabel("test accuracy (%), mean over seeds ± std")
        # Bars start at 0 (a truncated axis exaggerates differences); the headroom above
        # 100 % holds the legend so it covers no bar.
        ax.set_ylim(0, 122)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"Digits CNN, {replicas} replicas: local vs synchronised BN")
        ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return common.write_report(
        args.out,
        NAME,
        title="Small per-replica batches: local vs synchronised BN",
        claim="With a few examples per device BN's statistics are noisy and accuracy drops; "
        "synchronised BN (statistics over the global batch) restores it.",
        setup=f"{replicas} replicas (MirroredStrategy over logical CPUs, num_replicas_in_sync="
        f"{replicas}), {', '.join(map(str, sizes))} examples per replica, digits CNN "
        f"(Conv-BN-ReLU x2, GAP, Dense), Adam lr={args.lr}, {epochs} epoch(s)"
        f"{f' of {steps} steps' if steps else ''}, BN momentum 0.9, seeds {seeds}; "
        "test accuracy in inference mode on 540 held-out digits.",
        columns=[
            "per_replica_batch",
            "global_batch",
            "bn",
            "bn_batch",
            "seeds",
            "acc_mean",
            "acc_std",
            "acc_min",
            "acc_max",
        ],
        rows=rows,
        verdict=verdict,
        plot=plot,
        command=common.command_line(f"{NAME}.py", argv),
        seconds=timer.seconds,
        extra={"num_replicas_in_sync": replicas, "runs": runs, "quick": args.quick},
    )


if __name__ == "__main__":
    main()
