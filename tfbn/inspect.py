"""Reports on models and SavedModels: the training-mode lint for any SavedModel.

`lint_saved_model(path)` parses `saved_model.pb` (nothing is executed, no
variables are loaded) and walks, for every serving signature, exactly the part of
the graph a request executes: backwards from the signature's outputs through
the top-level graph and into every function it calls (`StatefulPartitionedCall`,
`If`/`While`/`Case` branches, direct calls), following each function's return
values and control returns (TF2 runs stateful ops through control returns). TF1
SavedModels (tensors in one GraphDef) and TF2 ones (a function library) alike.

What it reports (each a `Finding` with a `kind`):

- `training_batch_norm`: FusedBatchNorm/V2/V3 with `is_training=True`.
- `batch_moments`: a Mean/Sum over axis 0 (the batch axis) whose result feeds a
  normalisation (Rsqrt/Sqrt/SquaredDifference/Square downstream): BatchNorm
  computing batch statistics, the decomposed form (Keras 3, `tf.nn.moments`).
- `moving_average_update`: a variable write on the serving path whose variable
  or op names moving statistics (`moving_mean`, `AssignMovingAvg`, ...).
- `variable_update`: any other variable write on the serving path (serving
  mutates state, e.g. a Keras seed generator advanced by dropout).
- `random_op`: a random-number op on the serving path (dropout in training mode).
- `fixed_batch_dim`: a signature input whose first dimension is fixed.
- `no_serving_graph`: no MetaGraph tagged `serve` (TF Serving cannot load it).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from tfbn import layout
from tfbn.report import Report, deprecated_alias, json_safe

FUSED_BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
REDUCTION_OPS = ("Mean", "Sum")
NORMALIZATION_OPS = ("Rsqrt", "Sqrt", "SquaredDifference", "Square")
ASSIGN_OPS = (
    "Assign", "AssignAdd", "AssignSub",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "ScatterUpdate", "ScatterAdd", "ScatterSub",
    "ResourceScatterUpdate", "ResourceScatterAdd", "ResourceScatterSub",
)  # fmt: skip
RANDOM_OP = re.compile(
    r"Random|TruncatedNormal|Multinomial|RngBitGenerator|NonDeterministicInts"
    r"|^Stateful(Uniform|StandardNormal|TruncatedNormal|RandomBinomial)"
)
# Key/counter helpers of the random generators: they draw nothing themselves.
RANDOM_HELPERS = re.compile(r"GetKeyCounter|GetAlg|RngReadAndSkip|RngSkip")
MOVING_STATS = re.compile(
    r"moving_mean|moving_var|moving_variance|AssignMovingAvg|ExponentialMovingAverage"
    r"|running_mean|running_var|num_batches_tracked|num_skipped_updates",
    re.IGNORECASE,
)
VARIABLE_OPS = ("VarHandleOp", "VariableV2", "Variable")
CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
FORWARD_DEPTH = 12  # how far downstream of a batch-axis reduction to look for a normalisation
SAVED_MODEL_FILES = layout.SAVED_MODEL_FILES


@dataclass(frozen=True)
class Finding:
    """One problem on a serving path: what `kind`, in which signature, at which node."""

    kind: str
    signature: str
    node: str
    op: str
    message: str
    function: str | None = None

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"[{self.kind}] {self.signature}: {self.message}{where}"


@dataclass
class SavedModelReport(Report):
    """`lint_saved_model`'s result: the signatures read and what was found."""

    path: str
    signatures: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def format(self) -> str:
        head = f"{self.path}: {len(self.signatures)} serving signature(s) " + (
            f"({', '.join(self.signatures)})" if self.signatures else ""
        )
        if self.ok:
            return f"{head}\nOK: no BatchNorm in training mode, no state updates, no random ops, dynamic batch"
        lines = [head, f"{len(self.findings)} finding(s):"]
        lines += [f"  {f}" for f in self.findings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "path": self.path,
                "ok": self.ok,
                "signatures": self.signatures,
                "findings": [asdict(f) for f in self.findings],
            }
        )


# The TF Serving layout (version directories, SavedModel files) lives in tfbn.layout.
is_saved_model_dir = layout.is_saved_model_dir
resolve_saved_model_dir = layout.resolve_saved_model_dir
_read_saved_model = layout.read_saved_model


