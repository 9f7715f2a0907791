"""One definition of "close enough", shared by the export gate and `tfbn check`.

Two sets of outputs are compared per named output, relative to the reference's
scale:

    error = max |got - ref| / max |ref|              (0 for identical outputs)
    close  <=>  max |got - ref| <= atol + rtol * max |ref|

Normalising by the output's largest magnitude, not element by element, is what a
network's rounding looks like: an element near zero carries the absolute rounding
of the large activations that produced it, so an element-wise `rtol * |ref|` rule
fails float32 models on their smallest logits while this one does not.

The tolerance follows the dtype the model *computes* in (its layers' dtype policy,
not its output dtype: a `mixed_float16` model with Keras's recommended float32
softmax head still rounds every activation to float16):

    rtol(dtype) = max(1e-4, 2 * eps(dtype))
      float32, float64: 1e-4   (float32 rounding of a deep network, with room)
      float16:          1.95e-3 (eps 2**-10)
      bfloat16:         1.56e-2 (eps 2**-7)

Non-finite values: a NaN/Inf where the reference is finite (or the reverse) is an
infinite error. Where both are the same non-finite value, the comparison is still
refused unless `allow_nonfinite` (a model answering NaN to finite inputs is broken,
and NaN == NaN must not make it look consistent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

__all__ = [
    "FLOAT32_RTOL",
    "Closeness",
    "Comparison",
    "compute_dtype",
    "default_rtol",
    "dtype_eps",
    "is_low_precision",
]

FLOAT32_RTOL = 1e-4
EPS_MULTIPLE = 2.0
_LOW = ("float16", "bfloat16")


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    return {"half": "float16", "float": "float32", "double": "float64"}.get(name, name)


def dtype_eps(dtype) -> float:
    """Machine epsilon of a floating dtype (bfloat16 included); 0 for other dtypes."""
    name = _dtype_name(dtype)
    if name == "bfloat16":
        return 2.0**-7
    try:
        np_dtype = np.dtype(name)
    except TypeError:
        return 0.0
    return float(np.finfo(np_dtype).eps) if np_dtype.kind == "f" else 0.0


def is_low_precision(dtype) -> bool:
    return _dtype_name(dtype) in _LOW


def default_rtol(dtype) -> float:
    """The tolerance of a model computing in `dtype` (see the module docstring)."""
    return max(FLOAT32_RTOL, EPS_MULTIPLE * dtype_eps(dtype))


def compute_dtype(model) -> str:
    """The least precise floating dtype any layer of `model` computes in.

    `mixed_float16` -> "float16" even with a float32 output layer; "float32" for
    models without floating layers."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    names = {_dtype_name(getattr(layer, "compute_dtype", None) or "float32") for layer in layers}
    floating = [n for n in names if dtype_eps(n) > 0]
    return max(floating, key=dtype_eps) if floating else "float32"


def low_precision_of(dtypes: Iterable) -> str | None:
    """The least precise of float16/bfloat16 among `dtypes`, or None."""
    low = [_dtype_name(d) for d in dtypes if is_low_precision(d)]
    return max(low, key=dtype_eps) if low else None


def _numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "fiub" or array.dtype.name in _LOW


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output compared with its reference."""

    error: float  # max |got - ref| / max |ref|
    max_abs: float  # max |got - ref|
    ratio: float  # max |got - ref| / (atol + rtol max |ref|); <= 1 is close
    row_ratios: np.ndarray  # the same ratio per example (axis 0)
    nonfinite: bool  # non-finite values in got or ref
    passed: bool
    reason: str = ""  # why it failed, when it did


@dataclasses.dataclass(frozen=True)
class Closeness:
    """The tolerance: `rtol` relative to each output's largest magnitude, plus `atol`."""

    rtol: float = FLOAT32_RTOL
    atol: float = 0.0
    dtype: str = "float32"
    source: str = "float32 default"

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(
                    f"`{name}` must be a finite number >= 0. Received: {name}={value!r}"
                )
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(
                "`rtol` and `atol` cannot both be 0: nothing but bit-identical "
                "outputs would pass, and rounding differs between kernels"
            )

    @classmethod
    def for_dtype(cls, dtype, rtol: float | None = None, atol: float = 0.0) -> Closeness:
        """The default tolerance of `dtype`, or the explicit `rtol`."""
        name = _dtype_name(dtype)
        if rtol is None:
            return cls(default_rtol(name), atol, name, f"{name} default")
        return cls(float(rtol), atol, name, "given")

    def describe(self) -> str:
        atol = f", atol={self.atol:g}" if self.atol else ""
        return f"rtol={self.rtol:.3g}{atol} ({self.source}; max|got-ref| <= rtol*max|ref|{' + atol' if self.atol else ''})"

    def compare(self, got, ref, allow_nonfinite: bool = False) -> Comparison:
        got, ref = np.asarray(got), np.asarray(ref)
        rows = len(ref) if ref.ndim else 1
        if got.shape != ref.shape:
            inf = np.full(rows, np.inf)
            return Comparison(
                np.inf,
                np.inf,
                np.inf,
                inf,
                False,
                False,
                f"shape {got.shape} differs from the reference's {ref.shape}",
            )
        if not (_numeric(ref) and _numeric(got)):
            same = (got == ref).reshape(rows, -1).all(axis=1) if ref.size else np.ones(rows, bool)
            ratios = np.where(same, 0.0, np.inf)
            ok = bool(same.all())
            bad = 0.0 if ok else np.inf
            return Comparison(bad, bad, bad, ratios, False, ok, "" if ok else "values differ")
        g = got.astype(np.float64).reshape(rows, -1)
        r = ref.astype(np.float64).reshape(rows, -1)
        g_fin, r_fin = np.isfinite(g), np.isfinite(r)
        nonfinite = bool(not g_fin.all() or not r_fin.all())
        same_special = (~g_fin) & (~r_fin) & ((g == r) | (np.isnan(g) & np.isnan(r)))
        both = g_fin & r_fin
        with np.errstate(invalid="ignore"):  # inf - inf where `both` is False anyway
            diff = np.where(both, np.abs(g - r), np.where(same_special, 0.0, np.inf))
        scale = float(np.max(np.abs(r[r_fin]), initial=0.0))
        bound = self.atol + self.rtol * scale
        row_diff = diff.max(axis=1) if diff.shape[1] else np.zeros(rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            row_ratios = np.where(row_diff == 0, 0.0, row_diff / bound if bound > 0 else np.inf)
        worst = float(row_diff.max(initial=0.0))
        error = 0.0 if worst == 0 else (worst / scale if scale > 0 else np.inf)
        ratio = float(row_ratios.max(initial=0.0))
        reason = ""
        if nonfinite and not allow_nonfinite:
            reason = "non-finite values (NaN/Inf)"
        elif ratio > 1:
            reason = f"max rel. error {error:.3g} > rtol {self.rtol:.3g}"
        return Comparison(error, worst, ratio, row_ratios, nonfinite, not reason, reason)
