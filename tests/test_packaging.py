"""What users install: the wheel's and the sdist's contents and metadata, a fresh
virtual environment with the wheel alone, and an existing TensorFlow kept as it is.

The virtual-environment tests (marker `venv`) build the wheel and install it as a
user would; they run once, in `make test-newest` (the oldest-end run skips them).
"""

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A TensorFlow that users have and tfbn must keep: inside the supported range, not its newest.
EXISTING_TF = "2.18.1"


def _run(*cmd, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built from this checkout as a release would be."""
    out = tmp_path_factory.mktemp("dist")
    # no --sdist/--wheel: the sdist is built, then the wheel from the sdist (so the sdist is complete)
    _run(sys.executable, "-m", "build", "--outdir", out, REPO, cwd=REPO)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def _source_modules() -> set[str]:
    """Every file the wheel must carry, at its installed path."""
    files = {f"tfbn/{p.relative_to(REPO / 'tfbn')}" for p in (REPO / "tfbn").rglob("*.py")}
    files |= {
        f"tfbn/serving/{p.relative_to(REPO / 'serving')}" for p in (REPO / "serving").rglob("*.py")
    }
    return {f for f in files if "__pycache__" not in f} | {"tfbn/py.typed"}


def test_wheel_holds_tfbn_only_and_every_module(dist):
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    code = {n for n in names if ".dist-info/" not in n}
    assert {n.split("/")[0] for n in code} == {"tfbn"}
    # a new subpackage missing from setup.cfg's `packages` fails here, not on users' machines
    assert code == _source_modules()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    top_level = zipfile.ZipFile(dist["wheel"]).read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["tfbn"]


def test_wheel_passes_check_wheel_contents(dist):
    done = subprocess.run(
        [BIN / "check-wheel-contents", dist["wheel"]], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(": OK")


def test_wheel_metadata_declares_the_tested_range(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(name))
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == "<3.12,>=3.11"
    classifiers = meta.get_all("Classifier")
    assert "Development Status :: 3 - Alpha" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not [
        c
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.1")
        and c != "Programming Language :: Python :: 3.11"
    ]
    requires = {r.split(";")[0].replace(" ", "") for r in meta.get_all("Requires-Dist")}
    assert {
        "tensorflow<2.22,>=2.16.1",
        "keras<4,>=3.10",
        "numpy<3,>=1.26",
        "protobuf>=4.25",
        "tensorflow-serving-api<2.22,>=2.16.1",
    } <= requires


def test_oldest_constraints_match_the_declared_lower_bounds():
    pins = dict(
        line.split("==")
        for line in (REPO / ".ci" / "constraints-oldest.txt").read_text().split("\n")
        if line and not line.startswith("#")
    )
    setup = (REPO / "setup.cfg").read_text()
    assert f"tensorflow>={pins['tensorflow'].rsplit('.', 1)[0]}" in setup  # 2.16.x
    assert f"keras>={pins['keras'].rsplit('.', 1)[0]}" in setup
    assert f"numpy>={pins['numpy'].rsplit('.', 1)[0]}" in setup
    assert f"protobuf>={pins['protobuf'].rsplit('.', 1)[0]}" in setup
    assert f"tensorflow-serving-api>={pins['tensorflow-serving-api']}" in setup


def test_sdist_builds_the_wheel_and_leaves_tests_out(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "setup.cfg",
        "pyproject.toml",
        "tfbn/py.typed",
        "tfbn/_compat.py",
        "serving/server.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]


# --- fresh virtual environments ----------------------------------------------------------------


def _venv(path: Path) -> Path:
    _run(sys.executable, "-m", "venv", path)
    return path / "bin"


def _site_packages(bin_dir: Path) -> Path:
    out = _run(
        bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    )
    return Path(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.venv
def test_wheel_in_a_fresh_venv_installs_tfbn_only_and_answers_without_tensorflow(dist, tmp_path):
    """--no-deps: what the wheel itself puts on disk, and what the command does
    where neither TensorFlow nor the serving extra is installed."""
    bin_dir = _venv(tmp_path / "venv")
    site = _site_packages(bin_dir)
    before = {p.name for p in site.iterdir()}
    _run(bin_dir / "pip", "install", "--no-deps", "--no-index", dist["wheel"])
    added = {p.name for p in site.iterdir()} - before
    assert added == {"tfbn", "tfbn-0.1.0.dist-info"}
    assert sorted(
        p.name for p in (site / "tfbn").iterdir() if p.is_dir() and p.name != "__pycache__"
    ) == ["inspect", "layers", "serving"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TF_"))}
    tfbn = bin_dir / "tfbn"
    assert _run(tfbn, "--help", env=env).stdout.startswith("usage: tfbn")
    assert _run(tfbn, "--version", env=env).stdout.strip() == "tfbn 0.1.0"
    for argv, what in (
        (["serve", "--model_base_path", "/nonexistent"], "tfbn serve"),
        (["check", "--grpc", "127.0.0.1:9", "--model_name", "m"], "tfbn check --grpc"),
    ):
        done = subprocess.run([tfbn, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2, done.stderr
        assert f"{what} needs the 'serving' extra" in done.stderr
        assert "pip install 'tfbn[serving]'" in done.stderr and "Traceback" not in done.stderr
    shutil.rmtree(tmp_path / "venv")


@pytest.mark.slow
@pytest.mark.venv
def test_installing_tfbn_keeps_an_existing_tensorflow(dist, tmp_path):
    """A user's environment with TensorFlow 2.18: installing tfbn keeps it (before,
    setup.cfg required tensorflow>=2.21 and pip upgraded it to 2.21).

    `tfbn[serving]` is installed with the user's TensorFlow named (as README says):
    tensorflow-serving-api X.Y requires tensorflow>=X.Y, and pip's resolver, left to
    itself, takes the newest tensorflow-serving-api and upgrades TensorFlow to match;
    naming the installed TensorFlow makes it pick the matching API release instead.
    """
    bin_dir = _venv(tmp_path / "venv")
    pip = [bin_dir / "python", "-m", "pip", "--disable-pip-version-check"]
    _run(*pip, "install", f"tensorflow=={EXISTING_TF}", timeout=1800)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def installed(*names):
        show = _run(*pip, "show", *names).stdout
        return [line.split()[1] for line in show.splitlines() if line.startswith("Version:")]

    assert installed("tensorflow") == [EXISTING_TF]
    _run(*pip, "install", dist["wheel"], timeout=1800)
    assert installed("tensorflow") == [EXISTING_TF]
    _run(*pip, "install", f"{dist['wheel']}[serving]", f"tensorflow=={EXISTING_TF}", timeout=1800)
    tf_version, api_version = installed("tensorflow", "tensorflow-serving-api")
    assert tf_version == EXISTING_TF
    assert api_version.startswith(EXISTING_TF.rsplit(".", 1)[0] + ".")
    _run(*pip, "check")
    smoke = (
        "import numpy as np, keras, tensorflow as tf, tfbn\n"
        "from tfbn.serving import client, server\n"
        "m = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization()])\n"
        "print(tf.__version__, m(np.ones((2, 3), 'float32'), training=True).shape)\n"
    )
    # cwd: away from this checkout, whose ./tfbn would shadow the installed package
    done = _run(bin_dir / "python", "-c", smoke, env=env, cwd=tmp_path)
    assert done.stdout.split() == [EXISTING_TF, "(2,", "3)"]
    shutil.rmtree(tmp_path / "venv")