def lint_saved_model(path: str | os.PathLike) -> SavedModelReport:
    """The training-mode lint of any SavedModel (see the module docstring for the checks).

    Args:
        path: A SavedModel directory, or a TF Serving base path (its latest version
            is linted).

    Returns:
        A `SavedModelReport`; `report.ok` is True when nothing was found.
    """
    path = resolve_saved_model_dir(path)
    saved_model = _read_saved_model(path)
    report = SavedModelReport(path=path)
    serving = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
    if not serving:
        tags = [list(mg.meta_info_def.tags) for mg in saved_model.meta_graphs]
        report.findings.append(
            Finding("no_serving_graph", "-", "-", "-",
                    f"no MetaGraph is tagged 'serve' (tags: {tags}); TF Serving cannot load it")
        )  # fmt: skip
        return report
    for meta_graph in serving:
        walker = _GraphWalker(meta_graph.graph_def)
        for key in sorted(meta_graph.signature_def):
            if key.startswith("__"):  # __saved_model_init_op: initialisation, not serving
                continue
            signature = meta_graph.signature_def[key]
            report.signatures.append(key)
            report.findings.extend(_fixed_batch_findings(key, signature))
            roots = [info.name for info in signature.outputs.values() if info.name]
            report.findings.extend(walker.findings(key, roots))
    report.findings.sort(key=lambda f: (f.signature, f.function or "", f.kind, f.node))
    return report


def _fixed_batch_findings(key, signature) -> list[Finding]:
    findings = []
    for name in sorted(signature.inputs):
        shape = signature.inputs[name].tensor_shape
        if shape.unknown_rank or not shape.dim or shape.dim[0].size < 0:
            continue
        dims = [d.size if d.size >= 0 else None for d in shape.dim]
        findings.append(
            Finding("fixed_batch_dim", key, name, "-",
                    f"input '{name}' declares a fixed batch dimension {dims[0]} (shape {dims}): "
                    "other batch sizes are outside the signature (clients reading the metadata "
                    "and TF Serving's request batching go by it)")
        )  # fmt: skip
    return findings


def _source(tensor_name: str) -> str:
    """Node name of an input reference: 'n', 'n:0', 'n:out:0' or '^n'."""
    return tensor_name.lstrip("^").split(":")[0]


class _Body:
    """One graph body: the top-level GraphDef or one FunctionDef."""

    def __init__(self, nodes, function=None):
        self.function = function
        self.name = function.signature.name if function is not None else None
        self.nodes = {n.name: n for n in nodes}
        self.args = (
            {a.name: i for i, a in enumerate(function.signature.input_arg)} if function else {}
        )
        self.consumers: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            for inp in node.input:
                if not inp.startswith("^"):
                    self.consumers[_source(inp)].append(node.name)

    def roots(self) -> list[str]:
        """Nodes a call of this function runs: sources of its returns and control returns."""
        return [_source(v) for v in self.function.ret.values()] + list(
            self.function.control_ret.values()
        )


@dataclass
class _Frame:
    """A function body as called from `call_node` in `caller` (to resolve arguments)."""

    body: _Body
    call_node: object = None
    caller: _Frame | None = None


