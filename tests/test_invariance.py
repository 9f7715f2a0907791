"""The batch-size invariance check: pure (fake predict callables), on real Keras BN exports
in process, behind the dev server's batching over REST and gRPC, and `tfbn check`."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from _serving_helpers import INPUT, OUTPUT, examples, export_bn_models
from tfbn.serving import _config
from tfbn.serving.invariance import (
    CheckError,
    check_batch_invariance,
    load_golden,
    read_golden,
    run_check,
    saved_model_predictor,
    synthetic_inputs,
)

from tfbn import cli

# --- pure: any predict callable ----------------------------------------------------------


def rowwise(batch):
    return {"y": batch["x"] * 2.0 + 1.0, "z": batch["x"].sum(axis=1)}


def batch_stats(batch):  # what BN in training mode does: normalise with the batch's moments
    x = batch["x"]
    return {"y": (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-3)}


X = {"x": np.random.default_rng(1).standard_normal((20, 3)).astype(np.float32)}


def test_rowwise_model_passes_every_batch_size_and_order():
    report = check_batch_invariance(rowwise, X)
    assert report.passed and report.reference == "full-batch" and report.outputs == ["y", "z"]
    assert [(r.batch_size, r.order) for r in report.rows] == [
        (b, o) for b in (1, 2, 3, 7, 20) for o in range(3)
    ]
    assert [r.requests for r in report.rows if r.order == 0] == [20, 10, 7, 3, 1]
    assert all(r.max_abs == 0 and r.passed for r in report.rows)
    assert "PASSED: 20 examples" in report.table()


def test_batch_statistics_fail_and_the_report_says_where():
    report = check_batch_invariance(batch_stats, X, orders=2)
    assert not report.passed
    by_size = {r.batch_size: r for r in report.rows if r.order == 0}
    assert not by_size[1].passed and not by_size[7].passed
    assert by_size[20].passed  # the full batch is the reference itself
    worst = max(report.rows, key=lambda r: r.tolerance_ratio)
    assert 0 <= worst.worst_index < 20 and worst.worst_output == "y" and worst.max_abs > 0.1
    table = report.table()
    assert "| sequential | 7 | 0 | 3 |" in table and "FAIL" in table and "FAILED" in table
    json.dumps(report.to_dict())  # serialisable for CI artefacts


def test_tolerance_and_reference_semantics():
    def noisy(batch):  # deviation 1e-6 * |x| grows with nothing but the value: passes rtol
        return {"y": batch["x"] * (1 + 1e-6 * len(batch["x"]))}

    ref = {"y": X["x"].copy()}
    assert check_batch_invariance(noisy, X, reference=ref, atol=0, rtol=1e-4).passed
    assert not check_batch_invariance(noisy, X, reference=ref, atol=0, rtol=1e-7).passed
    report = check_batch_invariance(
        rowwise, X, reference={"y": X["x"] * 2 + 1}, batch_sizes=(4, 50)
    )
    assert report.reference == "given" and [r.batch_size for r in report.rows[::3]] == [4, 20]


def test_order_matters_is_caught():
    calls = []

    def position_dependent(batch):
        calls.append(len(batch["x"]))
        return {"y": batch["x"] + np.arange(len(batch["x"]), dtype=np.float32)[:, None]}

    report = check_batch_invariance(position_dependent, X, batch_sizes=(None,), orders=3)
    assert [r.passed for r in report.rows] == [True, False, False]


def test_concurrent_single_row_mode_catches_cross_request_mixing():
    """A fake server that batches whatever arrives together: single-row clients get
    answers that depend on each other, only in the concurrent mode."""
    lock, pending = threading.Lock(), []

    def mixing_server(batch):
        with lock:
            pending.append(batch["x"])
            mixed = np.concatenate(pending[-4:])
        return {"y": batch["x"] - mixed.mean(axis=0)}

    alone = {"y": np.zeros_like(X["x"])}  # each row alone: x - x = 0
    report = check_batch_invariance(
        mixing_server,
        X,
        reference=alone,
        batch_sizes=(),
        concurrent=True,
        reference_name="single-row",
    )
    assert [r.mode for r in report.rows] == ["concurrent"] and not report.passed
    assert check_batch_invariance(
        rowwise, X, batch_sizes=(), concurrent=True, concurrent_rounds=2
    ).passed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"orders": 0}, "orders"),
        ({"atol": -1}, "atol"),
        ({"batch_sizes": (0,)}, "batch sizes"),
        ({"batch_sizes": ()}, "nothing to check"),
        ({"reference": {"y": np.zeros((3, 3))}}, "rows"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_batch_invariance(rowwise, X, **kwargs)


def test_bad_predict_outputs_are_reported():
    """Wrong answers are the server's fault (CheckError, exit 1), not a usage error."""
    with pytest.raises(CheckError, match="expected 2 rows"):
        check_batch_invariance(lambda b: {"y": np.zeros(3)}, {"x": np.zeros((2, 1))})
    with pytest.raises(CheckError, match="did not return outputs"):
        check_batch_invariance(lambda b: {"q": b["x"]}, X, reference={"y": X["x"]})
    with pytest.raises(ValueError, match="same number of rows"):
        check_batch_invariance(rowwise, {"x": np.zeros((2, 1)), "w": np.zeros((3, 1))})


