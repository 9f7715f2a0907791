"""Issue 10.10: one report protocol (`tfbn.report.Report`): every report prints and
serialises alike, built here from real small runs of the functions that return them."""

import dataclasses
import importlib
import inspect as pyinspect
import json
import math
import pkgutil
import warnings

import keras
import numpy as np
import pytest
from _keras_helpers import randomize_statistics

import tfbn
from tfbn import report as report_module
from tfbn.report import Report, json_safe


def _model(name: str) -> keras.Model:
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, name="dense")(inputs)  # use_bias: a lint finding
    outputs = tfbn.BatchNormalization(name="bn")(hidden)
    return randomize_statistics(keras.Model(inputs, outputs, name=name))


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Report]:
    from tfbn.serving import drift, invariance

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype("float32")
    model = _model("reports")
    exported = tfbn.export_saved_model(model, tmp_path_factory.mktemp("export"), sample_inputs=x)
    calibrated = _model("recalibrated")
    recalibration = tfbn.recalibrate(calibrated, [x[:8], x[8:]], progress=False)

    def batch_dependent(batch):  # subtracts the batch mean: BN in training mode
        return {"y": batch["x"] - batch["x"].mean(axis=0)}

    def nonfinite(batch):  # Inf for single-row batches only
        with np.errstate(divide="ignore"):
            return {"y": batch["x"] / np.float32(len(batch["x"]) - 1)}

    return {
        "ExportResult": exported,
        "GateReport": exported.gate,
        "FoldReport": exported.fold_report,
        "SavedModelReport": tfbn.lint_saved_model(exported.path),
        "ModelReport": tfbn.inspect_model(model),
        "ModelReport (never updated)": tfbn.inspect_model(
            keras.Sequential([keras.Input((2,)), tfbn.BatchNormalization()])
        ),
        "LintReport": tfbn.lint_model(model, batch_size=4),
        "RecalibrationResult": recalibration,
        "DriftReport": drift.measure_drift(drift.KerasProbe(model), {"x": x + 3.0}),
        "InvarianceReport": invariance.check_batch_invariance(
            lambda batch: {"y": 2.0 * batch["x"]}, {"x": x}, orders=1
        ),
        "InvarianceReport (batch-dependent)": invariance.check_batch_invariance(
            batch_dependent, {"x": x}, orders=1
        ),
        "InvarianceReport (Inf)": invariance.check_batch_invariance(
            nonfinite, {"x": x}, orders=1, allow_nonfinite=False
        ),
    }


CASES = [
    "ExportResult",
    "GateReport",
    "FoldReport",
    "SavedModelReport",
    "ModelReport",
    "ModelReport (never updated)",
    "LintReport",
    "RecalibrationResult",
    "DriftReport",
    "InvarianceReport",
    "InvarianceReport (batch-dependent)",
    "InvarianceReport (Inf)",
]


@pytest.mark.parametrize("case", CASES)
def test_every_report_prints_and_serialises_alike(reports, case):
    report = reports[case]
    assert isinstance(report, Report) and type(report).__name__ == case.split(" ")[0]
    assert isinstance(report.ok, bool)
    text = report.format()
    assert isinstance(text, str) and text.strip()
    assert str(report) == text
    doc = report.to_dict()
    assert isinstance(doc, dict) and doc["ok"] is report.ok
    assert json.loads(report.to_json()) == doc  # JSON types only: nothing lost on the way
    assert report.to_json() == report_module.dumps(doc)  # one encoding for every report


def test_the_cases_cover_both_verdicts(reports):
    """The cases are not all passing reports: failures serialise too."""
    verdicts = {case: reports[case].ok for case in CASES}
    assert not verdicts["LintReport"] and not verdicts["ModelReport (never updated)"]
    assert not verdicts["InvarianceReport (batch-dependent)"] and verdicts["InvarianceReport"]
    assert not verdicts["DriftReport"]  # the traffic is shifted by 3
    worst = reports["InvarianceReport (Inf)"].to_dict()["rows"][0]
    assert worst["batch_size"] == 1 and worst["max_abs"] == "inf"  # a string, valid JSON


def _package_classes():
    """Every class defined in tfbn and tfbn.serving (all modules imported)."""
    classes = []
    for package in (tfbn, importlib.import_module("tfbn.serving")):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            classes += [
                c for _, c in pyinspect.getmembers(module, pyinspect.isclass)
                if c.__module__ == module.__name__
            ]  # fmt: skip
    return classes


def test_every_report_class_implements_the_protocol_and_is_tested():
    """Any class with a report's methods (`to_json`, `table`, or `format` with `to_dict`)
    is a `Report`, and every `Report` has a case above."""
    classes = _package_classes()
    reportish = [
        c for c in classes
        if hasattr(c, "to_json") or hasattr(c, "table")
        or (hasattr(c, "format") and hasattr(c, "to_dict"))
    ]  # fmt: skip
    assert [c.__name__ for c in reportish if not issubclass(c, Report)] == []
    reports = {c.__name__ for c in classes if issubclass(c, Report) and c is not Report}
    assert reports == {case.split(" ")[0] for case in CASES}


@pytest.mark.parametrize("case", ["ModelReport", "DriftReport", "InvarianceReport"])
def test_table_is_a_deprecated_alias_of_format(reports, case):
    report = reports[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report.table() == report.format()
    assert [w.category for w in caught] == [DeprecationWarning]
    assert f"{case}.table() is deprecated; use format()" in str(caught[0].message)


def test_json_safe_gives_json_types_only():
    @dataclasses.dataclass
    class Row:
        value: float

    doc = json_safe(
        {
            1: (np.float32(0.5), np.int64(3), np.bool_(True)),
            "arrays": np.arange(3),
            "bad": [math.nan, -math.inf, np.float64(math.inf)],
            "set": {"b", "a"},
        }
    )
    assert doc == {
        "1": [0.5, 3, True],
        "arrays": [0, 1, 2],
        "bad": ["nan", "-inf", "inf"],
        "set": ["a", "b"],
    }
    assert json.loads(report_module.dumps(doc)) == doc
    with pytest.raises(TypeError, match="only JSON types. Received: Row"):
        json_safe({"row": Row(1.0)})
    with pytest.raises(ValueError):  # the encoder is strict: NaN never leaks into the JSON
        report_module.dumps({"x": math.nan})


def test_a_report_must_implement_the_whole_protocol():
    class Partial(Report):
        @property
        def ok(self) -> bool:
            return True

    with pytest.raises(TypeError, match="abstract"):
        Partial()
