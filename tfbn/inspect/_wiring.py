"""The wiring lint of a Keras model (`lint_model`, `tfbn lint MODEL.keras`): the ways a
model's layers are put together that keep BatchNormalization from working.

Keras and TensorFlow are imported inside the functions, so that importing
`tfbn.inspect` does not load TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tfbn.inspect._loading import load_keras_model
from tfbn.report import Report, json_safe

MIN_BATCH = 8  # Wu & He 2018 (Group Normalization), fig. 1: BN degrades fast below 8


@dataclass(frozen=True)
class LintFinding:
    """One wiring problem `lint_model` found: which `rule`, at which layer, why, what to do."""

    rule: str
    layer: str
    severity: str  # "warning" (BN will misbehave) or "info" (wasteful, harmless)
    message: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.layer}: {self.message}\n  why: {self.why}\n  fix: {self.fix}"


@dataclass
class LintReport(Report):
    """`lint_model`'s result."""

    model: str
    batch_size: int | None
    replicas: int
    findings: list[LintFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def format(self) -> str:
        setting = f"batch size {self.batch_size}" if self.batch_size else "no batch size given"
        head = f"{self.model}: {setting}, {self.replicas} replica(s)"
        if self.ok:
            return f"{head}\nOK: no BatchNormalization wiring problem found"
        return "\n".join(
            [head, f"{len(self.findings)} finding(s):"] + [str(f) for f in self.findings]
        )

    def to_dict(self) -> dict:
        return json_safe(
            {
                "model": self.model,
                "batch_size": self.batch_size,
                "replicas": self.replicas,
                "ok": self.ok,
                "findings": [asdict(f) for f in self.findings],
            }
        )


def lint_model(
    model_or_path,
    batch_size: int | None = None,
    strategy=None,
    min_batch: int = MIN_BATCH,
) -> LintReport:
    """Finds model wiring that keeps BatchNormalization from working.

    Rules (each finding says why and what to do):

    - `bias-before-bn` (info): a Conv/Dense with `use_bias=True` whose output goes
      only to a BN over its channel axis: BN subtracts the mean, so the bias cancels.
    - `bn-in-recurrent`, `bn-after-recurrent`: BN inside a recurrent layer (its
      cell) or directly on a recurrent layer's output.
    - `bn-after-dropout`: BN directly after Dropout (variance shift).
    - `small-batch` (with `batch_size`): BN statistics over fewer than `min_batch`
      examples per replica (or per virtual batch).
    - `unsynced-small-batch` (with `batch_size` and > 1 replica): a BN that is not
      synchronised, under a strategy whose per-replica batch is below `min_batch`.

    Args:
        model_or_path: A keras.Model or the path of a `.keras` file.
        batch_size: The global training batch size (as passed to `fit`).
        strategy: A `tf.distribute.Strategy`, or an int number of replicas; None
            uses the strategy the model was created under (1 replica without).
        min_batch: Examples per BN statistics below which batch statistics are
            too noisy (8, after Wu & He, 2018).

    Returns:
        A `LintReport` (`.findings`, `.ok`, `.to_json()`).
    """
    from tfbn import graph

    model = load_keras_model(model_or_path)
    _check_batch_size(batch_size)
    replicas = _replicas(model, strategy)
    report = LintReport(model=model.name, batch_size=batch_size, replicas=replicas)
    report.findings += _recurrent_findings(model)
    report.findings += _edge_findings(graph.layer_edges(model))
    if batch_size is not None:
        report.findings += _small_batch_findings(model, batch_size, replicas, min_batch)
    return report


# ----------------------------------------------------------------- arguments --


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )


def _replicas(model, strategy) -> int:
    """Replicas in sync: `strategy`'s, the number given, or the model's strategy's."""
    from tfbn import distribute

    if strategy is None:
        replicas = distribute.strategy_replicas(distribute.model_strategy(model))
    elif isinstance(strategy, int) and not isinstance(strategy, bool):
        replicas = strategy
    else:
        replicas = getattr(strategy, "num_replicas_in_sync", None)
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(
            "`strategy` must be a tf.distribute.Strategy or a positive number of replicas. "
            f"Received: strategy={strategy!r}"
        )
    return replicas


