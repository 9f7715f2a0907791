"""Every script under examples/ is run by a test, so the README never shows a broken one."""

import json
import re

import pytest
from _examples_helpers import load, private_tempdir  # noqa: F401 - autouse fixture


@pytest.mark.slow
def test_demo_end_to_end(capsys, tmp_path):
    """The README's main command: sync training, gated export, dev server, checks."""
    assert load("demo").main(["--epochs", "5", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"replicas in sync +4\n", out) and "demo verdict" in out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["ok"] and report["accuracy"] > 0.9
    checks = report["checks"]
    assert checks["digits rest"]["passed"] and checks["digits grpc"]["passed"]
    for transport in ("rest", "grpc"):
        leaky = checks[f"digits_training_mode {transport}"]
        assert not leaky["passed"]
        # Single-row requests alone: only the server's batching mixes examples, and it is caught.
        assert any(
            r["mode"] == "concurrent" and r["batch_size"] == 1 and not r["passed"]
            for r in leaky["rows"]
        )
    assert (tmp_path / "models" / "digits" / "1" / "saved_model.pb").exists()
    # Issue 17.5: shifted traffic drifts on both transports; the recalibrated version
    # (2, exported while the server ran) does not, and serves more accurately.
    drift = report["drift"]
    assert drift["before"]["rest"]["drift"] and drift["before"]["grpc"]["drift"]
    assert drift["before"]["version"] == 1 and drift["after"]["version"] == 2
    assert not drift["after"]["rest"]["drift"] and not drift["after"]["grpc"]["drift"]
    assert drift["after"]["accuracy"] > drift["before"]["accuracy"] + 0.2
    assert (tmp_path / "models" / "digits" / "2" / "saved_model.pb").exists()
    assert (tmp_path / "training.png").stat().st_size > 0 and (
        tmp_path / "invariance.png"
    ).stat().st_size > 0