class _GraphWalker:
    def __init__(self, graph_def):
        self.top = _Body(graph_def.node)
        self.library = {f.signature.name: f for f in graph_def.library.function}
        self._bodies: dict[str, _Body] = {}

    def body(self, name: str) -> _Body:
        if name not in self._bodies:
            self._bodies[name] = _Body(self.library[name].node_def, self.library[name])
        return self._bodies[name]

    def called_functions(self, node) -> list[str]:
        names = [node.op] if node.op in self.library else []
        for attr in node.attr.values():
            if attr.HasField("func"):
                names.append(attr.func.name)
            elif attr.HasField("list"):
                names.extend(f.name for f in attr.list.func)
        return [n for n in names if n in self.library]

    def serving_nodes(self, roots: list[str]):
        """(frame, node) for every node a request for these output tensors runs."""
        out, visited_functions = [], set()
        pending = [(_Frame(self.top), [_source(r) for r in roots])]
        while pending:
            frame, stack = pending.pop()
            seen = set()
            while stack:
                name = stack.pop()
                if name in seen or name not in frame.body.nodes:
                    continue
                seen.add(name)
                node = frame.body.nodes[name]
                out.append((frame, node))
                stack.extend(_source(i) for i in node.input)
                for fname in self.called_functions(node):
                    if fname not in visited_functions:
                        visited_functions.add(fname)
                        body = self.body(fname)
                        pending.append((_Frame(body, node, frame), body.roots()))
        return out

    def findings(self, signature: str, roots: list[str]) -> list[Finding]:
        findings = []
        for frame, node in self.serving_nodes(roots):
            finding = self._check(signature, frame, node)
            if finding is not None:
                findings.append(finding)
        return findings

    def _check(self, signature, frame, node) -> Finding | None:
        op, name = node.op, node.name

        def finding(kind, message):
            return Finding(kind, signature, name, op, message, frame.body.name)

        # is_training defaults to True, and default-valued attributes are stripped on save.
        training = node.attr["is_training"].b if "is_training" in node.attr else True
        if op in FUSED_BATCH_NORM_OPS and training:
            return finding(
                "training_batch_norm",
                f"{op} '{name}' runs with is_training=True: it normalises with the statistics "
                "of the request's batch, so an example's output depends on the rest of its batch",
            )
        if op in REDUCTION_OPS and self._reduces_batch_axis(frame.body, node):
            if self._feeds_normalization(frame.body, name):
                return finding(
                    "batch_moments",
                    f"{op} '{name}' reduces over axis 0 (the batch axis) and feeds a "
                    "normalisation: BatchNorm computing batch statistics at serving time",
                )
        if op in ASSIGN_OPS:
            variable = self._variable_name(frame, node.input[0]) if node.input else None
            label = f"'{variable}'" if variable else "a variable"
            if MOVING_STATS.search(f"{variable or ''} {name}"):
                return finding(
                    "moving_average_update",
                    f"{op} '{name}' updates moving statistics {label} on the serving path: "
                    "BatchNorm in training mode; every request changes the model",
                )
            return finding(
                "variable_update",
                f"{op} '{name}' writes {label} on the serving path: serving mutates state",
            )
        if RANDOM_OP.search(op) and not RANDOM_HELPERS.search(op):
            hint = " (dropout in training mode)" if "dropout" in name.lower() else ""
            return finding(
                "random_op", f"{op} '{name}' draws random numbers on the serving path{hint}"
            )
        return None

    @staticmethod
    def _reduces_batch_axis(body: _Body, node) -> bool:
        if len(node.input) < 2:
            return False
        const = body.nodes.get(_source(node.input[1]))
        if const is None or const.op != "Const":
            return False
        import numpy as np
        from tensorflow.python.framework import tensor_util

        axes = np.atleast_1d(tensor_util.MakeNdarray(const.attr["value"].tensor))
        return 0 in axes.tolist()

    @staticmethod
    def _feeds_normalization(body: _Body, name: str) -> bool:
        frontier, seen = [name], {name}
        for _ in range(FORWARD_DEPTH):
            nxt = []
            for n in frontier:
                for consumer in body.consumers.get(n, ()):
                    if consumer in seen:
                        continue
                    if body.nodes[consumer].op in NORMALIZATION_OPS:
                        return True
                    seen.add(consumer)
                    nxt.append(consumer)
            frontier = nxt
        return False

    def _variable_name(self, frame: _Frame, ref: str, hops: int = 32) -> str | None:
        """The variable behind a resource/ref input, through function arguments."""
        for _ in range(hops):
            src = _source(ref)
            body = frame.body
            if src in body.nodes:
                node = body.nodes[src]
                if node.op in VARIABLE_OPS:
                    shared = (
                        node.attr["shared_name"].s.decode() if "shared_name" in node.attr else ""
                    )
                    return shared or node.name
                if node.op in ("Identity", "ReadVariableOp") and node.input:
                    ref = node.input[0]
                    continue
                return None
            if src in body.args and frame.caller is not None and frame.call_node is not None:
                call = frame.call_node
                if call.op not in CALL_OPS and call.op not in self.library:
                    return None
                inputs = [i for i in call.input if not i.startswith("^")]
                index = body.args[src]
                if index >= len(inputs):
                    return None
                ref, frame = inputs[index], frame.caller
                continue
            return None
        return None


# ======================================================= Keras model reports ==
# `inspect_model` (running statistics table) and `lint_model` (wiring that
# keeps BN from working). Keras/TensorFlow are imported inside the functions so
# the SavedModel lint above keeps working without loading TensorFlow.

