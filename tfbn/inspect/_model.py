"""The running-statistics report of a Keras model (`inspect_model`, `tfbn inspect MODEL.keras`).

Keras, TensorFlow and NumPy are imported inside the functions, so that importing
`tfbn.inspect` does not load TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tfbn.inspect._loading import load_keras_model
from tfbn.report import Report, deprecated_alias, json_safe

DEAD_GAMMA = 1e-3  # |gamma| below this: the channel's output is ~beta, whatever the input
COLLAPSED_STD = 0.1  # normalised std sqrt(var / (var + eps)) below this: a ~constant channel


def _summary(values) -> dict | None:
    import numpy as np

    if values is None:
        return None
    values = np.asarray(values, np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"min": None, "median": None, "max": None}
    return {
        "min": float(finite.min()),
        "median": float(np.median(finite)),
        "max": float(finite.max()),
    }


FLAG_ADVICE = {
    "never_updated": (
        "moving mean/variance are still at their initial 0/1: the layer never ran in "
        "training mode (or was frozen from the start), so inference normalises with "
        "statistics that describe nothing",
        "run tfbn.recalibrate(model, dataset) on representative data",
    ),
    "nonfinite": (
        "NaN/Inf in the statistics or the affine weights: every output of these channels "
        "is NaN/Inf",
        "find the overflowing batch (mixed precision?), restore a checkpoint and/or "
        "tfbn.recalibrate; tfbn layers skip non-finite batch updates by default",
    ),
    "dead_channels": (
        "|gamma| is ~0 for some channels: their output is the constant beta whatever the "
        "input (dead features, or zero-init gamma never trained)",
        "check weight decay on gamma and the learning rate; prune the channels or re-initialise",
    ),
    "variance_collapse": (
        "moving variance is far below epsilon for some channels: their normalised output "
        "is ~constant (often a dead ReLU upstream), and epsilon dominates the scale",
        "check the layer before (dead ReLU?); tfbn.recalibrate if the data changed",
    ),
    "negative_variance": (
        "a negative moving variance is impossible and makes sqrt(var + eps) NaN",
        "the weights are corrupted: restore them or tfbn.recalibrate",
    ),
    "skipped_updates": (
        "some training batches had non-finite statistics and were skipped "
        "(num_skipped_updates > 0): a sign of overflow, e.g. under mixed precision",
        "look for the overflow (loss scaling, input range); the statistics themselves are safe",
    ),
    "one_value_per_channel": (
        "some training batches had one value per channel (num_single_value_batches > 0): "
        "their variance was 0, the output was beta and the moving variance moved towards 0",
        "use larger batches (or drop_remainder=True), or synchronized=True under a strategy",
    ),
}


@dataclass
class BatchNormRow:
    """One BN layer in `inspect_model`'s report."""

    name: str
    path: str
    kind: str  # "tfbn" or "keras"
    channels: int
    momentum: float | None
    epsilon: float
    estimator: str
    batches_tracked: int | None
    skipped_updates: int | None
    mean: dict
    variance: dict
    gamma: dict | None
    beta: dict | None
    flags: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class ModelReport(Report):
    """`inspect_model`'s result: one row per BN layer; `format()` (the table) and `to_json()`."""

    model: str
    rows: list[BatchNormRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(row.flags for row in self.rows)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "model": self.model,
                "ok": self.ok,
                "layers": [asdict(row) for row in self.rows],
                "flags": {k: {"why": why, "fix": fix} for k, (why, fix) in FLAG_ADVICE.items()},
            }
        )

    def format(self) -> str:
        """One line per BN layer, then why and what to do for each flag found."""
        if not self.rows:
            return f"{self.model}: no BatchNormalization layer"

        def num(v):
            return "-" if v is None else f"{v:.4g}"

        def mmm(s):
            if s is None:
                return "-"
            return "/".join(num(s[k]) for k in ("min", "median", "max"))

        header = ["layer", "type", "ch", "momentum", "eps", "estimator", "batches",
                  "mean min/med/max", "var min/med/max", "gamma min/med/max",
                  "beta min/med/max", "flags"]  # fmt: skip
        body = [
            [row.name, row.kind, str(row.channels), num(row.momentum) if row.momentum is not None
             else "cumulative", num(row.epsilon), row.estimator,
             "-" if row.batches_tracked is None else str(row.batches_tracked),
             mmm(row.mean), mmm(row.variance), mmm(row.gamma), mmm(row.beta),
             ",".join(row.flags) or "ok"]
            for row in self.rows
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [f"{self.model}: {len(self.rows)} BatchNormalization layer(s)"]
        for r in [header, ["-" * w for w in widths], *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        flagged = sorted({f for row in self.rows for f in row.flags})
        for flag in flagged:
            why, fix = FLAG_ADVICE[flag]
            names = [row.name for row in self.rows if flag in row.flags]
            lines.append(f"\n[{flag}] {', '.join(names)}\n  why: {why}\n  fix: {fix}")
        lines.append("\nOK: no problem found" if self.ok else "")
        return "\n".join(lines).rstrip()

    table = deprecated_alias("table", "format")


def inspect_model(
    model_or_path,
    dead_gamma: float = DEAD_GAMMA,
    collapsed_std: float = COLLAPSED_STD,
) -> ModelReport:
    """A table of every BN layer's running statistics, with what looks wrong.

    For each Keras or tfbn BN layer (nested models included): channels, momentum,
    epsilon, variance estimator, batches tracked (tfbn), min/median/max of the
    moving mean, moving variance, gamma and beta, and flags:

    - `never_updated`: moving mean all 0 and variance all 1 (the initial values).
    - `nonfinite`: NaN/Inf in moving statistics, gamma or beta.
    - `dead_channels`: `|gamma| < dead_gamma` for some channel.
    - `variance_collapse`: normalised output std `sqrt(var / (var + eps))` below
      `collapsed_std` (var < ~eps / 99 at the default 0.1) for some channel.
    - `negative_variance`, `skipped_updates` (tfbn skipped non-finite batches) and
      `one_value_per_channel` (tfbn trained on batches with one value per channel).

    Args:
        model_or_path: A keras.Model or the path of a `.keras` file.
        dead_gamma, collapsed_std: Thresholds of the two channel flags.

    Returns:
        A `ModelReport` (`.format()`, `.to_json()`, `.ok`). Channel indices of the
        channel flags are in each row's `details`.
    """
    from tfbn.convert import batch_norm_layers

    model = load_keras_model(model_or_path)
    report = ModelReport(model=model.name)
    for layer in batch_norm_layers(model):
        weights = _weights(layer)
        row = _row(layer, *weights)
        _flag(row, layer, *weights, dead_gamma=dead_gamma, collapsed_std=collapsed_std)
        report.rows.append(row)
    return report


def _weights(layer) -> tuple:
    """(moving mean, moving variance, gamma or None, beta or None), float64, flat."""
    import numpy as np

    def flat(name):
        value = getattr(layer, name, None)
        return None if value is None else np.asarray(value.numpy(), np.float64).ravel()

    return flat("moving_mean"), flat("moving_variance"), flat("gamma"), flat("beta")


def _row(layer, mean, var, gamma, beta) -> BatchNormRow:
    """The layer's settings, counters and min/median/max summaries (no flags yet)."""
    from tfbn.layers.batch_norm import BatchNormalization

    counter = getattr(layer, "num_batches_tracked", None)
    skipped = getattr(layer, "num_skipped_updates", None)
    return BatchNormRow(
        name=layer.name,
        path=getattr(layer, "path", layer.name),
        kind="tfbn" if isinstance(layer, BatchNormalization) else "keras",
        channels=int(mean.size),
        momentum=layer.momentum,
        epsilon=float(layer.epsilon),
        estimator=getattr(layer, "moving_variance_estimator", "biased"),
        batches_tracked=None if counter is None else int(counter.numpy()),
        skipped_updates=None if skipped is None else int(skipped.numpy()),
        mean=_summary(mean),
        variance=_summary(var),
        gamma=_summary(gamma),
        beta=_summary(beta),
    )


def _flag(row, layer, mean, var, gamma, beta, *, dead_gamma, collapsed_std) -> None:
    """Adds the flags (in FLAG_ADVICE's order) and their channel indices to `row`."""
    import numpy as np

    uses_running_stats = getattr(layer, "track_running_stats", True)
    if uses_running_stats and np.all(mean == 0) and np.all(var == 1):
        row.flags.append("never_updated")
    present = [a for a in (mean, var, gamma, beta) if a is not None]
    nonfinite = np.logical_or.reduce([~np.isfinite(a) for a in present])
    if nonfinite.any():
        row.flags.append("nonfinite")
        row.details["nonfinite_channels"] = np.flatnonzero(nonfinite).tolist()
    if gamma is not None:
        _channels(row, "dead_channels", "dead_channels", np.abs(gamma) < dead_gamma)
    if uses_running_stats:
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(var / (var + layer.epsilon))
        _channels(
            row, "variance_collapse", "collapsed_channels", (var >= 0) & (std < collapsed_std)
        )
        _channels(row, "negative_variance", "negative_variance_channels", var < 0)
    if row.skipped_updates:
        row.flags.append("skipped_updates")
    single = getattr(layer, "num_single_value_batches", None)
    if single is not None and int(single.numpy()) > 0:
        row.flags.append("one_value_per_channel")


def _channels(row, flag: str, detail: str, mask) -> None:
    """Flags `row` with `flag` and lists the channels under `detail` if `mask` has any."""
    import numpy as np

    channels = np.flatnonzero(mask)
    if channels.size:
        row.flags.append(flag)
        row.details[detail] = channels.tolist()
