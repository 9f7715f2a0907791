"""Experiment 5: does `tfbn drift` see a traffic shift that costs accuracy, and does
recalibration fix it?

Claim (issue 17; Li et al. 2016 "Revisiting Batch Normalization For Practical Domain
Adaptation" (AdaBN), Schneider et al. 2020 "Improving robustness against common
corruptions by covariate shift adaptation"): when inputs shift, frozen BN normalises
with the wrong statistics and accuracy falls; the shift is visible in the BN layers'
input statistics, and re-estimating them on the shifted data recovers much of the
accuracy.

Setup: the demo's CNN (Conv-BN-ReLU x2, global pooling, dense softmax, tfbn BN) trained
on scikit-learn's digits (70 %), exported with `tfbn.export_saved_model` (BN folded,
statistics signature). The held-out 30 % is split in two halves: a recalibration
half and an evaluation half. For each shift (contrast x*c, brightness x+b, Gaussian
noise, translation by k pixels, inversion 1-x) and strength: accuracy on the shifted
evaluation half, the drift score of the export's statistics signature on it (the
worst layer's score, `tfbn.serving.drift`), then `tfbn.recalibrate` on the shifted
recalibration half and accuracy and drift score again. False alarms: the score of
200 random unshifted samples of 64 and of 256 test examples against the threshold.

    python examples/experiments/drift_detection.py            # full: ~1-2 min on 2 cores
    python examples/experiments/drift_detection.py --quick    # one short epoch, for tests
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import experiment_utils as common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from tfbn.serving import drift  # noqa: E402

import tfbn  # noqa: E402

NAME = "drift_detection"
HURTS = 0.05  # an accuracy drop of 5 points or more "hurts"
SHIFTS = {
    "none": [0.0],
    "contrast": [0.8, 0.6, 0.4, 0.2],
    "brightness": [0.1, 0.2, 0.4, 0.8],
    "noise": [0.05, 0.1, 0.2, 0.4],
    "translate": [1, 2],
    "invert": [1.0],
}


def shift(x: np.ndarray, family: str, strength: float, seed: int) -> np.ndarray:
    if family == "none":
        return x
    if family == "contrast":
        return (x * strength).astype("float32")
    if family == "brightness":
        return (x + strength).astype("float32")
    if family == "noise":
        rng = np.random.default_rng(seed)
        return (x + rng.normal(0.0, strength, x.shape)).astype("float32")
    if family == "translate":
        k = int(strength)
        out = np.zeros_like(x)
        out[:, k:, k:, :] = x[:, : 8 - k, : 8 - k, :]
        return out
    if family == "invert":
        return (1.0 - x).astype("float32")
    raise ValueError(f"unknown shift {family!r}")


def train(data, seed: int, epochs: int) -> keras.Model:
    x_train, _, y_train, _ = data
    keras.utils.set_random_seed(seed)
    model = common.build_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    return model


def predict(model, x) -> np.ndarray:
    return np.asarray(model(x, training=False))


def score_of(probe, x, batch_size=64) -> float:
    return drift.measure_drift(probe, {probe_input(probe): x}, batch_size).score


def probe_input(probe) -> str:
    return next(iter(probe.spec))


def recalibrated(model, x_recal) -> keras.Model:
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    tfbn.recalibrate(
        clone, [x_recal[i : i + 64] for i in range(0, len(x_recal), 64)], progress=False
    )
    return clone


def run_seed(seed: int, epochs: int, false_alarm_draws: int) -> tuple[list[dict], dict]:
    data = common.load_digits_split(seed=seed)
    model = train(data, seed, epochs)
    _, x_test, _, y_test = data
    half = len(x_test) // 2
    x_recal, x_eval, y_eval = x_test[:half], x_test[half:], y_test[half:]
    clean_acc = common.accuracy(predict(model, x_eval), y_eval)
    with tempfile.TemporaryDirectory() as tmp:
        exported = tfbn.export_saved_model(model, Path(tmp) / "digits", sample_inputs=x_recal[:16])
        served = drift.SavedModelProbe(exported.path)
        rows = []
        for family, strengths in SHIFTS.items():
            for strength in strengths:
                xs_eval = shift(x_eval, family, strength, seed + 1)
                xs_recal = shift(x_recal, family, strength, seed + 2)
                report = drift.measure_drift(served, {probe_input(served): xs_eval}, 64)
                fixed = recalibrated(model, xs_recal)
                local = drift.KerasProbe(fixed)
                after = drift.measure_drift(local, {probe_input(local): xs_eval}, 64)
                acc = common.accuracy(predict(model, xs_eval), y_eval)
                rows.append({
                    "seed": seed, "shift": family, "strength": strength,
                    "acc_clean": clean_acc, "acc_shifted": acc,
                    "acc_recalibrated": common.accuracy(predict(fixed, xs_eval), y_eval),
                    "score_shifted": report.score, "worst_layer": report.worst.name,
                    "score_recalibrated": after.score,
                    "drift": report.drift,
                    "missed": bool(clean_acc - acc >= HURTS and not report.drift),
                    "false_drift": bool(clean_acc - acc < HURTS and report.drift),
                })  # fmt: skip
        # False alarms: random unshifted traffic samples from the whole held-out set.
        rng = np.random.default_rng(seed)
        alarms = {}
        for size in (64, 256):
            scores = [score_of(served, x_test[rng.choice(len(x_test), size, replace=False)])
                      for _ in range(false_alarm_draws)]  # fmt: skip
            alarms[size] = {
                "draws": false_alarm_draws,
                "rate": float(np.mean(np.asarray(scores) > drift.DEFAULT_THRESHOLD)),
                "max_score": float(np.max(scores)),
                "p95_score": float(np.percentile(scores, 95)),
            }
    return rows, alarms


def plot(rows, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    families = [f for f in SHIFTS if f != "none"]
    colors = dict(zip(families, ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"],
                      strict=True))  # fmt: skip
    seed0 = [r for r in rows if r["seed"] == rows[0]["seed"]]
    for family in families:
        sel = [r for r in seed0 if r["shift"] == family]
        x = np.arange(len(sel)) + 0.1 * families.index(family)
        axes[0].plot(x, [r["acc_shifted"] for r in sel], "o-", color=colors[family],
                     label=f"{family}: shifted")  # fmt: skip
        axes[0].plot(x, [r["acc_recalibrated"] for r in sel], "^--", color=colors[family],
                     label=f"{family}: recalibrated")  # fmt: skip
        axes[1].plot(
            [r["acc_clean"] - r["acc_shifted"] for r in sel],
            [r["score_shifted"] for r in sel],
            "o",
            color=colors[family],
            label=family,
        )
        axes[1].plot(
            [r["acc_clean"] - r["acc_recalibrated"] for r in sel],
            [r["score_recalibrated"] for r in sel],
            "^",
            color=colors[family],
            alpha=0.5,
        )
    axes[0].axhline(seed0[0]["acc_clean"], color="black", linestyle=":", label="unshifted")
    axes[0].set_xlabel("shift strength (index, weakest first)")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("accuracy: shifted vs after recalibration")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].axhline(drift.DEFAULT_THRESHOLD, color="tab:red", linestyle="--",
                    label=f"threshold {drift.DEFAULT_THRESHOLD:g}")  # fmt: skip
    axes[1].axvline(HURTS, color="gray", linestyle=":", label=f"accuracy drop {HURTS:g}")
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("accuracy drop (o shifted, ^ recalibrated)")
    axes[1].set_ylabel("drift score (worst layer)")
    axes[1].set_title("drift score vs accuracy drop")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], full_seeds=2)
    args = parser.parse_args(argv)
    seeds = common.seeds_from(args)
    epochs, draws = (1, 10) if args.quick else (15, 200)
    rows, alarms = [], {}
    with common.Timer() as timer:
        for seed in seeds:
            seed_rows, seed_alarms = run_seed(seed, epochs, draws)
            rows += seed_rows
            for size, a in seed_alarms.items():
                alarms.setdefault(size, []).append(a)
    false_alarm = {
        size: {"draws": sum(a["draws"] for a in runs),
               "rate": float(np.mean([a["rate"] for a in runs])),
               "max_score": max(a["max_score"] for a in runs)}
        for size, runs in alarms.items()
    }  # fmt: skip
    shifted = [r for r in rows if r["shift"] != "none"]
    hurt = [r for r in shifted if r["acc_clean"] - r["acc_shifted"] >= HURTS]
    caught = [r for r in hurt if r["drift"]]
    missed = [r for r in hurt if not r["drift"]]
    recovered = [r for r in caught if r["acc_recalibrated"] - r["acc_shifted"] >= HURTS / 2]
    after_ok = [r for r in shifted if r["score_recalibrated"] <= drift.DEFAULT_THRESHOLD]
    fa = false_alarm[256]
    missed_text = ", ".join(sorted({f"{r['shift']} {r['strength']:g}" for r in missed})) or "none"
    head = "Reproduced" if hurt and len(caught) == len(hurt) and fa["rate"] <= 0.05 else (
        "Partly reproduced" if caught else "Did not reproduce")  # fmt: skip
    verdict = (
        f"{head}: {len(caught)} of {len(hurt)} shifted runs that cost >= {HURTS * 100:.0f} "
        f"accuracy points were flagged (missed: {missed_text}); recalibration on the shifted "
        f"half gained >= {HURTS * 50:.1f} points in {len(recovered)} of {len(caught)} flagged "
        f"runs and brought the score under the threshold in {len(after_ok)} of {len(shifted)} "
        f"shifted runs; false alarms on unshifted traffic: {fa['rate']:.1%} of {fa['draws']} "
        f"samples of 256 (max score {fa['max_score']:.3f}), "
        f"{false_alarm[64]['rate']:.1%} of samples of 64 (max {false_alarm[64]['max_score']:.3f})."
    )
    columns = [
        "seed",
        "shift",
        "strength",
        "acc_clean",
        "acc_shifted",
        "acc_recalibrated",
        "score_shifted",
        "worst_layer",
        "score_recalibrated",
        "drift",
        "missed",
    ]
    return common.write_report(
        args.out, NAME,
        "Running-statistics drift: detected when it costs accuracy? fixed by recalibration?",
        "A shift that costs accuracy shows in the BN layers' input statistics (drift score above "
        f"{drift.DEFAULT_THRESHOLD:g}), unshifted traffic does not, and recalibrating the running "
        "statistics on shifted data recovers accuracy.",
        f"Demo CNN on digits, {epochs} epochs, seeds {seeds}; tfbn export (BN folded) probed in "
        "process through its statistics signature, batches of 64; recalibration on the shifted "
        "recalibration half, accuracy and score on the shifted evaluation half (270 examples).",
        columns, rows, verdict, lambda p: plot(rows, p),
        common.command_line("drift_detection.py", argv), timer.seconds,
        extra={"false_alarm": false_alarm, "threshold": drift.DEFAULT_THRESHOLD, "hurts": HURTS},
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