def _recurrent_types() -> tuple:
    import keras

    return (keras.layers.RNN, keras.layers.Bidirectional)


def _dropout_types() -> tuple:
    import keras

    return (keras.layers.Dropout, keras.layers.AlphaDropout, keras.layers.GaussianDropout)


# ------------------------------------------------------------------- rules --


def _recurrent_findings(model) -> list[LintFinding]:
    """`bn-in-recurrent`: every BN inside a recurrent layer (in its cell)."""
    from tfbn.convert import is_batch_norm

    recurrent = _recurrent_types()
    return [
        _bn_in_recurrent(inner, layer)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, recurrent)
        for inner in layer._flatten_layers(include_self=False, recursive=True)
        if is_batch_norm(inner)
    ]


def _edge_findings(edges) -> list[LintFinding]:
    """The rules about what feeds a BN: `bias-before-bn`, `bn-after-recurrent`,
    `bn-after-dropout`, once per (producer, BN) pair."""
    from tfbn.convert import is_batch_norm

    consumers: dict[int, list] = {}
    for producer, consumer in edges:
        consumers.setdefault(id(producer), []).append(consumer)
    findings, seen_pairs = [], set()
    for producer, bn in edges:
        if not is_batch_norm(bn) or (id(producer), id(bn)) in seen_pairs:
            continue
        seen_pairs.add((id(producer), id(bn)))
        findings += _pair_findings(producer, bn, consumers.get(id(producer), []))
    return findings


def _pair_findings(producer, bn, producer_consumers: list) -> list[LintFinding]:
    from tfbn import graph
    from tfbn.convert import is_batch_norm

    findings = []
    biased = graph.PRODUCER_TYPES  # the layers that add a per-channel bias
    if isinstance(producer, biased) and getattr(producer, "use_bias", False):
        only_bn = all(is_batch_norm(c) for c in producer_consumers)
        if only_bn and _normalises_channel_axis(producer, bn):
            findings.append(_bias_before_bn(producer, bn))
    if isinstance(producer, _recurrent_types()):
        findings.append(_bn_after_recurrent(producer, bn))
    if isinstance(producer, _dropout_types()):
        findings.append(_bn_after_dropout(producer, bn))
    return findings


def _small_batch_findings(model, batch_size: int, replicas: int, min_batch: int):
    """`small-batch` / `unsynced-small-batch`: trainable BN whose statistics see fewer
    than `min_batch` examples."""
    from tfbn.convert import batch_norm_layers

    per_replica = batch_size // replicas
    findings = []
    for bn in batch_norm_layers(model):
        if not bn.trainable:
            continue  # a frozen BN normalises with running statistics in training too
        stat_batch, synced, virtual = _statistics_batch(bn, per_replica, replicas)
        if stat_batch >= min_batch:
            continue
        if replicas > 1 and not synced and not virtual and batch_size >= min_batch:
            findings.append(_unsynced_small_batch(bn, replicas, per_replica, batch_size, min_batch))
        else:
            findings.append(_small_batch(bn, stat_batch, replicas, virtual, min_batch))
    return findings


def _statistics_batch(bn, per_replica: int, replicas: int) -> tuple[int, bool, int | None]:
    """(examples one BN statistics is computed over, synchronised?, virtual batch size)."""
    synced = replicas > 1 and bool(getattr(bn, "synchronized", False))
    group = (getattr(bn, "sync_group_size", None) or replicas) if synced else 1
    stat_batch = per_replica * group
    virtual = getattr(bn, "virtual_batch_size", None)
    if virtual:
        stat_batch = min(stat_batch, virtual)
    return stat_batch, synced, virtual


# ---------------------------------------------------------------- findings --


def _bn_in_recurrent(inner, layer) -> LintFinding:
    return LintFinding(
        "bn-in-recurrent", inner.name, "warning",
        f"BatchNormalization '{inner.name}' runs inside recurrent layer '{layer.name}'",
        "inside the recurrence one set of running statistics is shared by every "
        "time step although each step's activations have their own distribution, "
        "and batch statistics of short batches of sequences are noisy; at "
        "inference the averaged statistics match no step",
        "use keras.layers.LayerNormalization inside the cell (per example, no "
        "batch statistics), or per-time-step statistics (recurrent BN, Cooijmans "
        "et al. 2016)",
    )  # fmt: skip


