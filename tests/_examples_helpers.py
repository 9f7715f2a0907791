"""Running the scripts under examples/ from tests: import one by path, and keep
whatever it puts in the temp directory inside the test's own tmp_path."""

import importlib.util
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """The temp dir of the example (and of the processes it starts) is the test's own,
    and the example must leave it empty: nothing lands in the system temp dir."""
    tmp = tmp_path / "tempdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    yield tmp
    # Folders are the examples' own (output dirs); files are TensorFlow's autograph
    # sources, which TensorFlow removes when the process exits.
    left = sorted(p.name for p in tmp.iterdir() if p.is_dir())
    assert not left, f"folders left in the temp dir: {left}"