def limited(limit, answer=rowwise):
    """A predict callable that refuses batches larger than `limit`, as a batching server does."""
    sizes = []

    def predict(batch):
        sizes.append(len(batch["x"]))
        if len(batch["x"]) > limit:
            raise AssertionError(f"a request of {len(batch['x'])} rows (> {limit})")
        return answer(batch)

    predict.sizes = sizes
    return predict


def test_the_full_batch_reference_is_built_within_max_batch_size():
    predict = limited(3)
    report = check_batch_invariance(predict, X, max_batch_size=3, orders=1)
    assert report.passed and report.reference == "full-batch"
    assert [r.batch_size for r in report.rows] == [1, 2, 3]
    assert report.notes == [
        "note: requests limited to the server's max_batch_size 3 (of 20 examples)"
    ]
    # the reference: one probe for the output names, then the 20 rows in requests of 3
    assert predict.sizes[:8] == [3, 3, 3, 3, 3, 3, 3, 2]
    # batch statistics: the runs of 3 in the natural order are the reference itself
    report = check_batch_invariance(limited(5, batch_stats), X, max_batch_size=5, orders=1)
    assert [(r.batch_size, r.passed) for r in report.rows] == [
        (1, False),
        (2, False),
        (3, False),
        (5, True),
    ]
    assert report.verdict == "batch_dependent"


@pytest.mark.parametrize("max_batch_size", [None, 3])
def test_a_predict_that_returns_no_dict_is_the_servers_fault(max_batch_size):
    with pytest.raises(
        CheckError, match="^predict must return a dict of named arrays; Received list$"
    ):
        check_batch_invariance(lambda b: [b["x"]], X, max_batch_size=max_batch_size)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"max_batch_size": 0},
            r"`max_batch_size` must be None or a positive integer\. "
            "Received: max_batch_size=0",
        ),
        (
            {"max_batch_size": 2.5},
            r"`max_batch_size` must be None or a positive integer\. "
            "Received: max_batch_size=2.5",
        ),
        (
            {"max_batch_size": True},
            r"`max_batch_size` must be None or a positive integer\. "
            "Received: max_batch_size=True",
        ),
        ({"rtol": -1.0}, "atol and rtol must be >= 0; Received: atol=0.0, rtol=-1.0"),
        (
            {"concurrent_rounds": 0},
            r"`concurrent_rounds` must be a positive integer\. Received: concurrent_rounds=0",
        ),
        ({"max_workers": 0}, r"`max_workers` must be a positive integer\. Received: max_workers=0"),
        ({"orders": True}, r"`orders` must be a positive integer\. Received: orders=True"),
        (
            {"batch_sizes": (2, None, 2.0)},
            r"batch sizes must be positive integers or None \(all\); Received: 2.0",
        ),
    ],
)
def test_bad_limits_are_named_with_the_received_value(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}$"):
        check_batch_invariance(rowwise, X, **kwargs)


def test_the_concurrent_rows_are_recorded_per_round():
    report = check_batch_invariance(
        rowwise, X, batch_sizes=(4,), orders=2, concurrent=True, concurrent_rounds=2, max_workers=3
    )
    assert [(r.mode, r.batch_size, r.order, r.requests) for r in report.rows] == [
        ("sequential", 4, 0, 5),
        ("sequential", 4, 1, 5),
        ("concurrent", 1, 0, 20),
        ("concurrent", 1, 1, 20),
    ]
    assert report.passed and all(r.spread_ratio == 0 for r in report.rows)