def _bias_before_bn(producer, bn) -> LintFinding:
    return LintFinding(
        "bias-before-bn", producer.name, "info",
        f"'{producer.name}' ({type(producer).__name__}, use_bias=True) feeds "
        f"BatchNormalization '{bn.name}' directly",
        "BN subtracts each channel's mean, so a per-channel bias added right before "
        "it cancels exactly: its gradient is zero and beta already provides the "
        "offset; it only costs parameters, memory and a kernel launch",
        f"create '{producer.name}' with use_bias=False",
    )  # fmt: skip


def _bn_after_recurrent(producer, bn) -> LintFinding:
    return LintFinding(
        "bn-after-recurrent", bn.name, "warning",
        f"BatchNormalization '{bn.name}' directly normalises the output of recurrent "
        f"layer '{producer.name}'",
        "over sequence outputs BN pools every time step (and padding, without a mask) "
        "into one set of statistics; batches of variable-length sequences give "
        "statistics that change with the padding and the batch composition",
        "use keras.layers.LayerNormalization after recurrent layers; if you keep BN, "
        "make sure the mask reaches it (tfbn and Keras BN ignore masked steps)",
    )  # fmt: skip


def _bn_after_dropout(producer, bn) -> LintFinding:
    return LintFinding(
        "bn-after-dropout", bn.name, "warning",
        f"BatchNormalization '{bn.name}' directly follows {type(producer).__name__} "
        f"'{producer.name}'",
        "dropout changes the variance of its output between training (units dropped, "
        "the rest scaled by 1/(1-rate)) and inference (nothing dropped), so the running "
        "variance learned in training does not describe inference inputs: the "
        "'variance shift' (Li et al., 2019)",
        "move Dropout after the last BN (e.g. just before the classifier), or run "
        "tfbn.recalibrate(model, data) after training: it measures the statistics in "
        "inference mode, without dropout",
    )  # fmt: skip


def _unsynced_small_batch(bn, replicas, per_replica, batch_size, min_batch) -> LintFinding:
    return LintFinding(
        "unsynced-small-batch", bn.name, "warning",
        f"BatchNormalization '{bn.name}' is not synchronised: under {replicas} "
        f"replicas each one computes statistics over {per_replica} example(s) "
        f"(global batch {batch_size})",
        f"batch statistics of fewer than {min_batch} examples are noisy and bias "
        "training (Wu & He, 2018); each replica normalises with its own noisy "
        "statistics although the global batch would be large enough",
        "synchronise BN across replicas: build the model in strategy.scope() and "
        "model = tfbn.convert.convert_sync_batch_norm(model) (or "
        "tfbn.SyncBatchNormalization / keras BatchNormalization(synchronized=True))",
    )  # fmt: skip


def _small_batch(bn, stat_batch, replicas, virtual, min_batch) -> LintFinding:
    where = f"per replica ({replicas} replicas)" if replicas > 1 else "per batch"
    return LintFinding(
        "small-batch", bn.name, "warning",
        f"BatchNormalization '{bn.name}' computes statistics over {stat_batch} "
        f"example(s) {where}" + (f" (virtual_batch_size={virtual})" if virtual else ""),
        f"batch statistics of fewer than {min_batch} examples are noisy: training "
        "is hurt and the running statistics drift from what inference sees "
        "(Wu & He, 2018)",
        "use keras.layers.GroupNormalization (independent of the batch), a larger "
        "batch, or sync BN across replicas (tfbn.convert.convert_sync_batch_norm); for "
        "fine-tuning, freeze BN (tfbn.convert.freeze_batch_norm)",
    )  # fmt: skip


def _normalises_channel_axis(producer, bn) -> bool:
    """Whether `bn` normalises exactly the channel axis `producer` adds its bias on."""
    from tfbn import graph

    try:
        rank = len(producer.output.shape)
    except (AttributeError, ValueError):
        rank = None
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if len(axes) != 1:
        return False
    if rank is None:
        channels_first = getattr(producer, "data_format", "channels_last") == "channels_first"
        return (axes[0] == 1) if channels_first else (axes[0] == -1)
    return graph.channel_axes(axes, rank) == [graph.producer_channel_axis(producer, rank)]
