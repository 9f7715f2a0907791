"""Argument validators: one answer, one error message per kind of argument.

Every validator takes the argument's name (for the message) and the received
value, and returns the normalised value or raises ValueError naming the
argument, the value received and what would be accepted. Booleans are never
numbers here: `True` is rejected wherever an integer or a float is expected
(Python's `bool` subclasses `int`, so `isinstance(True, int)` alone would accept
it as 1). NumPy integer and floating scalars are accepted as their Python values.
"""

from __future__ import annotations

import math
import numbers


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value) -> int:
    """An integer (Python or NumPy; not bool), returned as a Python int."""
    if not _is_integer(value):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    return int(value)


def positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """A positive integer (>= 1; not bool), or None when `allow_none`."""
    if value is None and allow_none:
        return None
    if not _is_integer(value) or value < 1:
        accepted = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value!r}")
    return int(value)


def momentum(name: str, value, allow_none: bool = False) -> float | None:
    """A momentum in [0, 1] (not bool), or None when `allow_none` (cumulative average)."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        accepted = (
            "a float in [0, 1] or None (cumulative average)"
            if allow_none
            else ("a float in [0, 1]")
        )
        raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value!r}")
    return float(value)


def epsilon(name: str, value) -> float:
    """A finite, non-negative float (0 allowed, as in Keras; not bool, NaN or Inf)."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"`{name}` must be a finite float >= 0. Received: {name}={value!r}")
    return float(value)


def axis(name: str, value) -> list[int]:
    """An integer or a non-empty list/tuple of distinct integers (NumPy ints accepted)."""
    values = [value] if _is_integer(value) else value
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(_is_integer(a) for a in values)
    ):
        raise ValueError(
            f"`{name}` must be an integer or a non-empty list of integers. "
            f"Received: {name}={value!r}"
        )
    values = [int(a) for a in values]
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` must not repeat an axis. Received: {name}={value!r}")
    return values


def choice(name: str, value, choices: tuple):
    """One of `choices` (compared with ==; a bool only matches a bool choice)."""
    for option in choices:
        if value == option and isinstance(value, bool) == isinstance(option, bool):
            return option
    raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
