"""The report protocol: what every tfbn report (lint, gate, fold, drift, check...) offers.

A report is what a tfbn function found, for a human and for a machine alike:

- `ok`: a bool, True when nothing is wrong (the CLI's exit code 0 or 1 comes from it);
- `format()`: the text for humans (also `str(report)`);
- `to_dict()`: a JSON-safe dict (only dict/list/str/int/float/bool/None, string keys,
  finite floats; non-finite numbers are the strings "nan", "inf", "-inf"), with
  an "ok" key equal to `ok`;
- `to_json()`: `to_dict()` as JSON text, the same encoding for every report.

Subclasses implement `ok`, `format` and `to_dict`; `to_json` and `__str__` come
from here, once. `json_safe` turns NumPy scalars, tuples and non-finite floats into
their JSON form; `deprecated_alias` keeps an old method name (e.g. `table`) working.
TensorFlow-free: the SavedModel lint and the CLI import it without loading TensorFlow.
"""

from __future__ import annotations

import abc
import json
import math
import warnings
from collections.abc import Mapping

JSON_INDENT = 2


def dumps(doc: Mapping) -> str:
    """The one JSON encoding of reports (indented, strict: NaN/Inf are refused)."""
    return json.dumps(doc, indent=JSON_INDENT, allow_nan=False)


def json_safe(value):
    """`value` with only JSON types: tuples become lists, NumPy scalars and arrays
    Python numbers and lists, dict keys strings, non-finite floats "nan"/"inf"/"-inf"."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if isinstance(value, (bool, str, int)) or value is None:
        return value
    if isinstance(value, float):  # NumPy's float64 too
        return float(value) if math.isfinite(value) else str(float(value))
    if hasattr(value, "tolist"):  # NumPy scalars and arrays, without importing NumPy
        return json_safe(value.tolist())
    raise TypeError(
        f"A report's dict holds only JSON types. Received: {type(value).__name__} ({value!r})"
    )


class Report(abc.ABC):
    """Base of every report: `ok`, `format()`, `to_dict()` and, derived, `to_json()`."""

    @property
    @abc.abstractmethod
    def ok(self) -> bool:
        """True when the report found nothing wrong."""

    @abc.abstractmethod
    def format(self) -> str:
        """The report as text for humans."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """The report as a JSON-safe dict (see `json_safe`), with "ok"."""

    def to_json(self) -> str:
        """`to_dict()` as JSON text (`dumps`)."""
        return dumps(self.to_dict())

    def __str__(self) -> str:
        return self.format()


def deprecated_alias(old: str, new: str):
    """A method `old` that warns (DeprecationWarning) and calls method `new`."""

    def alias(self, *args, **kwargs):
        warnings.warn(
            f"{type(self).__name__}.{old}() is deprecated; use {new}()",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)(*args, **kwargs)

    alias.__name__ = old
    alias.__doc__ = f"Deprecated alias of `{new}()`."
    return alias
