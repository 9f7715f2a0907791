"""Experiment 4: learning-rate tolerance without BN, with post- and pre-activation BN.

Claim (Ioffe & Szegedy 2015, Santurkar et al. 2018, Bjorck et al. 2018): BN lets a
network train at much higher learning rates, roughly 10x, than the same network
without it.

Setup: the same MLP on scikit-learn's digits (4 hidden layers of 64 units, He
init, softmax) in three variants:
- "no BN": Dense(bias) -> ReLU,
- "post-activation BN": Dense(bias) -> ReLU -> BN,
- "pre-activation BN": Dense(no bias) -> BN -> ReLU (the original paper's placement),
trained with plain SGD (no momentum) for the same number of steps at learning
rates 0.003-10 in half-decade steps, final test accuracy in inference mode, mean
over seeds. The grid reaches 10: a first run up to 1.0 found BN still working at
1.0, so it could not tell a 3x from a 10x tolerance. Each variant is compiled once; every (seed, learning rate) run starts
from that seed's fresh initial weights.

    python examples/experiments/lr_tolerance.py
    python examples/experiments/lr_tolerance.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import experiment_utils as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfbn  # noqa: E402

NAME = "lr_tolerance"
VARIANTS = ("no BN", "post-activation BN", "pre-activation BN")
FULL_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_LRS = (0.003, 0.03, 0.3)
STABLE = 0.05  # a learning rate "works" for a variant within 5 points of that variant's best


def build_mlp(variant: str, depth: int = 4, units: int = 64) -> keras.Model:
    inputs = keras.Input((64,))
    x = inputs
    for _ in range(depth):
        if variant == "no BN":
            x = keras.layers.Dense(units, activation="relu", kernel_initializer="he_normal")(x)
        elif variant == "post-activation BN":
            x = keras.layers.Dense(units, activation="relu", kernel_initializer="he_normal")(x)
            x = tfbn.BatchNormalization(momentum=0.9)(x)
        else:
            x = keras.layers.Dense(units, use_bias=False, kernel_initializer="he_normal")(x)
            x = tfbn.BatchNormalization(momentum=0.9)(x)
            x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> dict:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = common.base_parser(__doc__.splitlines()[0], full_seeds=2)
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help=f"learning rates (default {FULL_LRS}, {QUICK_LRS} with --quick)",
    )
    args = parser.parse_args(argv)
    seeds = common.seeds_from(args)
    epochs = args.epochs or (2 if args.quick else 10)
    lrs = tuple(args.lrs or (QUICK_LRS if args.quick else FULL_LRS))

    x_train, x_test, y_train, y_test = common.load_digits_split(seed=0, flat=True)
    n = len(x_train) // args.batch_size * args.batch_size
    x_train, y_train = x_train[:n], y_train[:n]

    with common.Timer() as timer:
        runs = []
        for variant in VARIANTS:
            initial = {}
            for seed in seeds:  # fresh initial weights per seed, no tracing
                keras.utils.set_random_seed(seed)
                initial[seed] = build_mlp(variant).get_weights()
            model = build_mlp(variant)
            model.compile(
                keras.optimizers.SGD(learning_rate=lrs[0]), "sparse_categorical_crossentropy"
            )
            for lr in lrs:
                for seed in seeds:
                    keras.utils.set_random_seed(seed)
                    model.set_weights(initial[seed])
                    model.optimizer.learning_rate.assign(lr)
                    history = model.fit(
                        x_train,
                        y_train,
                        batch_size=args.batch_size,
                        epochs=epochs,
                        shuffle=True,
                        verbose=0,
                    )
                    loss = float(history.history["loss"][-1])
                    acc = common.accuracy(model(x_test, training=False), y_test)
                    runs.append(
                        {
                            "variant": variant,
                            "lr": lr,
                            "seed": seed,
                            "accuracy": acc,
                            "final_train_loss": loss,
                            "nan_loss": not np.isfinite(loss),
                        }
                    )
                    print(
                        f"  {variant:<19} lr {lr:<6g} seed {seed}: test accuracy {acc:.3f}, "
                        f"final loss {loss:.3g}"
                    )
        table = {
            (v, lr): [r for r in runs if r["variant"] == v and r["lr"] == lr]
            for v in VARIANTS
            for lr in lrs
        }
        acc = {k: float(np.mean([r["accuracy"] for r in rs])) for k, rs in table.items()}
        best = max(acc.values())
        rows = []
        for v in VARIANTS:
            own_best = max(acc[(v, lr)] for lr in lrs)
            stable = [lr for lr in lrs if acc[(v, lr)] >= own_best - STABLE]
            row = {"variant": v}
            row.update({f"lr={lr:g}": acc[(v, lr)] for lr in lrs})
            row["best_acc"] = own_best
            row["best_lr"] = max(lrs, key=lambda lr, v=v: acc[(v, lr)])
            row["max_stable_lr"] = max(stable)
            row["nan_loss_runs"] = sum(r["nan_loss"] for r in runs if r["variant"] == v)
            rows.append(row)
        verdict = verdict_for(rows, best, lrs)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for v, marker in zip(VARIANTS, "osD"):
            means = [100 * acc[(v, lr)] for lr in lrs]
            ax.plot(lrs, means, marker=marker, label=v)
            for lr in lrs:
                pts = [100 * r["accuracy"] for r in table[(v, lr)]]
                ax.plot([lr] * len(pts), pts, ".", color="gray", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("SGD learning rate")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Digits MLP, {epochs} epochs: learning-rate tolerance")
        ax.legend(fontsize=8, loc="lower center")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    columns = [
        "variant",
        *[f"lr={lr:g}" for lr in lrs],
        "best_acc",
        "best_lr",
        "max_stable_lr",
        "nan_loss_runs",
    ]
    return common.write_report(
        args.out,
        NAME,
        title="Learning-rate tolerance: no BN vs post- and pre-activation BN",
        claim="BN allows roughly 10x higher learning rates than the same network without it.",
        setup=f"Digits MLP (4 x Dense 64, He init), plain SGD, batch {args.batch_size}, {epochs} "
        f"epochs, learning rates {', '.join(f'{lr:g}' for lr in lrs)}, seeds {seeds}; "
        f"mean test accuracy in inference mode; max_stable_lr = the highest rate whose accuracy "
        f"is within {100 * STABLE:.0f} points of the variant's own best.",
        columns=columns,
        rows=rows,
        verdict=verdict,
        plot=plot,
        command=common.command_line(f"{NAME}.py", argv),
        seconds=timer.seconds,
        extra={"quick": args.quick, "runs": runs, "learning_rates": list(lrs)},
    )


def verdict_for(rows, best, lrs) -> str:
    by = {r["variant"]: r for r in rows}
    base = by["no BN"]["max_stable_lr"]
    ratios = {v: by[v]["max_stable_lr"] / base for v in VARIANTS[1:]}
    ratio = max(ratios.values())
    if ratio >= 10 - 1e-9:
        head = "Reproduced"
    elif ratio > 1:
        head = "Partly reproduced (BN tolerated a higher learning rate, but less than 10x)"
    else:
        head = "Did not reproduce (BN did not tolerate a higher learning rate than no BN)"
    parts = [
        f"{v}: works up to lr {by[v]['max_stable_lr']:g}, best {100 * by[v]['best_acc']:.1f}% "
        f"at lr {by[v]['best_lr']:g}"
        for v in VARIANTS
    ]
    tail = []
    if by["no BN"]["max_stable_lr"] == max(lrs):
        tail.append(f"no BN still worked at the largest rate tried ({max(lrs):g})")
    if any(by[v]["max_stable_lr"] == max(lrs) for v in VARIANTS[1:]) and ratio < 10:
        tail.append("BN worked at the largest rate tried, so its limit is not measured")
    gain = 100 * (max(by[v]["best_acc"] for v in VARIANTS[1:]) - by["no BN"]["best_acc"])
    tail.append(f"best BN accuracy minus best no-BN accuracy: {gain:+.1f} points")
    ratio_text = ", ".join(f"{v} {ratios[v]:.3g}x" for v in VARIANTS[1:])
    return (
        f"{head}: highest working lr relative to no BN: {ratio_text}; "
        + "; ".join(parts)
        + "; "
        + "; ".join(tail)
        + "."
    )


if __name__ == "__main__":
    main()