# --- golden files ---------------------------------------------------------------------


def test_load_golden(tmp_path):
    assert load_golden(tmp_path) is None
    os.makedirs(tmp_path / "assets.extra")
    path = tmp_path / "assets.extra" / "tfbn_golden.npz"
    np.savez(path, **{"inputs/x": X["x"], "outputs/y": X["x"] * 2 + 1, "outputs/z": X["x"].sum(1)})
    inputs, outputs = load_golden(tmp_path)
    assert set(inputs) == {"x"} and set(outputs) == {"y", "z"}
    np.testing.assert_array_equal(inputs["x"], X["x"])
    assert load_golden(path) is not None  # the .npz path itself works too
    np.savez(path, **{"inputs/x": X["x"], "extra": X["x"]})
    with pytest.raises(ValueError, match="unexpected array 'extra'"):
        load_golden(tmp_path)
    np.savez(path, **{"inputs/x": X["x"], "outputs/y": X["x"][:3]})
    with pytest.raises(ValueError, match="different numbers of rows"):
        load_golden(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        load_golden(tmp_path)


def test_synthetic_inputs_follow_the_signature():
    out = synthetic_inputs(
        {"a": (np.float32, [-1, 3]), "b": (np.int64, [None, 2, -1]), "c": (np.bool_, [-1])},
        num_examples=5,
    )
    assert out["a"].shape == (5, 3) and out["a"].dtype == np.float32
    assert out["b"].shape == (5, 2, 1) and out["b"].dtype == np.int64
    assert out["c"].shape == (5,) and out["c"].dtype == np.bool_
    with pytest.raises(ValueError, match="cannot synthesise"):
        synthetic_inputs({"s": (object, [-1])})


# --- real Keras exports: training-mode BN must FAIL, frozen must PASS -----------------------


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bn"))
    paths = export_bn_models(root)
    # golden files as the export module writes them: inference-mode outputs of the model
    x = examples(24, seed=3)
    golden = {
        f"inputs/{INPUT}": x[INPUT],
        f"outputs/{OUTPUT}": np.asarray(paths["model"](x[INPUT], training=False)),
    }
    for kind in ("frozen", "training"):
        os.makedirs(os.path.join(paths[kind], "1", "assets.extra"))
        np.savez(os.path.join(paths[kind], "1", "assets.extra", "tfbn_golden.npz"), **golden)
    return paths


def test_in_process_frozen_passes_training_fails(bn):
    frozen, _ = saved_model_predictor(bn["frozen"])
    training, version_dir = saved_model_predictor(bn["training"])
    assert version_dir.endswith(os.path.join("training", "1"))
    x = examples(16)
    assert check_batch_invariance(frozen, x).passed
    report = check_batch_invariance(training, x)
    assert not report.passed
    assert {r.batch_size for r in report.failures()} == {1, 2, 3, 7}


def test_run_check_uses_the_golden_file(bn):
    report = run_check(bn["frozen"], orders=1)
    assert report.passed and report.reference == "golden" and report.num_examples == 24
    report = run_check(bn["training"], orders=1)
    # even the full batch fails: training-mode BN does not reproduce the inference-mode golden
    assert not report.passed and report.reference == "golden"
    assert all(not r.passed for r in report.rows)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({}, ValueError, "^pass exactly one of a SavedModel path, --rest URL or --grpc target$"),
        ({"model_path": "m", "rest": "http://h"}, ValueError, "exactly one"),
        (
            {"model_path": "m", "num_examples": 0},
            ValueError,
            "^--num_examples must be a positive integer; Received: 0$",
        ),
        (
            {"model_path": "m", "version": 2},
            ValueError,
            "^--model_version / --model_version_label select versions on a server; for a local SavedModel pass its version directory$",
        ),
        ({"model_path": "m", "label": "stable"}, ValueError, "select versions on a server"),
        ({"rest": "http://h"}, ValueError, "^--model_name is required with --rest / --grpc$"),
        (
            {"grpc": "h:1", "model_name": "m", "batching": _config.BatchingParameters()},
            ValueError,
            "^batching is the server's business; configure it on the server$",
        ),
    ],
)
def test_run_check_usage_errors_before_any_request(kwargs, error, match):
    with pytest.raises(error, match=match):
        run_check(**kwargs)


