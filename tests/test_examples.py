"""Every script under examples/ is run by a test, so the README never shows a broken one."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_trains_and_is_batch_invariant(capsys):
    assert load("demo").main(["--epochs", "6"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
