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

"Close" is `tfbn.tolerance`'s, the export gate's own: per output,
max |y - ref| <= atol + rtol * max |ref|, with rtol from the compute dtype (the golden
file records the one the gate used; float16/bfloat16 outputs imply theirs; else 1e-4).

The verdict tells apart what can go wrong:

- `invariant`: every run within tolerance of the reference (exit 0 in `tfbn check`);
- `batch_dependent`: the runs disagree with each other: an answer depends on the batch;
- `reference_mismatch`: every run agrees with every other but all differ from the
  reference by the same amount: not a batch dependence, the server computes something
  else than the golden outputs (another version, another precision, other hardware);
- `nonfinite`: NaN/Inf answers (refused unless `allow_nonfinite`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tfbn import _validate, layout
from tfbn.report import Report, deprecated_alias, json_safe
from tfbn.tolerance import Closeness, low_precision_of

__all__ = [
    "GOLDEN_RELPATH",
    "CheckError",
    "Golden",
    "InvarianceReport",
    "InvarianceRow",
    "check_batch_invariance",
    "load_golden",
    "read_golden",
    "saved_model_predictor",
    "run_check",
    "synthetic_inputs",
]

GOLDEN_RELPATH = layout.GOLDEN_RELPATH
VERDICTS = ("invariant", "batch_dependent", "reference_mismatch", "nonfinite")

Arrays = Mapping[str, np.ndarray]
PredictFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


class CheckError(RuntimeError):
    """The server (or predict callable) misbehaved: wrong outputs, wrong shapes, refused
    requests. `tfbn check` exits 1 on it (2 is for commands used wrongly)."""


@dataclasses.dataclass
class Golden:
    """A golden file: inputs and expected outputs by name, and what the export recorded
    (`meta`: compute_dtype, rtol, dtypes; {} for files written before it existed)."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    meta: dict
    path: str


def _restore_dtype(array: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None:
        return array
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


def read_golden(version_dir: str | os.PathLike) -> Golden | None:
    """Read `<version_dir>/assets.extra/tfbn_golden.npz` written by the export module.

    A path to an .npz file itself is accepted too. Returns None when there is no golden
    file; raises ValueError for a file that is not a golden file. bfloat16 arrays (stored
    as float32, listed in `meta["dtypes"]`) come back as bfloat16."""
    path = os.fspath(version_dir)
    if not path.endswith(".npz"):
        path = layout.golden_path(path)
    if not os.path.isfile(path):
        return None
    inputs, outputs, meta = {}, {}, {}
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a readable .npz golden file: {err}") from None
    if not hasattr(data, "files"):
        raise ValueError(f"{path} holds a single array; a golden file is an .npz archive")
    with data:
        for key in data.files:
            group, _, name = key.partition("/")
            if key == "meta":
                try:
                    meta = json.loads(str(data[key]))
                except ValueError as err:
                    raise ValueError(f"{path}: 'meta' is not JSON: {err}") from None
                if not isinstance(meta, dict):
                    raise ValueError(f"{path}: 'meta' must be a JSON object")
            elif group == "inputs" and name:
                inputs[name] = data[key]
            elif group == "outputs" and name:
                outputs[name] = data[key]
            else:
                raise ValueError(
                    f"{path}: unexpected array {key!r}; a golden file holds only "
                    "'inputs/<name>', 'outputs/<name>' and 'meta' arrays"
                )
    if any(a.dtype.kind == "V" for a in (*inputs.values(), *outputs.values())):
        raise ValueError(
            f"{path} stores raw bytes (dtype |V); bfloat16 written by an old tfbn? "
            "Re-export the model"
        )
    dtypes = meta.get("dtypes", {})
    inputs = {k: _restore_dtype(v, dtypes.get(f"inputs/{k}")) for k, v in inputs.items()}
    outputs = {k: _restore_dtype(v, dtypes.get(f"outputs/{k}")) for k, v in outputs.items()}
    if not inputs or not outputs:
        raise ValueError(
            f"{path}: a golden file needs at least one 'inputs/<name>' and one "
            f"'outputs/<name>' array; Received: {sorted(inputs)}, {sorted(outputs)}"
        )
    _num_rows(inputs, "golden inputs")
    n = _num_rows(outputs, "golden outputs")
    if n != _num_rows(inputs, "golden inputs"):
        raise ValueError(f"{path}: golden inputs and outputs have different numbers of rows")
    return Golden(inputs, outputs, meta, path)


def load_golden(
    version_dir: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """`(inputs, outputs)` of `read_golden(version_dir)`, or None without a golden file."""
    golden = read_golden(version_dir)
    return None if golden is None else (golden.inputs, golden.outputs)


def _num_rows(arrays: Arrays, what: str) -> int:
    rows = {name: (np.shape(a)[0] if np.ndim(a) else None) for name, a in arrays.items()}
    if not rows:
        raise ValueError(f"{what} is empty; pass at least one named array")
    if None in rows.values():
        raise ValueError(
            f"{what} must have a first (example) dimension; Received scalars for "
            f"{[k for k, v in rows.items() if v is None]}"
        )
    if len(set(rows.values())) != 1:
        raise ValueError(f"{what} must all have the same number of rows; Received {rows}")
    n = next(iter(rows.values()))
    if n < 1:
        raise ValueError(f"{what} has no examples")
    return n


@dataclasses.dataclass(frozen=True)
class InvarianceRow:
    """One (batch size, order) run of the check."""

    mode: str  # "sequential" or "concurrent"
    batch_size: int  # rows per request
    order: int  # 0 = natural order, k > 0 = k-th random permutation
    requests: int
    max_abs: float  # max |y - ref| over all outputs
    max_rel: float  # max |y - ref| / max |ref|, worst output (the gate's error)
    worst_index: int  # example (row of the inputs) with the largest tolerance ratio
    worst_output: str
    tolerance_ratio: float  # max |y - ref| / (atol + rtol max |ref|); <= 1 passes
    passed: bool
    spread_ratio: float = 0.0  # the same ratio against the first run: > 1 = batch-dependent
    nonfinite: bool = False


@dataclasses.dataclass
class InvarianceReport(Report):
    """`check_batch_invariance`'s result: one `InvarianceRow` per run (`ok`: `passed`)."""

    passed: bool
    rows: list[InvarianceRow]
    num_examples: int
    reference: str  # "golden", "full-batch" or "given"
    atol: float
    rtol: float
    outputs: list[str]
    verdict: str = "invariant"
    compute_dtype: str = "float32"
    tolerance_source: str = "float32 default"
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.passed)

    def failures(self) -> list[InvarianceRow]:
        return [r for r in self.rows if not r.passed]

    def summary(self) -> str:
        tol = (
            f"rtol={self.rtol:.3g}"
            + (f", atol={self.atol:g}" if self.atol else "")
            + f" ({self.tolerance_source})"
        )
        head = f"{self.num_examples} examples against the {self.reference} reference, {tol}"
        n, total = len(self.failures()), len(self.rows)
        if self.verdict == "invariant":
            return f"PASSED: {head}"
        if self.verdict == "batch_dependent":
            return (
                f"FAILED (depends on the batch): {head}; the runs disagree with each other "
                f"({sum(r.spread_ratio > 1 for r in self.rows)} of {total} differ from the "
                f"first run beyond tolerance), {n} of {total} runs fail"
            )
        if self.verdict == "reference_mismatch":
            worst = max(r.max_rel for r in self.rows)
            return (
                f"FAILED (differs from the reference, not from batch to batch): {head}; every "
                f"run agrees with every other within tolerance but all {n} of {total} differ "
                f"from the {self.reference} outputs (max rel. error {worst:.3g}): the server "
                "computes something else than the reference (another version or precision?)"
            )
        return f"FAILED (NaN/Inf answers): {head}; {n} of {total} runs have non-finite outputs"

    def format(self) -> str:
        """A markdown table, one line per run, and a verdict line."""
        head = (
            "| mode | batch | order | requests | max abs dev | max rel dev | worst example "
            "| tol ratio | vs first run | verdict |"
        )
        lines = [head, "|" + "---|" * 10]
        for r in self.rows:
            lines.append(
                f"| {r.mode} | {r.batch_size} | {r.order} | {r.requests} | {r.max_abs:.3g} "
                f"| {r.max_rel:.3g} | {r.worst_index} ({r.worst_output}) "
                f"| {r.tolerance_ratio:.3g} | {r.spread_ratio:.3g} "
                f"| {'PASS' if r.passed else 'FAIL'} |"
            )
        lines.append("")
        lines += self.notes
        lines.append(self.summary())
        return "\n".join(lines)

    table = deprecated_alias("table", "format")

    def to_dict(self) -> dict:
        return json_safe(
            {
                "ok": self.ok,
                "passed": self.passed,
                "verdict": self.verdict,
                "summary": self.summary(),
                "error": None,
                "num_examples": self.num_examples,
                "reference": self.reference,
                "atol": self.atol,
                "rtol": self.rtol,
                "tolerance_source": self.tolerance_source,
                "compute_dtype": self.compute_dtype,
                "outputs": self.outputs,
                "notes": self.notes,
                "rows": [dataclasses.asdict(r) for r in self.rows],  # NaN/Inf as "nan"/"inf"
            }
        )