def test_run_check_a_missing_golden_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="^--golden .*: no golden file there"):
        run_check(str(tmp_path), golden=str(tmp_path))


def test_run_check_inputs_file_without_a_golden_file(bn, tmp_path):
    import shutil

    model = tmp_path / "frozen"
    shutil.copytree(bn["frozen"], model)
    shutil.rmtree(model / "1" / "assets.extra")
    np.savez(
        tmp_path / "x.npz",
        **{f"inputs/{INPUT}": examples(6)[INPUT], "outputs/ignored": np.zeros(6)},
    )
    report = run_check(str(model), inputs_file=str(tmp_path / "x.npz"), orders=1)
    assert report.passed and report.reference == "full-batch" and report.num_examples == 6
    assert report.tolerance_source == "float32 default"
    report = run_check(str(model), num_examples=5, orders=1)  # synthetic examples
    assert report.passed and report.num_examples == 5


class _RefusingClient:
    """A REST client whose server refuses batches over `accepts` rows, saying its limit is
    `says` (TF Serving's batching message)."""

    accepts = says = 4

    def __init__(self, address, model_name, **kwargs):
        self.kwargs = kwargs

    def metadata(self):
        from tfbn.serving.client import ModelMetadata, SignatureInfo, TensorInfo

        x = TensorInfo("x", "DT_FLOAT", (-1, 3))
        sig = SignatureInfo("serving_default", "tensorflow/serving/predict", {"x": x}, {})
        return ModelMetadata("m", 1, {"serving_default": sig})

    def predict(self, batch):
        from tfbn.serving.client import TFServingError

        n = len(batch["x"])
        if n > self.accepts:
            raise TFServingError(
                "INVALID_ARGUMENT",
                f"Task size {n} is larger than maximum input batch size {self.says}",
                http_status=400,
                target="http://fake",
            )
        return rowwise(batch)


def test_run_check_retries_within_the_limit_a_server_states(monkeypatch):
    from tfbn.serving import client

    monkeypatch.setattr(client, "RestClient", _RefusingClient)
    report = run_check(rest="http://fake", model_name="m", num_examples=10, orders=1)
    assert report.passed and [r.batch_size for r in report.rows] == [1, 2, 3, 4]
    assert any("max_batch_size 4" in note for note in report.notes)
    with pytest.raises(
        ValueError,
        match="^--signature_name 'other': the served model has no such signature; it has \\['serving_default'\\]$",
    ):
        run_check(rest="http://fake", model_name="m", signature_name="other")


def test_run_check_says_how_to_stay_within_the_servers_limit(monkeypatch):
    from tfbn.serving import client

    class Stricter(_RefusingClient):
        accepts = 2  # refuses even the limit it states

    monkeypatch.setattr(client, "RestClient", Stricter)
    with pytest.raises(client.TFServingError) as info:
        run_check(rest="http://fake", model_name="m", num_examples=10, orders=1)
    assert info.value.message == (
        "Task size 4 is larger than maximum input batch size 4 (the server batches at most 4 "
        "rows: pass --max_batch_size 4 or --num_examples 4)"
    )
    assert str(info.value) == (
        "INVALID_ARGUMENT (HTTP 400) from http://fake: Task size 4 is larger than maximum input "
        "batch size 4 (pass --max_batch_size 4 or --num_examples 4)"
    )
    # a stated limit no lower than the one asked for: no retry, the same advice
    with pytest.raises(client.TFServingError) as info:
        run_check(rest="http://fake", model_name="m", num_examples=10, max_batch_size=3)
    assert info.value.message.startswith("Task size 3 is larger than maximum input batch size 4 (")


