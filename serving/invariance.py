"""Batch-size invariance: does an example's answer depend on the batch it lands in?

A model whose BatchNormalization still uses batch statistics at inference (left in
training mode) answers each example differently depending on the other examples in
its batch; behind TF Serving's server-side batching those are other clients' requests.

`check_batch_invariance(predict, inputs)` re-runs the same examples in batches of
1, 2, 3, 7 and all of them, in several random orders, and compares every answer with
a reference: the export's golden outputs when there are any, else the full-batch
answer. `concurrent=True` also fires every example as its own single-row request, all
at once, so a server that batches requests mixes them (the case where each client
only ever sends one row and still gets a batch-dependent answer).

`predict` is any callable from a dict of named arrays (first dimension = examples) to a
dict of named arrays, so the check runs against an in-process SavedModel
(`saved_model_predictor`), TF Serving over REST or gRPC (`tfbn.serving.client`), or a fake.

Verdict per row of the report: every output element within `atol + rtol * |reference|`
(NumPy's `allclose` rule). Deviations are also reported as max absolute and max
relative (|y - ref| / max(|ref|, atol)) differences, with the worst example's index.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "GOLDEN_RELPATH",
    "InvarianceReport",
    "InvarianceRow",
    "check_batch_invariance",
    "load_golden",
    "saved_model_predictor",
    "run_check",
    "synthetic_inputs",
]

GOLDEN_RELPATH = os.path.join("assets.extra", "tfbn_golden.npz")

Arrays = Mapping[str, np.ndarray]
PredictFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def load_golden(version_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """Read `<version_dir>/assets.extra/tfbn_golden.npz` written by the export module.

    Returns `(inputs, outputs)` keyed by the serving_default input / output names (the
    npz holds `inputs/<name>` and `outputs/<name>`), or None when there is no golden
    file. A path to an .npz file itself is accepted too. Raises ValueError for a file
    that is not a golden file.
    """
    path = os.fspath(version_dir)
    if not path.endswith(".npz"):
        path = os.path.join(path, GOLDEN_RELPATH)
    if not os.path.isfile(path):
        return None
    inputs, outputs = {}, {}
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a readable .npz golden file: {err}") from None
    if not hasattr(data, "files"):
        raise ValueError(f"{path} holds a single array; a golden file is an .npz archive")
    with data:
        for key in data.files:
            group, _, name = key.partition("/")
            if group == "inputs" and name:
                inputs[name] = data[key]
            elif group == "outputs" and name:
                outputs[name] = data[key]
            else:
                raise ValueError(f"{path}: unexpected array {key!r}; a golden file holds only "
                                 "'inputs/<name>' and 'outputs/<name>' arrays")
    if not inputs or not outputs:
        raise ValueError(f"{path}: a golden file needs at least one 'inputs/<name>' and one "
                         f"'outputs/<name>' array; Received: {sorted(inputs)}, {sorted(outputs)}")
    _num_rows(inputs, "golden inputs")
    n = _num_rows(outputs, "golden outputs")
    if n != _num_rows(inputs, "golden inputs"):
        raise ValueError(f"{path}: golden inputs and outputs have different numbers of rows")
    return inputs, outputs


def _num_rows(arrays: Arrays, what: str) -> int:
    rows = {name: (np.shape(a)[0] if np.ndim(a) else None) for name, a in arrays.items()}
    if not rows:
        raise ValueError(f"{what} is empty; pass at least one named array")
    if None in rows.values():
        raise ValueError(f"{what} must have a first (example) dimension; Received scalars for "
                         f"{[k for k, v in rows.items() if v is None]}")
    if len(set(rows.values())) != 1:
        raise ValueError(f"{what} must all have the same number of rows; Received {rows}")
    n = next(iter(rows.values()))
    if n < 1:
        raise ValueError(f"{what} has no examples")
    return n


@dataclasses.dataclass(frozen=True)
class InvarianceRow:
    """One (batch size, order) run of the check."""

    mode: str               # "sequential" or "concurrent"
    batch_size: int         # rows per request
    order: int              # 0 = natural order, k > 0 = k-th random permutation
    requests: int
    max_abs: float
    max_rel: float
    worst_index: int        # example (row of the inputs) with the largest tolerance ratio
    worst_output: str
    tolerance_ratio: float  # max |y - ref| / (atol + rtol |ref|); <= 1 passes
    passed: bool


@dataclasses.dataclass
class InvarianceReport:
    passed: bool
    rows: list[InvarianceRow]
    num_examples: int
    reference: str          # "golden", "full-batch" or "given"
    atol: float
    rtol: float
    outputs: list[str]

    def failures(self) -> list[InvarianceRow]:
        return [r for r in self.rows if not r.passed]

    def table(self) -> str:
        """A markdown table, one line per run, and a verdict line."""
        head = ("| mode | batch | order | requests | max abs dev | max rel dev | worst example "
                "| tol ratio | verdict |")
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            lines.append(f"| {r.mode} | {r.batch_size} | {r.order} | {r.requests} | {r.max_abs:.3g} "
                         f"| {r.max_rel:.3g} | {r.worst_index} ({r.worst_output}) "
                         f"| {r.tolerance_ratio:.3g} | {'PASS' if r.passed else 'FAIL'} |")
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append("")
        lines.append(f"{verdict}: {self.num_examples} examples against the {self.reference} "
                     f"reference, atol={self.atol:g}, rtol={self.rtol:g}"
                     + ("" if self.passed else f"; {len(self.failures())} of {len(self.rows)} runs "
                        "depend on the batch"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "num_examples": self.num_examples,
                "reference": self.reference, "atol": self.atol, "rtol": self.rtol,
                "outputs": self.outputs, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        return self.table()


def _deviation(pred: Arrays, ref: Arrays, names: list[str], atol: float, rtol: float):
    """(max_abs, max_rel, worst_row, worst_output, tolerance_ratio) over all outputs."""
    max_abs = max_rel = 0.0
    worst = (-1.0, 0, names[0])
    tiny = np.finfo(np.float32).tiny
    for name in names:
        y = np.asarray(pred[name])
        r = np.asarray(ref[name])
        if y.shape != r.shape:
            raise ValueError(f"output {name!r} has shape {y.shape} but the reference has {r.shape}")
        if y.dtype.kind not in "fiucb" or r.dtype.kind not in "fiucb":
            same = (y == r).reshape(len(y), -1).all(axis=1)
            ratio = np.where(same, 0.0, np.inf)
            if not same.all():
                max_abs = max_rel = np.inf
        else:
            y64, r64 = y.astype(np.float64), r.astype(np.float64)
            diff = np.abs(y64 - r64)
            both_nan = np.isnan(y64) & np.isnan(r64)
            diff = np.where(both_nan, 0.0, diff)
            diff = np.where(np.isnan(diff), np.inf, diff)
            rel = diff / np.maximum(np.abs(r64), max(atol, tiny))
            tol = atol + rtol * np.abs(r64)
            with np.errstate(divide="ignore", invalid="ignore"):
                el_ratio = np.where(diff == 0, 0.0, diff / np.where(tol > 0, tol, tiny))
            ratio = el_ratio.reshape(len(y), -1).max(axis=1) if y.size else np.zeros(len(y))
            if diff.size:
                max_abs = max(max_abs, float(diff.max()))
                max_rel = max(max_rel, float(rel.max()))
        if len(ratio):
            i = int(np.argmax(ratio))
            if ratio[i] > worst[0]:
                worst = (float(ratio[i]), i, name)
    return max_abs, max_rel, worst[1], worst[2], max(worst[0], 0.0)


def _call(predict: PredictFn, batch: dict[str, np.ndarray], names: list[str], n: int):
    out = predict(batch)
    if not isinstance(out, Mapping):
        raise TypeError(f"predict must return a dict of named arrays; Received {type(out).__name__}")
    missing = [k for k in names if k not in out]
    if missing:
        raise ValueError(f"predict did not return outputs {missing}; it returned {sorted(out)}")
    res = {k: np.asarray(out[k]) for k in names}
    for k, v in res.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise ValueError(f"output {k!r} has shape {v.shape}, expected {n} rows (one per example)")
    return res


def check_batch_invariance(
    predict: PredictFn,
    inputs: Arrays,
    reference: Arrays | None = None,
    batch_sizes: Sequence[int | None] = (1, 2, 3, 7, None),
    orders: int = 3,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    concurrent: bool = False,
    concurrent_rounds: int = 1,
    max_workers: int = 32,
    seed: int = 0,
    reference_name: str | None = None,
) -> InvarianceReport:
    """Check that every example's prediction is independent of the batch it is in.

    Args:
      predict: callable, dict of named arrays (N rows) -> dict of named arrays (N rows).
      inputs: the examples, a dict of arrays sharing the first dimension.
      reference: expected outputs for `inputs` (e.g. the export's golden outputs, see
        `load_golden`); default: `predict(inputs)` on the whole batch.
      batch_sizes: rows per request; None means all examples in one request. Sizes
        larger than the number of examples are clipped to it.
      orders: how many orders to try per batch size: order 0 is the natural order,
        orders 1.. are random permutations (seeded by `seed`).
      atol, rtol: tolerance; a run passes when all |y - ref| <= atol + rtol |ref|.
      concurrent: also send every example as a single-row request, simultaneously, in
        waves of min(`max_workers`, half the examples), in a random order,
        `concurrent_rounds` times, so server-side batching mixes them (never into the
        full batch the default reference comes from).
      reference_name: label for the report ("golden", ...); defaults to "given" or
        "full-batch".

    Returns:
      An `InvarianceReport`; `report.passed` is the verdict, `report.table()` the table.
    """
    if orders < 1:
        raise ValueError(f"orders must be >= 1; Received: {orders}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0; Received: atol={atol}, rtol={rtol}")
    if concurrent_rounds < 1 or max_workers < 1:
        raise ValueError("concurrent_rounds and max_workers must be >= 1; Received: "
                         f"{concurrent_rounds}, {max_workers}")
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    n = _num_rows(inputs, "inputs")
    sizes = []
    for b in batch_sizes:
        if b is not None and (not isinstance(b, int | np.integer) or b < 1):
            raise ValueError(f"batch sizes must be positive integers or None (all); Received: {b!r}")
        b = n if b is None else min(int(b), n)
        if b not in sizes:
            sizes.append(b)
    if not sizes and not concurrent:
        raise ValueError("nothing to check: pass at least one batch size or concurrent=True")

    if reference is None:
        full = predict(inputs)
        names = sorted(full)
        reference = _call(lambda _: full, inputs, names, n)
        source = reference_name or "full-batch"
    else:
        reference = {k: np.asarray(v) for k, v in reference.items()}
        names = sorted(reference)
        if _num_rows(reference, "reference") != n:
            raise ValueError(f"reference has {_num_rows(reference, 'reference')} rows but inputs "
                             f"have {n}")
        source = reference_name or "given"

    rng = np.random.default_rng(seed)
    perms = [np.arange(n)] + [rng.permutation(n) for _ in range(orders - 1)]
    rows: list[InvarianceRow] = []

    def record(mode, b, order, requests, result):
        max_abs, max_rel, worst, worst_name, ratio = _deviation(result, reference, names, atol, rtol)
        rows.append(InvarianceRow(mode, b, order, requests, max_abs, max_rel, worst, worst_name,
                                  ratio, bool(ratio <= 1.0)))

    for b in sizes:
        for order, perm in enumerate(perms):
            result = {k: np.empty_like(v, dtype=np.asarray(v).dtype) for k, v in reference.items()}
            requests = 0
            for start in range(0, n, b):
                idx = perm[start:start + b]
                out = _call(predict, {k: v[idx] for k, v in inputs.items()}, names, len(idx))
                for k in names:
                    result[k][idx] = out[k]
                requests += 1
            record("sequential", b, order, requests, result)

    if concurrent:
        # Waves of at most half the examples: a server batching everything in flight can
        # then never rebuild the full batch the default reference came from.
        wave = max(1, min(max_workers, (n + 1) // 2 if n > 1 else 1))
        with ThreadPoolExecutor(wave) as pool:
            for rnd in range(concurrent_rounds):
                result = {k: np.empty_like(v) for k, v in reference.items()}
                order = rng.permutation(n)
                for start in range(0, n, wave):
                    ids = order[start:start + wave]
                    gate = threading.Barrier(len(ids))

                    def one(i, gate=gate):
                        try:
                            gate.wait(timeout=5)
                        except threading.BrokenBarrierError:
                            pass
                        return i, _call(predict, {k: v[i:i + 1] for k, v in inputs.items()}, names, 1)

                    for i, out in pool.map(one, ids):
                        for k in names:
                            result[k][i] = out[k][0]
                record("concurrent", 1, rnd, n, result)

    return InvarianceReport(all(r.passed for r in rows), rows, n, source, atol, rtol, names)


# --- backends ---------------------------------------------------------------------------

def _find_version_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(
            os.path.join(path, "saved_model.pbtxt")):
        return path
    versions = [int(d) for d in os.listdir(path) if d.isdigit()
                and os.path.isdir(os.path.join(path, d))] if os.path.isdir(path) else []
    if not versions:
        raise FileNotFoundError(f"{path} is neither a SavedModel directory nor a base path with "
                                "integer version directories")
    best = max(versions)
    for d in os.listdir(path):
        if d.isdigit() and int(d) == best:
            return os.path.join(path, d)
    raise FileNotFoundError(path)  # pragma: no cover


def saved_model_predictor(path: str | os.PathLike, signature_name: str = "serving_default",
                          batching=None) -> tuple[PredictFn, str]:
    """An in-process predict callable for a SavedModel, run like the development server
    runs it (optionally through its batching emulation, `batching=BatchingParameters`).

    `path` is a version directory or a base path (its highest integer version is used).
    Returns `(predict, version_dir)`.
    """
    from tfbn.serving.server import Servable, ServingError, _Batcher

    version_dir = _find_version_dir(os.fspath(path))
    base = os.path.basename(os.path.normpath(version_dir))
    try:
        servable = Servable("local", int(base) if base.isdigit() else 0, version_dir)
    except ServingError as err:
        raise ValueError(f"cannot load {version_dir}: {err.message}") from None
    if batching is not None:
        servable.batcher = _Batcher(batching)
    servable.signature(signature_name)  # fail early on an unknown signature

    def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return servable.run(signature_name, batch)[1]

    predict.servable = servable  # type: ignore[attr-defined]
    return predict, version_dir


def synthetic_inputs(signature_inputs: Mapping, num_examples: int = 64, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Random examples for a signature: `{name: (numpy dtype, shape with -1/None dims)}`.

    Floats are standard normal, integers small non-negative, booleans random. Unknown
    non-batch dimensions become 1. Strings cannot be synthesised (ValueError).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in signature_inputs.items():
        dtype = np.dtype(dtype)
        if shape is None:
            raise ValueError(f"input {name!r} has unknown rank; pass inputs explicitly")
        dims = [num_examples] + [1 if (d is None or d < 0) else int(d) for d in list(shape)[1:]]
        if not shape:
            dims = [num_examples]
        if dtype.kind == "f":
            out[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            out[name] = rng.integers(0, 10, dims).astype(dtype)
        elif dtype.kind == "b":
            out[name] = rng.integers(0, 2, dims).astype(bool)
        else:
            raise ValueError(f"cannot synthesise input {name!r} of dtype {dtype}; pass inputs "
                             "explicitly (--inputs file.npz)")
    return out


def _load_inputs_file(path: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"--inputs {path!r} is not a readable .npz file: {err}") from None
    if not hasattr(data, "files"):
        raise ValueError(f"--inputs {path!r} must be an .npz archive of named arrays")
    with data:
        return {k.removeprefix("inputs/"): data[k] for k in data.files
                if not k.startswith("outputs/")}


def run_check(
    model_path: str | None = None,
    *,
    rest: str | None = None,
    grpc: str | None = None,
    model_name: str | None = None,
    version: int | None = None,
    label: str | None = None,
    signature_name: str = "serving_default",
    golden: str | None = None,
    inputs_file: str | None = None,
    num_examples: int = 64,
    batch_sizes: Sequence[int | None] = (1, 2, 3, 7, None),
    orders: int = 3,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    concurrent: bool = False,
    concurrent_rounds: int = 1,
    max_workers: int = 32,
    batching=None,
    timeout: float = 10.0,
    seed: int = 0,
) -> InvarianceReport:
    """The check behind `tfbn check`: pick the backend, the examples and the reference.

    Backend: `rest` URL or `grpc` target (with `model_name`, optional `version`/`label`),
    else the SavedModel at `model_path` in process (optionally behind the batching
    emulation, `batching=BatchingParameters`). Examples and reference: the golden file
    (`golden`, else the one inside `model_path`'s version directory), else
    `inputs_file` (.npz of named arrays) with the full-batch reference, else
    `num_examples` synthetic examples built from the signature.
    """
    if sum(x is not None for x in (model_path, rest, grpc)) != 1:
        raise ValueError("pass exactly one of a SavedModel path, --rest URL or --grpc target")
    gold = None
    if model_path is not None:
        if version is not None or label is not None:
            raise ValueError("--model_version / --model_version_label select versions on a server; "
                             "for a local SavedModel pass its version directory")
        predict, version_dir = saved_model_predictor(model_path, signature_name, batching=batching)
        sig = predict.servable.signature_defs[signature_name]  # type: ignore[attr-defined]
        from tfbn.serving import _tensor

        spec = {k: (_tensor.numpy_dtype(v.dtype),
                    None if v.tensor_shape.unknown_rank else [d.size for d in v.tensor_shape.dim])
                for k, v in sig.inputs.items()}
        gold = load_golden(golden or version_dir)
    else:
        if not model_name:
            raise ValueError("--model_name is required with --rest / --grpc")
        if batching is not None:
            raise ValueError("batching is the server's business; configure it on the server")
        from tfbn.serving.client import GrpcClient, RestClient

        client_cls, address = (RestClient, rest) if rest is not None else (GrpcClient, grpc)
        client = client_cls(address, model_name, version=version, label=label,
                            signature_name=signature_name, timeout=timeout)
        sig_info = client.metadata().signature(signature_name)
        spec = {k: (v.numpy_dtype, None if v.shape is None else list(v.shape))
                for k, v in sig_info.inputs.items()}

        def predict(batch):
            return client.predict(batch)

        if golden:
            gold = load_golden(golden)
            if gold is None:
                raise FileNotFoundError(f"no golden file at {golden!r} (expected an .npz or a "
                                        f"version directory with {GOLDEN_RELPATH})")
    if gold is not None:
        inputs, reference = gold
        missing = sorted(set(spec) - set(inputs))
        if missing:
            raise ValueError(f"the golden file has no inputs for {missing}; it has {sorted(inputs)}")
        inputs = {k: inputs[k] for k in spec}
        return check_batch_invariance(predict, inputs, reference, batch_sizes, orders, atol, rtol,
                                      concurrent, concurrent_rounds, max_workers, seed, "golden")
    if inputs_file:
        inputs = _load_inputs_file(inputs_file)
    else:
        inputs = synthetic_inputs(spec, num_examples, seed)
    return check_batch_invariance(predict, inputs, None, batch_sizes, orders, atol, rtol,
                                  concurrent, concurrent_rounds, max_workers, seed)
