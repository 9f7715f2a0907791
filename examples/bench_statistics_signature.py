"""Benchmark: does the statistics signature cost serving_default anything?

Exports the same trained CNN (bench_export.py's conv-BN-ReLU blocks, BN folded)
twice with `tfbn.export_saved_model`: with the `tfbn_batch_norm_statistics`
signature (the default) and without it (`statistics_signature=False`). Both are
reloaded and their `serving_default` called round-robin at batch 1 and 64; the
table gives median milliseconds and the median over rounds of the paired time
ratio (with probe / without), so load from other processes cancels; a second
load of the export without probe is the control (how far from 1 the ratio of two
identical models strays on this machine). For scale,
the statistics signature itself is timed against serving_default too (what a
drift measurement costs per request; it never runs on prediction requests).

    python examples/bench_statistics_signature.py              # README numbers
    python examples/bench_statistics_signature.py --repeats 40 # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench_export  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfbn.export import export_saved_model  # noqa: E402
from tfbn.statistics_signature import STATISTICS_SIGNATURE  # noqa: E402


def statistics_fn(path: str):
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures[STATISTICS_SIGNATURE]
    (name,) = fn.structured_input_signature[1]
    first = sorted(fn.structured_outputs)[0]

    def call(x):
        return fn(**{name: x})[first]

    call.loaded = loaded
    return call


def run(repeats: int = 200, size: int = 32, width: int = 32, steps: int = 20) -> list[dict]:
    model = bench_export.build(True, size, width)
    bench_export.train(model, steps, size)
    with tempfile.TemporaryDirectory() as tmp:
        with_probe = export_saved_model(model, os.path.join(tmp, "with"), version=1)
        without = export_saved_model(
            model, os.path.join(tmp, "without"), version=1, statistics_signature=False
        )
        fns = {
            "serving_default (export with probe)": bench_export.serving_fn(with_probe.path),
            "serving_default (export without probe)": bench_export.serving_fn(without.path),
            "control: the same export without probe, loaded again": bench_export.serving_fn(
                without.path
            ),
            STATISTICS_SIGNATURE: statistics_fn(with_probe.path),
        }
        x = np.random.default_rng(1).normal(1.0, 2.0, (64, size, size, 3)).astype("float32")
        a = fns["serving_default (export with probe)"](tf.constant(x)).numpy()
        b = fns["serving_default (export without probe)"](tf.constant(x)).numpy()
        assert np.array_equal(a, b), "serving_default answers differ"
        rows = []
        for batch in bench_export.BATCH_SIZES:
            xb = tf.constant(x[:batch])
            reps = repeats if batch == 1 else max(repeats // 2, 3)
            # The three serving_default functions round-robin; the (heavier) statistics
            # signature in its own run, so it never precedes a timed serving call.
            serving = {k: v for k, v in fns.items() if k != STATISTICS_SIGNATURE}
            times = bench_export.interleaved_times(serving, xb, reps)
            baseline = "serving_default (export without probe)"
            probe = bench_export.interleaved_times(
                {baseline: fns[baseline], STATISTICS_SIGNATURE: fns[STATISTICS_SIGNATURE]}, xb, reps
            )
            times[STATISTICS_SIGNATURE] = probe[STATISTICS_SIGNATURE]
            paired = {**times, "baseline for the probe": probe[baseline]}
            for name, seconds in times.items():
                rows.append({
                    "batch": batch, "function": name, "ms": statistics.median(seconds) * 1e3,
                    "vs_without_probe": bench_export.paired_ratio(
                        paired, name, baseline if name != STATISTICS_SIGNATURE
                        else "baseline for the probe"),
                })  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    print("| batch | function | median ms | time / serving_default without probe (paired median) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['function']} | {r['ms']:.3f} | {r['vs_without_probe']:.3f} |")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