KERAS_MODEL_SUFFIXES = (".keras",)
DEAD_GAMMA = 1e-3  # |gamma| below this: the channel's output is ~beta, whatever the input
COLLAPSED_STD = 0.1  # normalised std sqrt(var / (var + eps)) below this: a ~constant channel
MIN_BATCH = 8  # Wu & He 2018 (Group Normalization), fig. 1: BN degrades fast below 8


def is_keras_model_file(path: str | os.PathLike) -> bool:
    """True for a path ending in `.keras` (a Keras 3 model archive)."""
    return os.fspath(path).lower().endswith(KERAS_MODEL_SUFFIXES)


def load_keras_model(model_or_path):
    """A keras.Model as given, or loaded (uncompiled) from a `.keras` file."""
    import keras

    import tfbn.layers  # noqa: F401 - registers tfbn's layers for deserialisation
    from tfbn import _compat

    _compat.check_not_legacy_keras(model_or_path)
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No such model file: {path!r}")
        if os.path.isdir(path) and is_saved_model_dir(path):
            raise ValueError(
                f"{path!r} is a SavedModel, not a Keras model: use "
                "tfbn.inspect.lint_saved_model (or `tfbn inspect` on it)."
            )
        if not is_keras_model_file(path):
            raise ValueError(f"Expected a Keras model file ending in .keras. Received: {path!r}")
        return keras.saving.load_model(path, compile=False)
    raise TypeError(
        "Expected a keras.Model or the path of a .keras file. Received: "
        f"{type(model_or_path).__name__}"
    )


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
    import numpy as np

    from tfbn.convert import batch_norm_layers
    from tfbn.layers.batch_norm import BatchNormalization

    model = load_keras_model(model_or_path)
    report = ModelReport(model=model.name)
    for layer in batch_norm_layers(model):
        mean = np.asarray(layer.moving_mean.numpy(), np.float64).ravel()
        var = np.asarray(layer.moving_variance.numpy(), np.float64).ravel()
        gamma = (
            None
            if getattr(layer, "gamma", None) is None
            else np.asarray(layer.gamma.numpy(), np.float64).ravel()
        )
        beta = (
            None
            if getattr(layer, "beta", None) is None
            else np.asarray(layer.beta.numpy(), np.float64).ravel()
        )
        tfbn_layer = isinstance(layer, BatchNormalization)
        counter = getattr(layer, "num_batches_tracked", None)
        skipped = getattr(layer, "num_skipped_updates", None)
        row = BatchNormRow(
            name=layer.name,
            path=getattr(layer, "path", layer.name),
            kind="tfbn" if tfbn_layer else "keras",
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
        uses_running_stats = getattr(layer, "track_running_stats", True)
        if uses_running_stats and np.all(mean == 0) and np.all(var == 1):
            row.flags.append("never_updated")
        arrays = [a for a in (mean, var, gamma, beta) if a is not None]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            row.flags.append("nonfinite")
            row.details["nonfinite_channels"] = np.flatnonzero(
                ~np.isfinite(mean)
                | ~np.isfinite(var)
                | (~np.isfinite(gamma) if gamma is not None else False)
                | (~np.isfinite(beta) if beta is not None else False)
            ).tolist()
        if gamma is not None:
            dead = np.flatnonzero(np.abs(gamma) < dead_gamma)
            if dead.size:
                row.flags.append("dead_channels")
                row.details["dead_channels"] = dead.tolist()
        if uses_running_stats:
            with np.errstate(invalid="ignore", divide="ignore"):
                std = np.sqrt(var / (var + layer.epsilon))
            collapsed = np.flatnonzero((var >= 0) & (std < collapsed_std))
            if collapsed.size:
                row.flags.append("variance_collapse")
                row.details["collapsed_channels"] = collapsed.tolist()
            negative = np.flatnonzero(var < 0)
            if negative.size:
                row.flags.append("negative_variance")
                row.details["negative_variance_channels"] = negative.tolist()
        if row.skipped_updates:
            row.flags.append("skipped_updates")
        single = getattr(layer, "num_single_value_batches", None)
        if single is not None and int(single.numpy()) > 0:
            row.flags.append("one_value_per_channel")
        report.rows.append(row)
    return report


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


def lint_model(  # noqa: C901 - over the complexity limit, to be split into named steps
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
    import keras

    from tfbn import distribute, graph
    from tfbn.convert import batch_norm_layers, is_batch_norm

    model = load_keras_model(model_or_path)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )
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
    report = LintReport(model=model.name, batch_size=batch_size, replicas=replicas)
    bns = batch_norm_layers(model)
    edges = graph.layer_edges(model)
    consumers: dict[int, list] = {}
    for producer, consumer in edges:
        consumers.setdefault(id(producer), []).append(consumer)
    add = report.findings.append

    recurrent = (keras.layers.RNN, keras.layers.Bidirectional)
    dropout = (keras.layers.Dropout, keras.layers.AlphaDropout, keras.layers.GaussianDropout)
    biased = graph.PRODUCER_TYPES  # the layers that add a per-channel bias

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, recurrent):
            for inner in layer._flatten_layers(include_self=False, recursive=True):
                if is_batch_norm(inner):
                    add(LintFinding(
                        "bn-in-recurrent", inner.name, "warning",
                        f"BatchNormalization '{inner.name}' runs inside recurrent layer '{layer.name}'",
                        "inside the recurrence one set of running statistics is shared by every "
                        "time step although each step's activations have their own distribution, "
                        "and batch statistics of short batches of sequences are noisy; at "
                        "inference the averaged statistics match no step",
                        "use keras.layers.LayerNormalization inside the cell (per example, no "
                        "batch statistics), or per-time-step statistics (recurrent BN, Cooijmans "
                        "et al. 2016)",
                    ))  # fmt: skip

    seen_pairs = set()
    for producer, bn in edges:
        if not is_batch_norm(bn) or (id(producer), id(bn)) in seen_pairs:
            continue
        seen_pairs.add((id(producer), id(bn)))
        if isinstance(producer, biased) and getattr(producer, "use_bias", False):
            only_bn = all(is_batch_norm(c) for c in consumers.get(id(producer), []))
            if only_bn and _normalises_channel_axis(producer, bn):
                add(LintFinding(
                    "bias-before-bn", producer.name, "info",
                    f"'{producer.name}' ({type(producer).__name__}, use_bias=True) feeds "
                    f"BatchNormalization '{bn.name}' directly",
                    "BN subtracts each channel's mean, so a per-channel bias added right before "
                    "it cancels exactly: its gradient is zero and beta already provides the "
                    "offset; it only costs parameters, memory and a kernel launch",
                    f"create '{producer.name}' with use_bias=False",
                ))  # fmt: skip
        if isinstance(producer, recurrent):
            add(LintFinding(
                "bn-after-recurrent", bn.name, "warning",
                f"BatchNormalization '{bn.name}' directly normalises the output of recurrent "
                f"layer '{producer.name}'",
                "over sequence outputs BN pools every time step (and padding, without a mask) "
                "into one set of statistics; batches of variable-length sequences give "
                "statistics that change with the padding and the batch composition",
                "use keras.layers.LayerNormalization after recurrent layers; if you keep BN, "
                "make sure the mask reaches it (tfbn and Keras BN ignore masked steps)",
            ))  # fmt: skip
        if isinstance(producer, dropout):
            add(LintFinding(
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
            ))  # fmt: skip

    if batch_size is not None:
        per_replica = batch_size // replicas
        for bn in bns:
            if not bn.trainable:
                continue  # a frozen BN normalises with running statistics in training too
            synced = replicas > 1 and bool(getattr(bn, "synchronized", False))
            group = (getattr(bn, "sync_group_size", None) or replicas) if synced else 1
            stat_batch = per_replica * group
            virtual = getattr(bn, "virtual_batch_size", None)
            if virtual:
                stat_batch = min(stat_batch, virtual)
            if stat_batch >= min_batch:
                continue
            if replicas > 1 and not synced and not virtual and batch_size >= min_batch:
                add(LintFinding(
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
                ))  # fmt: skip
            else:
                where = f"per replica ({replicas} replicas)" if replicas > 1 else "per batch"
                add(LintFinding(
                    "small-batch", bn.name, "warning",
                    f"BatchNormalization '{bn.name}' computes statistics over {stat_batch} "
                    f"example(s) {where}" + (f" (virtual_batch_size={virtual})" if virtual else ""),
                    f"batch statistics of fewer than {min_batch} examples are noisy: training "
                    "is hurt and the running statistics drift from what inference sees "
                    "(Wu & He, 2018)",
                    "use keras.layers.GroupNormalization (independent of the batch), a larger "
                    "batch, or sync BN across replicas (tfbn.convert.convert_sync_batch_norm); for "
                    "fine-tuning, freeze BN (tfbn.convert.freeze_batch_norm)",
                ))  # fmt: skip
    return report


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