def _deviation(
    pred: Arrays, ref: Arrays, names: list[str], closeness: Closeness, allow_nonfinite: bool
):
    """(max_abs, max_rel, worst_row, worst_output, tolerance_ratio, nonfinite) over outputs."""
    max_abs = max_rel = 0.0
    worst = (-1.0, 0, names[0])
    nonfinite = False
    for name in names:
        y, r = np.asarray(pred[name]), np.asarray(ref[name])
        if y.shape != r.shape:
            raise CheckError(f"output {name!r} has shape {y.shape} but the reference has {r.shape}")
        cmp = closeness.compare(y, r, allow_nonfinite=allow_nonfinite)
        nonfinite |= cmp.nonfinite
        max_rel = max(max_rel, cmp.error)
        max_abs = max(max_abs, cmp.max_abs)
        if len(cmp.row_ratios):
            i = int(np.argmax(cmp.row_ratios))
            if cmp.row_ratios[i] > worst[0]:
                worst = (float(cmp.row_ratios[i]), i, name)
    return max_abs, max_rel, worst[1], worst[2], max(worst[0], 0.0), nonfinite


def _call(predict: PredictFn, batch: dict[str, np.ndarray], names: list[str], n: int):
    out = _require_dict(predict(batch))
    missing = [k for k in names if k not in out]
    if missing:
        raise CheckError(f"predict did not return outputs {missing}; it returned {sorted(out)}")
    res = {k: np.asarray(out[k]) for k in names}
    for k, v in res.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise CheckError(
                f"output {k!r} has shape {v.shape}, expected {n} rows (one per example)"
            )
    return res