def test_single_row_requests_fail_only_through_server_side_batching(bn):
    """Every request is one row; only the batching emulation mixes them."""
    params = _config.BatchingParameters(
        max_batch_size=8,
        batch_timeout_micros=100_000,
        allowed_batch_sizes=(4, 8),
        num_batch_threads=2,
    )
    x = examples(16)
    results = {}
    for kind in ("frozen", "training"):
        plain, _ = saved_model_predictor(bn[kind])
        alone = {
            OUTPUT: np.concatenate([plain({INPUT: x[INPUT][i : i + 1]})[OUTPUT] for i in range(16)])
        }
        batched, _ = saved_model_predictor(bn[kind], batching=params)
        try:
            for name, fn in (("no batching", plain), ("batching", batched)):
                results[kind, name] = check_batch_invariance(
                    fn,
                    x,
                    reference=alone,
                    batch_sizes=(),
                    concurrent=True,
                    reference_name="single-row",
                ).passed
        finally:
            batched.servable.close()
    assert results == {
        ("frozen", "no batching"): True,
        ("frozen", "batching"): True,
        ("training", "no batching"): True,
        ("training", "batching"): False,
    }


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_over_the_wire_against_the_dev_server(bn, transport):
    from tfbn.serving.server import DevServer

    params = _config.BatchingParameters(
        max_batch_size=16, batch_timeout_micros=50_000, num_batch_threads=2
    )
    models = [
        _config.ModelConfig("frozen", bn["frozen"]),
        _config.ModelConfig("training", bn["training"]),
    ]
    with DevServer(models, port=0, rest_api_port=0, batching=params) as srv:
        address = dict(rest=srv.rest_url, grpc=srv.grpc_target)[transport]
        ok = run_check(
            **{transport: address},
            model_name="frozen",
            golden=os.path.join(bn["frozen"], "1"),
            orders=1,
            batch_sizes=(1, 8),
            concurrent=True,
        )
        assert ok.passed, ok.table()
        bad = run_check(
            **{transport: address},
            model_name="training",
            num_examples=16,
            orders=1,
            batch_sizes=(1, 3),
            concurrent=True,
        )
        assert not bad.passed and {r.mode for r in bad.failures()} >= {"sequential", "concurrent"}


# --- tfbn check ---------------------------------------------------------------------------


