"""The user-facing examples under examples/: each script runs and its own assertions hold.

Every script's `main(argv)` asserts what it claims and returns 0; these tests run
it in-process (the multi-worker one starts its own worker processes) and check
the lines it prints. The Docker walkthrough is not run, but its batching file and
its `tfbn` command lines are parsed with the real parsers.
"""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    assert load("quickstart").main([]) == 0
    out = capsys.readouterr().out
    assert "training=True   max |tfbn - keras|" in out and "accuracy" in out


def test_blocks(capsys):
    assert load("blocks").main([]) == 0
    out = capsys.readouterr().out
    assert "OK: no BatchNormalization wiring problem found" in out
    assert out.count("[bias-before-bn]") == 3


def test_finetune_frozen_bn(capsys):
    assert load("finetune_frozen_bn").main([]) == 0
    out = capsys.readouterr().out
    assert "BN statistics unchanged by fine-tuning: 4 arrays identical" in out
    assert "statistics update again: True" in out


def test_mirrored_sync_bn(capsys):
    assert load("mirrored_sync_bn").main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 replicas, 4 examples each")
    assert "moving statistics identical on all 4 replicas" in out


@pytest.mark.slow
def test_multiworker_sync_bn(capsys, tmp_path):
    assert load("multiworker_sync_bn").main(["--out", str(tmp_path), "--timeout", "85"]) == 0
    out = capsys.readouterr().out
    assert out.count("2 replicas in sync, 8 batches tracked") == 2
    assert "both workers hold the same moving statistics" in out
    assert sorted(p.name for p in tmp_path.glob("worker*.json")) == ["worker0.json", "worker1.json"]