def _chunked(predict: PredictFn, inputs: dict[str, np.ndarray], names, n: int, limit: int):
    parts = [
        _call(
            predict, {k: v[lo : lo + limit] for k, v in inputs.items()}, names, min(limit, n - lo)
        )
        for lo in range(0, n, limit)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


def check_batch_invariance(
    predict: PredictFn,
    inputs: Arrays,
    reference: Arrays | None = None,
    batch_sizes: Sequence[int | None] = (1, 2, 3, 7, None),
    orders: int = 3,
    atol: float = 0.0,
    rtol: float | None = None,
    concurrent: bool = False,
    concurrent_rounds: int = 1,
    max_workers: int = 32,
    seed: int = 0,
    reference_name: str | None = None,
    *,
    compute_dtype: str | None = None,
    allow_nonfinite: bool = False,
    max_batch_size: int | None = None,
    progress: bool | None = False,
) -> InvarianceReport:
    """Check that every example's prediction is independent of the batch it is in.

    Args:
      predict: callable, dict of named arrays (N rows) -> dict of named arrays (N rows).
      inputs: the examples, a dict of arrays sharing the first dimension.
      reference: expected outputs for `inputs` (e.g. the export's golden outputs, see
        `read_golden`); default: `predict(inputs)` on the whole batch (in requests of
        at most `max_batch_size` rows).
      batch_sizes: rows per request; None means all examples in one request. Sizes
        larger than the number of examples (or `max_batch_size`) are clipped to it.
      orders: how many orders to try per batch size: order 0 is the natural order,
        orders 1.. are random permutations (seeded by `seed`).
      atol, rtol: `tfbn.tolerance.Closeness`: a run passes when, per output,
        max |y - ref| <= atol + rtol max |ref|. `rtol=None`: the default of
        `compute_dtype`, else of float16/bfloat16 outputs, else float32's (1e-4).
      concurrent: also send every example as a single-row request, simultaneously, in
        waves of min(`max_workers`, half the examples), in a random order,
        `concurrent_rounds` times, so server-side batching mixes them (never into the
        full batch the default reference comes from).
      reference_name: label for the report ("golden", ...); defaults to "given" or
        "full-batch".
      compute_dtype: what the model computes in, for the default rtol.
      allow_nonfinite: count identical NaN/Inf as equal instead of failing.
      max_batch_size: the server's largest accepted batch (its batching limit).
      progress: requests sent / planned on stderr (`tfbn.progress`): True, False, or None
        for "when stderr is a terminal".

    Returns:
      An `InvarianceReport`; `report.passed` is the verdict, `report.format()` the table.

    Raises:
      ValueError: bad arguments. CheckError: `predict` answered wrongly.
    """
    _check_limits(orders, atol, rtol, concurrent_rounds, max_workers, max_batch_size)
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    n = _num_rows(inputs, "inputs")
    limit = n if max_batch_size is None else min(n, int(max_batch_size))
    sizes = _request_sizes(batch_sizes, limit)
    if not sizes and not concurrent:
        raise ValueError("nothing to check: pass at least one batch size or concurrent=True")

    from tfbn.progress import progress_bar

    planned = _planned_requests(
        sizes, orders, n, limit, concurrent_rounds if concurrent else 0, reference is None
    )
    bar = progress_bar(planned, "tfbn check", progress, unit="req")
    try:
        return _check(
            _counted(predict, bar),
            inputs,
            reference,
            sizes,
            orders,
            n,
            limit,
            closeness_args=(rtol, atol, compute_dtype),
            allow_nonfinite=allow_nonfinite,
            seed=seed,
            reference_name=reference_name,
            concurrent=concurrent,
            concurrent_rounds=concurrent_rounds,
            max_workers=max_workers,
        )
    finally:
        bar.close()


def _check_limits(orders, atol, rtol, concurrent_rounds, max_workers, max_batch_size) -> None:
    """ValueError naming the first of check_batch_invariance's counts and tolerances that is out
    of range (counts: `tfbn._validate`'s rule, booleans refused)."""
    _validate.positive_int("orders", orders)
    if atol < 0 or (rtol is not None and rtol < 0):
        raise ValueError(f"atol and rtol must be >= 0; Received: atol={atol}, rtol={rtol}")
    _validate.positive_int("concurrent_rounds", concurrent_rounds)
    _validate.positive_int("max_workers", max_workers)
    _validate.positive_int("max_batch_size", max_batch_size, allow_none=True)


def _request_sizes(batch_sizes: Sequence[int | None], limit: int) -> list[int]:
    """The distinct rows per request, in the order given: None is `limit` (all the examples
    or the server's limit), larger sizes are clipped to it."""
    sizes = []
    for b in batch_sizes:
        if b is not None and (not isinstance(b, int | np.integer) or b < 1):
            raise ValueError(
                f"batch sizes must be positive integers or None (all); Received: {b!r}"
            )
        b = limit if b is None else min(int(b), limit)
        if b not in sizes:
            sizes.append(b)
    return sizes


def _planned_requests(
    sizes: list[int], orders: int, n: int, limit: int, rounds: int, full_batch_reference: bool
) -> int:
    """How many requests the check sends: every (size, order) run, `rounds` concurrent
    rounds of single rows, and the full-batch reference (plus its probe when chunked)."""
    planned = sum(orders * -(-n // b) for b in sizes) + n * rounds
    return planned + (-(-n // limit) + (limit < n) if full_batch_reference else 0)


def _counted(predict: PredictFn, bar) -> PredictFn:
    """`predict`, advancing the progress bar by one per request."""

    def counted(batch):
        out = predict(batch)
        bar.update(1)
        return out

    return counted


def _check(
    predict,
    inputs,
    reference,
    sizes,
    orders,
    n,
    limit,
    closeness_args,
    allow_nonfinite,
    seed,
    reference_name,
    concurrent,
    concurrent_rounds,
    max_workers,
) -> InvarianceReport:
    """The check itself, on validated arguments: build or take the reference, run every
    (batch size, order) and the concurrent rounds, and judge them."""
    rtol, atol, compute_dtype = closeness_args
    if reference is None:
        reference, names = _full_batch_reference(predict, inputs, n, limit)
        source = reference_name or "full-batch"
    else:
        reference, names = _given_reference(reference, n)
        source = reference_name or "given"
    closeness = _closeness_for(reference, rtol, atol, compute_dtype)

    rng = np.random.default_rng(seed)
    perms = [np.arange(n)] + [rng.permutation(n) for _ in range(orders - 1)]
    runs = _Runs(reference, names, closeness, allow_nonfinite)
    for b in sizes:
        for order, perm in enumerate(perms):
            result, requests = _sequential_run(predict, inputs, names, reference, perm, b)
            runs.record("sequential", b, order, requests, result)
    if concurrent:
        _concurrent_runs(
            predict, inputs, names, reference, n, rng, runs, concurrent_rounds, max_workers
        )

    notes = []
    if limit < n:
        notes.append(
            f"note: requests limited to the server's max_batch_size {limit} (of {n} examples)"
        )
    return InvarianceReport(
        all(r.passed for r in runs.rows),
        runs.rows,
        n,
        source,
        closeness.atol,
        closeness.rtol,
        names,
        _verdict(runs.rows, allow_nonfinite),
        closeness.dtype,
        closeness.source,
        notes,
    )


def _require_dict(out) -> Mapping:
    """`out`, if `predict` returned a dict (any Mapping) as it must."""
    if not isinstance(out, Mapping):
        raise CheckError(
            f"predict must return a dict of named arrays; Received {type(out).__name__}"
        )
    return out


def _full_batch_reference(predict: PredictFn, inputs, n: int, limit: int):
    """`(reference, output names)`: `predict` on all the examples, in requests of at most
    `limit` rows (a first request of `limit` rows tells the output names)."""
    if limit >= n:
        full = _require_dict(predict(inputs))
        names = sorted(full)
        return _call(lambda _: full, inputs, names, n), names
    first = _require_dict(predict({k: v[:limit] for k, v in inputs.items()}))
    names = sorted(first)
    return _chunked(predict, inputs, names, n, limit), names


def _given_reference(reference: Arrays, n: int):
    """`(reference as arrays, output names)` after checking it has a row per example."""
    reference = {k: np.asarray(v) for k, v in reference.items()}
    if _num_rows(reference, "reference") != n:
        raise ValueError(
            f"reference has {_num_rows(reference, 'reference')} rows but inputs have {n}"
        )
    return reference, sorted(reference)


def _closeness_for(reference: Arrays, rtol, atol, compute_dtype) -> Closeness:
    """The tolerance of `compute_dtype`, else of low-precision reference outputs, else float32."""
    dtype = (
        compute_dtype
        or low_precision_of(np.asarray(v).dtype for v in reference.values())
        or "float32"
    )
    return Closeness.for_dtype(dtype, rtol, atol)


class _Runs:
    """The report's rows: each run against the reference, and against the first run."""

    def __init__(self, reference, names, closeness: Closeness, allow_nonfinite: bool):
        self.reference, self.names = reference, names
        self.closeness, self.allow_nonfinite = closeness, allow_nonfinite
        self.rows: list[InvarianceRow] = []
        self.first: dict | None = None

    def record(self, mode: str, b: int, order: int, requests: int, result: dict) -> None:
        max_abs, max_rel, worst, worst_name, ratio, nonfinite = _deviation(
            result, self.reference, self.names, self.closeness, self.allow_nonfinite
        )
        if self.first is None:
            self.first = result
        spread = _deviation(result, self.first, self.names, self.closeness, True)[4]
        bad_nonfinite = nonfinite and not self.allow_nonfinite
        self.rows.append(
            InvarianceRow(
                mode,
                b,
                order,
                requests,
                max_abs,
                max_rel,
                worst,
                worst_name,
                ratio,
                bool(ratio <= 1.0 and not bad_nonfinite),
                spread,
                nonfinite,
            )
        )


def _sequential_run(predict: PredictFn, inputs, names, reference, perm, b: int):
    """`(answers in example order, requests sent)`: the examples in the order `perm`, `b`
    rows per request."""
    result = {k: np.empty_like(v, dtype=np.asarray(v).dtype) for k, v in reference.items()}
    requests = 0
    for start in range(0, len(perm), b):
        idx = perm[start : start + b]
        out = _call(predict, {k: v[idx] for k, v in inputs.items()}, names, len(idx))
        for k in names:
            result[k][idx] = out[k]
        requests += 1
    return result, requests


def _concurrent_runs(
    predict, inputs, names, reference, n: int, rng, runs: _Runs, rounds: int, max_workers: int
):
    """`rounds` runs of single-row requests, each in a random order, sent in waves."""
    # Waves of at most half the examples: a server batching everything in flight can
    # then never rebuild the full batch the default reference came from.
    wave = max(1, min(max_workers, (n + 1) // 2 if n > 1 else 1))
    with ThreadPoolExecutor(wave) as pool:
        for rnd in range(rounds):
            result = {k: np.empty_like(v) for k, v in reference.items()}
            order = rng.permutation(n)
            for start in range(0, n, wave):
                ids = order[start : start + wave]
                for i, out in _single_rows_at_once(pool, predict, inputs, names, ids):
                    for k in names:
                        result[k][i] = out[k][0]
            runs.record("concurrent", 1, rnd, n, result)


def _single_rows_at_once(pool: ThreadPoolExecutor, predict, inputs, names, ids):
    """`(i, answer)` for each example `i` in `ids`, each sent alone, all released together."""
    gate = threading.Barrier(len(ids))

    def one(i):
        try:
            gate.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return i, _call(predict, {k: v[i : i + 1] for k, v in inputs.items()}, names, 1)

    return pool.map(one, ids)


def _verdict(rows: list[InvarianceRow], allow_nonfinite: bool) -> str:
    """What the runs say: see VERDICTS and the module docstring."""
    if all(r.passed for r in rows):
        return "invariant"
    if any(r.nonfinite for r in rows) and not allow_nonfinite:
        return "nonfinite"
    if all(r.spread_ratio <= 1.0 for r in rows):
        return "reference_mismatch"
    return "batch_dependent"


# --- backends ---------------------------------------------------------------------------


def _find_version_dir(path: str) -> str:
    return layout.resolve_saved_model_dir(path)


def saved_model_predictor(
    path: str | os.PathLike, signature_name: str = "serving_default", batching=None
) -> tuple[PredictFn, str]:
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
    try:
        servable.signature(signature_name)  # fail early on an unknown signature
    except ServingError as err:
        servable.close()
        raise ValueError(f"--signature_name {signature_name!r}: {err.message}") from None

    def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return servable.run(signature_name, batch)[1]
        except ServingError as err:  # the same error a server would answer with
            from tfbn.serving.client import TFServingError

            raise TFServingError(err.code.name, err.message, target=version_dir) from None

    predict.servable = servable  # type: ignore[attr-defined]
    return predict, version_dir


def synthetic_inputs(
    signature_inputs: Mapping, num_examples: int = 64, seed: int = 0
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
            raise ValueError(
                f"cannot synthesise input {name!r} of dtype {dtype}; pass inputs "
                "explicitly (--inputs file.npz)"
            )
    return out


def _load_inputs_file(path: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"--inputs {path!r} is not a readable .npz file: {err}") from None
    if not hasattr(data, "files"):
        raise ValueError(f"--inputs {path!r} must be an .npz archive of named arrays")
    with data:
        return {
            k.removeprefix("inputs/"): data[k] for k in data.files if not k.startswith("outputs/")
        }


_MAX_BATCH = re.compile(r"larger than maximum input batch size (\d+)")


def _server_max_batch(err) -> int | None:
    """The max_batch_size in TF Serving's refusal of a too-large batch, if that is what it is."""
    match = _MAX_BATCH.search(getattr(err, "message", "") or str(err))
    return int(match.group(1)) if match else None


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
    atol: float = 0.0,
    rtol: float | None = None,
    concurrent: bool = False,
    concurrent_rounds: int = 1,
    max_workers: int = 32,
    batching=None,
    timeout: float = 10.0,
    seed: int = 0,
    allow_nonfinite: bool = False,
    max_batch_size: int | None = None,
    progress: bool | None = False,
) -> InvarianceReport:
    """The check behind `tfbn check`: pick the backend, the examples and the reference.

    Backend: `rest` URL or `grpc` target (with `model_name`, optional `version`/`label`),
    else the SavedModel at `model_path` in process (optionally behind the batching
    emulation, `batching=BatchingParameters`). Examples and reference: the golden file
    (`golden`, else the one inside `model_path`'s version directory), else
    `inputs_file` (.npz of named arrays) with the full-batch reference, else
    `num_examples` synthetic examples built from the signature.

    Tolerance: `rtol` if given, else the one the golden file records (the export
    gate's), else the default of float16/bfloat16 outputs, else 1e-4.
    Requests never exceed the server's batching limit: `max_batch_size`, else the
    batching parameters' (in process), else the limit a server states when it refuses
    a batch ("Task size N is larger than maximum input batch size M").

    Raises:
      ValueError, FileNotFoundError: the check was asked for wrongly (`tfbn check`: 2).
      TFServingError, CheckError: the server failed or answered wrongly (1).
    """
    if sum(x is not None for x in (model_path, rest, grpc)) != 1:
        raise ValueError("pass exactly one of a SavedModel path, --rest URL or --grpc target")
    if not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise ValueError(f"--num_examples must be a positive integer; Received: {num_examples!r}")
    gold = None if golden is None else _golden_file(golden)
    if model_path is not None:
        predict, spec, version_dir = _local_backend(
            model_path, version, label, signature_name, batching
        )
        if gold is None:
            gold = read_golden(version_dir)
        max_batch_size = _batching_limit(batching, max_batch_size)
    else:
        predict, spec = _server_backend(
            rest, grpc, model_name, version, label, signature_name, batching, timeout
        )
    if gold is not None:
        inputs, reference, name = _golden_examples(gold, spec), gold.outputs, "golden"
        rtol, compute_dtype = _golden_tolerance(gold, rtol)
    else:
        reference, name, compute_dtype = None, None, None
        if inputs_file:
            inputs = _load_inputs_file(inputs_file)
        else:
            inputs = synthetic_inputs(spec, num_examples, seed)

    def check(limit):
        return check_batch_invariance(
            predict,
            inputs,
            reference,
            batch_sizes,
            orders,
            atol,
            rtol,
            concurrent,
            concurrent_rounds,
            max_workers,
            seed,
            name,
            compute_dtype=compute_dtype,
            allow_nonfinite=allow_nonfinite,
            max_batch_size=limit,
            progress=progress,
        )

    try:
        report = _within_the_servers_limit(check, max_batch_size)
    finally:
        servable = getattr(predict, "servable", None)
        if servable is not None and batching is not None:
            servable.close()
    if compute_dtype is not None:
        report.tolerance_source = f"golden file: the export gate's, {compute_dtype}"
    return report


def _golden_file(golden: str) -> Golden:
    """The golden file `--golden` names (FileNotFoundError if there is none)."""
    gold = read_golden(golden)
    if gold is None:
        raise FileNotFoundError(
            f"--golden {golden!r}: no golden file there (expected an .npz "
            f"or a version directory with {GOLDEN_RELPATH})"
        )
    return gold


def _local_backend(model_path: str, version, label, signature_name: str, batching):
    """`(predict, input spec, version directory)` of the SavedModel at `model_path`, run in
    process; the spec is `{name: (numpy dtype, shape or None)}` as `synthetic_inputs` takes it."""
    if version is not None or label is not None:
        raise ValueError(
            "--model_version / --model_version_label select versions on a server; "
            "for a local SavedModel pass its version directory"
        )
    predict, version_dir = saved_model_predictor(model_path, signature_name, batching=batching)
    sig = predict.servable.signature_defs[signature_name]  # type: ignore[attr-defined]
    from tfbn.serving import _tensor

    spec = {
        k: (
            _tensor.numpy_dtype(v.dtype),
            None if v.tensor_shape.unknown_rank else [d.size for d in v.tensor_shape.dim],
        )
        for k, v in sig.inputs.items()
    }
    return predict, spec, version_dir


def _batching_limit(batching, max_batch_size: int | None) -> int | None:
    """`max_batch_size`, else the in-process batching's limit when it does not split batches."""
    if (
        batching is not None
        and max_batch_size is None
        and not getattr(batching, "enable_large_batch_splitting", False)
    ):
        return int(batching.max_batch_size)
    return max_batch_size


def _server_backend(rest, grpc, model_name, version, label, signature_name, batching, timeout):
    """`(predict, input spec)` of the model a TF Serving serves over REST or gRPC; the spec
    (as `_local_backend`'s) comes from the server's metadata."""
    if not model_name:
        raise ValueError("--model_name is required with --rest / --grpc")
    if batching is not None:
        raise ValueError("batching is the server's business; configure it on the server")
    from tfbn.serving.client import GrpcClient, RestClient

    client_cls, address = (RestClient, rest) if rest is not None else (GrpcClient, grpc)
    client = client_cls(
        address,
        model_name,
        version=version,
        label=label,
        signature_name=signature_name,
        timeout=timeout,
    )
    metadata = client.metadata()
    if signature_name not in metadata.signatures:
        raise ValueError(
            f"--signature_name {signature_name!r}: the served model has no such "
            f"signature; it has {sorted(metadata.signatures)}"
        )
    sig_info = metadata.signature(signature_name)
    spec = {
        k: (v.numpy_dtype, None if v.shape is None else list(v.shape))
        for k, v in sig_info.inputs.items()
    }

    def predict(batch):
        return client.predict(batch)

    return predict, spec


def _golden_examples(gold: Golden, spec: Mapping) -> dict[str, np.ndarray]:
    """The golden file's inputs the signature takes (ValueError if one is missing)."""
    missing = sorted(set(spec) - set(gold.inputs))
    if missing:
        raise ValueError(
            f"the golden file has no inputs for {missing}; it has {sorted(gold.inputs)}"
        )
    return {k: gold.inputs[k] for k in spec}


def _golden_tolerance(gold: Golden, rtol: float | None) -> tuple[float | None, str | None]:
    """`(rtol, compute_dtype)`: the export gate's, as the golden file records them, unless
    `rtol` is given (then `(rtol, None)`)."""
    if rtol is None and "rtol" in gold.meta:
        return float(gold.meta["rtol"]), gold.meta.get("compute_dtype")
    return rtol, None


def _within_the_servers_limit(check: Callable[[int | None], InvarianceReport], max_batch_size):
    """`check(max_batch_size)`; if the server refuses a batch as larger than its limit, once
    more within that limit. A refusal that remains says which options avoid it."""
    from tfbn.serving.client import TFServingError

    try:
        try:
            return check(max_batch_size)
        except TFServingError as err:
            limit = _server_max_batch(err)
            if limit is None or (max_batch_size is not None and limit >= max_batch_size):
                raise
            return check(limit)
    except TFServingError as err:
        limit = _server_max_batch(err)
        if limit is not None:
            err.message += (
                f" (the server batches at most {limit} rows: pass --max_batch_size "
                f"{limit} or --num_examples {limit})"
            )
            err.args = (f"{err.args[0]} (pass --max_batch_size {limit} or --num_examples {limit})",)
        raise