def test_cli_check_exit_codes_and_table(bn, capsys, tmp_path):
    out = tmp_path / "report.json"
    assert (
        cli.main(
            ["check", bn["frozen"], "--orders", "1", "--batch_sizes", "1,7,all", "--json", str(out)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| sequential | 7 | 0 |" in table and "PASSED" in table
    assert json.loads(out.read_text())["passed"] is True
    assert (
        cli.main(["check", bn["training"], "--orders", "1", "--concurrent", "--enable_batching"])
        == 1
    )
    assert "FAILED" in capsys.readouterr().out
    assert cli.main(["check", str(tmp_path / "nowhere")]) == 2
    assert cli.main(["check", bn["frozen"], "--rest", "http://127.0.0.1:9"]) == 2  # two backends
    with pytest.raises(SystemExit):
        cli.main(["check", bn["frozen"], "--batch_sizes", "0"])


def test_cli_check_reports_an_unreachable_server(capsys):
    assert cli.main(["check", "--grpc", "127.0.0.1:9", "--model_name", "m", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_export_module_golden_file_end_to_end(bn, tmp_path, capsys):
    """tfbn.export writes the version and its golden file; the dev server serves it (warm-up
    file and all); `tfbn check` over gRPC against the golden outputs passes."""
    export = pytest.importorskip("tfbn.export")
    from tfbn.serving.server import DevServer

    base = str(tmp_path / "exported")
    result = export.export_saved_model(bn["model"], base, version=7)
    inputs, outputs = load_golden(result.path)
    assert set(inputs) == {INPUT} and len(outputs) == 1
    with DevServer([_config.ModelConfig("bn", base)], port=0, rest_api_port=None) as srv:
        assert (
            cli.main(
                [
                    "check",
                    "--grpc",
                    srv.grpc_target,
                    "--model_name",
                    "bn",
                    "--golden",
                    result.path,
                    "--orders",
                    "1",
                    "--concurrent",
                ]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "against the golden reference" in out and "PASSED" in out


# --- a check that cannot be fooled (issue 13) and speaks every dtype (issue 19) --------------


def test_nan_answers_fail_even_against_a_nan_golden_file():
    """Issue 13.1: NaN == NaN made an all-NaN model PASS."""
    nan = {"y": np.full((20, 3), np.nan, np.float32)}
    report = check_batch_invariance(
        lambda b: {"y": np.full_like(b["x"], np.nan)}, X, reference=nan, orders=1
    )
    assert not report.passed and report.verdict == "nonfinite" and "NaN/Inf" in report.table()
    assert check_batch_invariance(
        lambda b: {"y": np.full_like(b["x"], np.nan)},
        X,
        reference=nan,
        orders=1,
        allow_nonfinite=True,
    ).passed


def test_same_deviation_at_every_batch_size_is_not_blamed_on_the_batch():
    """Issue 19.4: a server off the reference by the same amount everywhere is a reference
    mismatch; a server whose answers move with the batch depends on the batch."""
    shifted = check_batch_invariance(
        lambda b: {"y": b["x"] + 0.5}, X, reference={"y": X["x"]}, orders=2
    )
    assert not shifted.passed and shifted.verdict == "reference_mismatch"
    assert "not from batch to batch" in shifted.table()
    assert all(r.spread_ratio <= 1 for r in shifted.rows)
    dependent = check_batch_invariance(batch_stats, X, orders=1)
    assert dependent.verdict == "batch_dependent" and "depends on the batch" in dependent.table()


def test_one_metric_with_the_gate_relative_to_the_output_scale():
    """Issue 19.4: the check's per-element atol + rtol*|ref| was not the gate's
    max|d|/max|ref|: a deviation of 1e-3 * max|ref| on a near-zero element failed rtol 1e-2."""
    ref = {"y": np.stack([np.full(3, 100.0), np.full(3, 1e-3)] * 10).astype(np.float32)}

    def off(batch):
        return {"y": ref["y"][: len(batch["x"])] + np.float32(0.1)}  # 1e-3 of max|ref|

    report = check_batch_invariance(off, X, reference=ref, batch_sizes=(None,), orders=1, rtol=1e-2)
    assert report.passed and report.rows[0].max_rel == pytest.approx(1e-3, rel=1e-3)
    from tfbn.tolerance import Closeness

    assert Closeness(1e-2).compare(off(X)["y"], ref["y"]).passed  # the gate's verdict, too


def test_default_tolerance_follows_the_dtype():
    import ml_dtypes

    ref16 = {"y": (X["x"] * 2 + 1).astype(np.float16)}
    half = check_batch_invariance(
        lambda b: {"y": (b["x"] * 2 + 1).astype(np.float16)}, X, reference=ref16, orders=1
    )
    assert half.passed and half.rtol == pytest.approx(2 * 2**-10)
    bf = {"y": (X["x"] * 2 + 1).astype(ml_dtypes.bfloat16)}
    report = check_batch_invariance(
        lambda b: {"y": (b["x"] * 2 + 1).astype(ml_dtypes.bfloat16)}, X, reference=bf, orders=1
    )
    assert report.passed and report.rtol == pytest.approx(2 * 2**-7)
    assert check_batch_invariance(rowwise, X, compute_dtype="float16").rtol == half.rtol


def test_bfloat16_golden_file_round_trip(tmp_path):
    """Issue 19.5: bfloat16 was stored as void |V2 and the check died on it."""
    import ml_dtypes

    from tfbn.export import _golden_arrays

    out = {"y": (X["x"] * 3).astype(ml_dtypes.bfloat16)}
    arrays, dtypes = _golden_arrays(X, out)
    assert arrays["outputs/y"].dtype == np.float32 and dtypes == {"outputs/y": "bfloat16"}
    path = tmp_path / "g.npz"
    np.savez(path, meta=np.array(json.dumps({"dtypes": dtypes, "rtol": 0.01})), **arrays)
    golden = read_golden(path)
    assert golden.outputs["y"].dtype == ml_dtypes.bfloat16 and golden.meta["rtol"] == 0.01
    np.testing.assert_array_equal(
        golden.outputs["y"].astype(np.float32), out["y"].astype(np.float32)
    )
    np.savez(path, **{"inputs/x": X["x"], "outputs/y": out["y"]})  # what np.savez does to bf16
    with pytest.raises(ValueError, match=r"raw bytes"):
        read_golden(path)


def test_cli_check_a_wrong_golden_path_is_a_usage_error(bn, capsys, tmp_path):
    """Issue 13.3: --golden nope.npz fell back to the full-batch reference and exited 0."""
    out = tmp_path / "r.json"
    assert (
        cli.main(
            ["check", bn["frozen"], "--golden", str(tmp_path / "nope.npz"), "--json", str(out)]
        )
        == 2
    )
    assert "nope.npz" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["exit_code"] == 2 and "nope.npz" in doc["error"]


def test_cli_check_json_is_written_when_the_server_fails(capsys, tmp_path):
    """Issue 13.4: --json wrote nothing when the server failed."""
    out = tmp_path / "r.json"
    assert (
        cli.main(
            [
                "check",
                "--grpc",
                "127.0.0.1:9",
                "--model_name",
                "m",
                "--timeout",
                "1",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "server_error" and doc["exit_code"] == 1 and doc["error"]
    assert doc["compared"]["backend"] == "grpc" and doc["compared"]["target"] == "127.0.0.1:9"


def test_cli_check_exit_codes_for_a_misbehaving_server_and_a_wrong_signature(
    bn, capsys, tmp_path, monkeypatch
):
    """Issue 13.5: wrong shapes from the server gave 2 (bad usage) instead of 1; an unknown
    --signature_name ended in a KeyError traceback."""
    from tfbn.serving import client as client_module
    from tfbn.serving.server import DevServer

    with DevServer([_config.ModelConfig("frozen", bn["frozen"])], port=0, rest_api_port=0) as srv:
        assert (
            cli.main(
                [
                    "check",
                    "--rest",
                    srv.rest_url,
                    "--model_name",
                    "frozen",
                    "--signature_name",
                    "nope",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert "'nope'" in err and "serving_default" in err and "Traceback" not in err
        assert cli.main(["check", bn["frozen"], "--signature_name", "nope"]) == 2
        capsys.readouterr()
        real = client_module.RestClient.predict
        monkeypatch.setattr(
            client_module.RestClient,
            "predict",
            lambda self, x, **kw: {k: v[:1] for k, v in real(self, x, **kw).items()},
        )
        out = tmp_path / "r.json"
        assert (
            cli.main(
                [
                    "check",
                    "--rest",
                    srv.rest_url,
                    "--model_name",
                    "frozen",
                    "--golden",
                    os.path.join(bn["frozen"], "1"),
                    "--json",
                    str(out),
                ]
            )
            == 1
        )
        assert "expected" in capsys.readouterr().err
        assert json.loads(out.read_text())["exit_code"] == 1


def test_check_sizes_requests_to_the_servers_max_batch_size(bn, capsys, tmp_path):
    """Issue 13.6: max_batch_size below the number of examples: a traceback in process, an
    unhelpful failure over the wire."""
    from tfbn.serving.server import DevServer

    config = tmp_path / "batching.config"
    config.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n")
    assert (
        cli.main(
            [
                "check",
                bn["frozen"],
                "--orders",
                "1",
                "--enable_batching",
                "--batching_parameters_file",
                str(config),
            ]
        )
        == 0
    )  # 24 golden examples
    out = capsys.readouterr().out
    assert "max_batch_size 8" in out and "| sequential | 8 | 0 | 3 |" in out
    params = _config.BatchingParameters(max_batch_size=8, batch_timeout_micros=1000)
    with DevServer(
        [_config.ModelConfig("frozen", bn["frozen"])], port=0, rest_api_port=0, batching=params
    ) as srv:
        for transport in ("rest", "grpc"):
            address = dict(rest=srv.rest_url, grpc=srv.grpc_target)[transport]
            report = run_check(
                **{transport: address},
                model_name="frozen",
                orders=1,
                golden=os.path.join(bn["frozen"], "1"),
            )
            assert report.passed and any("max_batch_size 8" in n for n in report.notes)


@pytest.fixture
def policy(request):
    import keras

    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(old)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_fit_export_check_in_process_rest_and_grpc(policy, tmp_path):
    """Issue 19.4/19.9: every mixed-precision export that passed the gate failed `tfbn check`
    ("15 of 15 runs depend on the batch")."""
    import keras
    from tfbn.serving.server import DevServer

    from tfbn import export

    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(
        keras.layers.Dense(4)(x)
    )
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(rng.normal(size=(64, 6, 6, 3)), rng.integers(0, 4, 64), batch_size=16, verbose=0)
    base = str(tmp_path / "m")
    for fold, version in ((True, 1), (False, 2)):
        export.export_saved_model(
            model, base, version=version, fold=fold, sample_inputs=rng.normal(size=(16, 6, 6, 3))
        )
        report = run_check(base, orders=1)
        assert report.passed, report.table()
        assert report.compute_dtype == policy.removeprefix("mixed_")
        assert report.tolerance_source.startswith("golden file")
    with DevServer([_config.ModelConfig("m", base)], port=0, rest_api_port=0) as srv:
        for transport in ("rest", "grpc"):
            address = dict(rest=srv.rest_url, grpc=srv.grpc_target)[transport]
            report = run_check(
                **{transport: address},
                model_name="m",
                orders=1,
                golden=os.path.join(base, "2"),
                concurrent=True,
            )
            assert report.passed, report.table()


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_bfloat16_outputs_export_and_check(policy, tmp_path, capsys):
    """Issue 19.5: a bfloat16-output export's golden file held void |V2 and `tfbn check`
    exited 2 with 'No cast function available.'"""
    import keras
    import ml_dtypes

    from tfbn import export

    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)  # no float32 head: bfloat16 outputs
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-1, 1, 4))
    bn.moving_variance.assign(np.linspace(0.5, 2, 4))
    result = export.export_saved_model(model, tmp_path / "m")
    golden = read_golden(result.path)
    assert golden.outputs["logits"].dtype == ml_dtypes.bfloat16
    assert golden.meta["dtypes"] == {"outputs/logits": "bfloat16"}
    assert cli.main(["check", str(tmp_path / "m"), "--orders", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_progress_on_stderr_only_when_asked_or_on_a_terminal(capsys, monkeypatch, bn):
    """Issue 13.11: requests sent / planned on stderr; quiet under --quiet and off a terminal."""
    from tfbn import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    check_batch_invariance(rowwise, X, orders=1, progress=True)  # 20+10+7+3+1 requests + 1
    err = capsys.readouterr().err
    assert "tfbn check" in err and "/42 " in err  # planned requests
    check_batch_invariance(rowwise, X, orders=1)  # library default: silent
    assert capsys.readouterr().err == ""
    assert cli.main(["check", bn["frozen"], "--orders", "1"]) == 0  # stderr is not a terminal
    assert "tfbn check" not in capsys.readouterr().err
    monkeypatch.setattr(type(__import__("sys").stderr), "isatty", lambda self: True, raising=False)
    assert cli.main(["check", bn["frozen"], "--orders", "1"]) == 0
    assert "tfbn check" in capsys.readouterr().err
    assert cli.main(["check", bn["frozen"], "--orders", "1", "--quiet"]) == 0
    assert "tfbn check" not in capsys.readouterr().err


def test_demo_plots_are_readable_on_their_own(tmp_path, monkeypatch):
    """Issue 13.12: training.png had no y labels; invariance.png had 'sequ b1 o0' ticks, no x
    label, no tolerance line and one series hidden under another."""
    import importlib.util
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_plots", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    history = {
        "loss": [1.0, 0.5],
        "val_loss": [1.1, 0.6],
        "accuracy": [0.6, 0.9],
        "val_accuracy": [0.5, 0.85],
    }
    good = check_batch_invariance(rowwise, X, orders=2, concurrent=True)
    bad = check_batch_invariance(batch_stats, X, orders=2, concurrent=True)
    reports = {
        "digits rest": good,
        "digits grpc": good,
        "digits_training_mode rest": bad,
        "digits_training_mode grpc": bad,
    }
    paths = demo.plot(history, reports, tmp_path)
    assert [p.name for p in paths] == ["training.png", "invariance.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    training, invariance = figures
    for ax in training.axes:
        assert ax.get_ylabel() and ax.get_xlabel() == "epoch"
    ax = invariance.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "batch 1" in ticks and not any("sequ" in t for t in ticks)
    lines = ax.get_lines()
    tolerance = [line for line in lines if "tolerance" in str(line.get_label())]
    assert len(tolerance) == 1 and tolerance[0].get_ydata()[0] == good.rtol
    series = [line for line in lines if line not in tolerance]
    assert len(series) == 4
    # identical REST and gRPC results must not hide each other: different x positions
    xs = {tuple(line.get_xdata()) for line in series}
    assert len(xs) == 2 and len({line.get_label() for line in series}) == 4
