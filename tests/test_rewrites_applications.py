"""Keras Applications through the rewrites (issue 15 item 4): convert under a strategy,
train two steps, freeze, fold and export with the gate passing.

Two of the eight run here (slow); examples/applications_rewrites.py runs all eight
and prints the README's table.
"""

import importlib.util
from pathlib import Path

import pytest
import tensorflow as tf

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "applications_rewrites.py"


def load_script():
    spec = importlib.util.spec_from_file_location("applications_rewrites", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "EfficientNetB0"])
def test_application_converts_trains_freezes_folds_and_exports(name):
    script = load_script()
    strategy = tf.distribute.MirroredStrategy(script.cpu_replicas())
    result = script.run_one(name, script.APPLICATIONS[name], strategy)
    assert result["bn"] > 10 and result["folded"] + result["frozen"] == result["bn"]
    assert result["folded"] > 0
    assert result["freeze_err"] < 1e-4 and result["fold_err"] < 1e-4
    assert result["freeze_err"] > 0 or result["fold_err"] > 0  # non-trivial statistics
    assert result["gate"]
