"""The training-mode lint of any SavedModel (`lint_saved_model`, `tfbn inspect SAVED_MODEL`).

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
from tfbn.report import Report, json_safe

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
