"""The TF Serving on-disk layout, in one place (no TensorFlow needed).

A model's base path (TF Serving's `model_base_path`) holds one directory per
version, named by the version number in decimal: `<base>/1/`, `<base>/2/`, ...
TF Serving parses a directory name as an int64 (`absl::SimpleAtoi`), so a version
is an integer in [0, 2**63 - 1]; every other name (``.tfbn-export-*``, ``tmp``,
``01a``) is ignored, which is what lets an exporter build a version aside and
rename it into place. Inside a version directory:

    saved_model.pb (or saved_model.pbtxt), variables/
    assets.extra/tf_serving_warmup_requests   replayed by TF Serving on load
    assets.extra/tfbn_golden.npz              tfbn's sample inputs and expected outputs

The exporter's temporary directories are ``.tfbn-export-<pid>-<random>`` so the
next export can tell a stale one (its process is gone) from a live one.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "ASSETS_EXTRA",
    "GOLDEN_FILE",
    "GOLDEN_RELPATH",
    "MAX_VERSION",
    "SAVED_MODEL_FILES",
    "TMP_PREFIX",
    "WARMUP_FILE",
    "WARMUP_RELPATH",
    "golden_path",
    "is_saved_model_dir",
    "latest_version",
    "next_version",
    "parse_version",
    "read_saved_model",
    "resolve_saved_model_dir",
    "stale_temp_dirs",
    "temp_dir_owner",
    "temp_dir_prefix",
    "validate_version",
    "version_dirs",
    "warmup_path",
]

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
GOLDEN_FILE = "tfbn_golden.npz"
WARMUP_RELPATH = os.path.join(ASSETS_EXTRA, WARMUP_FILE)
GOLDEN_RELPATH = os.path.join(ASSETS_EXTRA, GOLDEN_FILE)
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
MAX_VERSION = 2**63 - 1  # TF Serving's version is an int64
TMP_PREFIX = ".tfbn-export-"
LEGACY_TEMP_AGE = 3600.0
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")


def parse_version(name: str) -> int | None:
    """The version a directory name stands for, or None if TF Serving ignores it.

    Only plain decimal digits within int64 count (TF Serving's `SimpleAtoi` also
    takes a sign or spaces, but no exporter writes those)."""
    if not name.isascii() or not name.isdigit():
        return None
    value = int(name)
    return value if value <= MAX_VERSION else None


def validate_version(version) -> int:
    """`version` as an int if TF Serving can load a directory of that name.

    Accepts an int (not bool) or a string of decimal digits, in [0, 2**63 - 1].
    Raises ValueError naming what was received and what is accepted."""
    value = version
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        is_int = value.dtype.kind in "iu"
        value = int(value) if is_int else value
    if not is_int or not 0 <= value <= MAX_VERSION:
        raise ValueError(
            "`version` must be an integer in [0, 2**63 - 1] (TF Serving parses version "
            f"directories as int64). Received: version={version!r}"
        )
    return int(value)


def version_dirs(base_path: str | os.PathLike) -> dict[int, str]:
    """`{version: directory}` of the version directories under `base_path` ({} if none).

    Two names for one number (`7` and `007`) keep the shorter, canonical one."""
    base_path = os.fspath(base_path)
    if not os.path.isdir(base_path):
        return {}
    found: dict[int, str] = {}
    for name in sorted(os.listdir(base_path), key=len, reverse=True):
        version = parse_version(name)
        path = os.path.join(base_path, name)
        if version is not None and os.path.isdir(path):
            found[version] = path
    return dict(sorted(found.items()))


def latest_version(base_path: str | os.PathLike) -> int | None:
    """The highest version under `base_path` (the one TF Serving serves by default)."""
    versions = version_dirs(base_path)
    return max(versions) if versions else None


def next_version(base_path: str | os.PathLike) -> int:
    """One more than the highest version under `base_path` (1 for an empty base path)."""
    latest = latest_version(base_path)
    if latest is not None and latest >= MAX_VERSION:
        raise ValueError(
            f"{os.fspath(base_path)!r} already holds version 2**63 - 1; "
            "pass an explicit free version"
        )
    return 1 if latest is None else latest + 1


def golden_path(version_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(version_dir), GOLDEN_RELPATH)


def warmup_path(version_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(version_dir), WARMUP_RELPATH)


def is_saved_model_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding saved_model.pb(txt)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in SAVED_MODEL_FILES)


def resolve_saved_model_dir(path: str | os.PathLike) -> str:
    """`path` itself if it is a SavedModel, else the highest version under a TF
    Serving base path (the version TF Serving serves by default)."""
    path = os.fspath(path)
    if is_saved_model_dir(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No such SavedModel directory: {path!r}")
    versions = version_dirs(path)
    if versions:
        latest = versions[max(versions)]
        if is_saved_model_dir(latest):
            return latest
        raise FileNotFoundError(f"Version directory {latest!r} holds no saved_model.pb")
    raise FileNotFoundError(
        f"{path!r} is not a SavedModel (no saved_model.pb) nor a TF Serving base path "
        "(no integer version directories)"
    )


def read_saved_model(path: str | os.PathLike):
    """The `SavedModel` proto of a SavedModel directory (binary or text format)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.fspath(path)
    saved_model = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    if os.path.isfile(pb):
        with open(pb, "rb") as f:
            saved_model.ParseFromString(f.read())
    else:
        with open(os.path.join(path, "saved_model.pbtxt")) as f:
            text_format.Parse(f.read(), saved_model)
    return saved_model


def temp_dir_prefix(pid: int | None = None) -> str:
    """The prefix of an exporter's temporary directory, naming its owner process."""
    return f"{TMP_PREFIX}{os.getpid() if pid is None else pid}-"


def temp_dir_owner(name: str) -> int | None:
    """The owner pid in a temporary directory name, or None (not an exporter's, or an
    old-style name without a pid)."""
    match = _TMP_NAME.match(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_temp_dirs(base_path: str | os.PathLike) -> list[str]:
    """Exporter temporary directories under `base_path` whose owner process is gone.

    A name without a pid (written by tfbn before pids were recorded) counts as stale
    once it is older than `LEGACY_TEMP_AGE` seconds, so a concurrent old exporter is
    left alone."""
    base_path = os.fspath(base_path)
    if not os.path.isdir(base_path):
        return []
    stale = []
    for name in sorted(os.listdir(base_path)):
        path = os.path.join(base_path, name)
        if not name.startswith(TMP_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
            continue
        owner = temp_dir_owner(name)
        if owner is None:
            import time

            if time.time() - os.path.getmtime(path) > LEGACY_TEMP_AGE:
                stale.append(path)
        elif owner != os.getpid() and not _alive(owner):
            stale.append(path)
    return stale
