"""Shared plumbing for the experiments: CPU replicas, the digits data, models, reports.

Every experiment script imports this module (it sits next to them; the name is
specific so it cannot clash with another `common` on sys.path) and writes
`<name>.md`, `<name>.json` and `<name>.png` into the reports folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402

DEFAULT_OUT = Path("reports") / "experiments"


# ------------------------------------------------------------------ devices --


def split_cpu(n: int) -> int:
    """Splits the CPU into `n` logical devices if TensorFlow has not initialised yet.

    Logical devices can only be configured before the runtime starts. When it
    already has (e.g. under pytest, whose conftest splits the CPU into 4 at import
    time), the existing configuration is kept. Returns the number of logical CPUs.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if not current or len(current) < n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * n
            )
        except RuntimeError:  # already initialised: keep what there is
            pass
    return len(tf.config.list_logical_devices("CPU"))


def mirrored_strategy(replicas: int) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over `replicas` logical CPUs; raises if there are too few."""
    available = split_cpu(replicas)
    if available < replicas:
        raise RuntimeError(
            f"Need {replicas} logical CPU devices but TensorFlow was initialised with "
            f"{available}. Run the script in a fresh process (or with --replicas {available})."
        )
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    if strategy.num_replicas_in_sync != replicas:
        raise RuntimeError(
            f"MirroredStrategy has {strategy.num_replicas_in_sync} replicas in sync, "
            f"expected {replicas}."
        )
    return strategy


# --------------------------------------------------------------------- data --


def load_digits_split(seed: int = 0, test_size: float = 0.3, flat: bool = False):
    """scikit-learn's digits (ships with sklearn): images scaled to [0, 1], stratified split.

    Returns `x_train, x_test, y_train, y_test`; images are (N, 8, 8, 1), or (N, 64)
    with `flat=True`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")
    x = x.reshape(len(x), 64) if flat else x[..., None]
    y = digits.target.astype("int64")
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def build_cnn(synchronized: bool = False) -> keras.Model:
    """The demo's CNN: bias-free Conv-BN-ReLU blocks, global pooling, dense softmax.

    BN momentum 0.9 (the runs are short); `synchronized=True` for global statistics.
    """

    def block(x, filters):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = tfbn.BatchNormalization(momentum=0.9, synchronized=synchronized)(x)
        return keras.layers.ReLU()(x)

    inputs = keras.Input((8, 8, 1))
    x = block(inputs, 32)
    x = keras.layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def accuracy(probabilities, labels) -> float:
    """Top-1 accuracy in [0, 1]; rows with non-finite outputs count as wrong."""
    p = np.asarray(probabilities)
    finite = np.all(np.isfinite(p), axis=1)
    return float(np.mean(finite & (np.argmax(np.nan_to_num(p, nan=-1.0), axis=1) == labels)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ------------------------------------------------------------------ reports --


def base_parser(description: str, full_seeds: int, quick_seeds: int = 1) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (one seed, few steps) for tests"
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help=f"reports folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"number of seeds (default {full_seeds}, {quick_seeds} with --quick)",
    )
    parser.set_defaults(full_seeds=full_seeds, quick_seeds=quick_seeds)
    return parser


def seeds_from(args) -> list[int]:
    n = (
        args.seeds
        if args.seeds is not None
        else (args.quick_seeds if args.quick else args.full_seeds)
    )
    if n < 1:
        raise ValueError(f"`--seeds` must be >= 1. Received: {n}")
    return list(range(n))


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(
    out: str | os.PathLike,
    name: str,
    title: str,
    claim: str,
    setup: str,
    columns: Sequence[str],
    rows: Sequence[dict],
    verdict: str,
    plot: Callable[[Path], None],
    command: str,
    seconds: float,
    extra: dict | None = None,
) -> dict:
    """Writes `<out>/<name>.{md,json,png}`, prints the table, returns the result dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}.{kind}" for kind in ("md", "json", "png")}
    plot(paths["png"])
    table = markdown_table(columns, rows)
    markdown = "\n\n".join(
        [
            f"# {title}",
            f"**Claim.** {claim}",
            f"**Setup.** {setup}",
            table,
            f"**Verdict (computed from the numbers above).** {verdict}",
            f"![{name}]({paths['png'].name})",
            f"Command: `{command}` ({seconds:.0f} s, TensorFlow {tf.__version__}, "
            f"{os.cpu_count()} CPU cores, {platform.machine()}).",
        ]
    )
    paths["md"].write_text(markdown + "\n")
    result = {
        "experiment": name,
        "title": title,
        "claim": claim,
        "setup": setup,
        "columns": list(columns),
        "rows": list(rows),
        "verdict": verdict,
        "command": command,
        "seconds": seconds,
        "tensorflow": tf.__version__,
        **(extra or {}),
        "files": {kind: str(path) for kind, path in paths.items()},
    }
    paths["json"].write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print()
    print(f"## {title}")
    print(table)
    print(f"Verdict: {verdict}")
    print(f"Wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return result


def command_line(script: str, argv: Sequence[str] | None) -> str:
    return " ".join(["python", f"examples/experiments/{script}", *(argv or [])])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
