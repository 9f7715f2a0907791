"""Tensors on TF Serving's wire formats: TensorProto (gRPC) and JSON (REST).

Shared by the client and the development server so both sides agree byte for byte.

JSON numbers: floats are written as the shortest decimal that reads back to the
same float32/float64 (NumPy's repr), with NaN / Infinity / -Infinity spelled as
TF Serving spells them, so a float32 survives a REST round trip exactly.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import ml_dtypes
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

# DataType enum <-> NumPy dtype, and the TensorProto field TF Serving fills (AsProtoField).
_DTYPES = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT16: (np.int16, "int_val"),
    types_pb2.DT_INT8: (np.int8, "int_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_UINT16: (np.uint16, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
    types_pb2.DT_HALF: (np.float16, "half_val"),
    # TF Serving's bfloat16: 16-bit patterns in `half_val` (or `tensor_content`); JSON numbers.
    types_pb2.DT_BFLOAT16: (ml_dtypes.bfloat16, "half_val"),
    types_pb2.DT_STRING: (np.object_, "string_val"),
}
_NP_TO_DT = {
    np.dtype(np_type): dt for dt, (np_type, _) in _DTYPES.items() if np_type is not np.object_
}


def dtype_name(dt: int) -> str:
    """`DT_FLOAT` -> `float`, as TensorFlow's DataTypeString prints it."""
    name = types_pb2.DataType.Name(dt)[3:].lower()
    return {"half": "half", "float": "float", "double": "double"}.get(name, name)


def numpy_dtype(dt: int) -> np.dtype:
    if dt not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {types_pb2.DataType.Name(dt)}")
    return np.dtype(_DTYPES[dt][0])


def datatype_of(array: np.ndarray) -> int:
    """The DataType enum of a NumPy array (bytes/str/object arrays are DT_STRING)."""
    if array.dtype.kind in "OSU":
        return types_pb2.DT_STRING
    try:
        return _NP_TO_DT[array.dtype]
    except KeyError:
        raise ValueError(
            f"unsupported NumPy dtype {array.dtype}; use one of "
            f"{sorted(str(d) for d in _NP_TO_DT)} or bytes"
        ) from None


def shape_proto(shape) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
    )


def to_tensor_proto(
    array: Any, dtype: int | None = None, typed_fields: bool = False
) -> tensor_pb2.TensorProto:
    """A NumPy array as a TensorProto. Numbers go into `tensor_content` (compact, exact)
    unless `typed_fields`, which fills `float_val` etc. as TF Serving's responses do."""
    arr = np.asarray(array)
    dt = datatype_of(arr) if dtype is None else dtype
    proto = tensor_pb2.TensorProto(dtype=dt, tensor_shape=shape_proto(arr.shape))
    if dt == types_pb2.DT_STRING:
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.reshape(-1)
        )
        return proto
    arr = arr.astype(numpy_dtype(dt), copy=False)
    if not typed_fields:
        proto.tensor_content = np.ascontiguousarray(arr).tobytes()
        return proto
    field = _DTYPES[dt][1]
    flat = arr.reshape(-1)
    if field == "half_val":  # float16 and bfloat16: their bit patterns
        flat = flat.view(np.uint16)
    getattr(proto, field).extend(flat.tolist())
    return proto


def from_tensor_proto(proto: tensor_pb2.TensorProto, max_bytes: int | None = None) -> np.ndarray:
    """A TensorProto as a NumPy array (either encoding, scalar broadcast as TF does).

    `max_bytes` bounds the decoded size (TF's fill-with-the-last-value rule lets a few
    bytes of message stand for any number of elements)."""
    dt = proto.dtype
    np_type = numpy_dtype(dt)
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    size = 1
    for d in shape:  # Python ints: no int64 overflow on absurd shapes
        size *= d
    if (
        max_bytes is not None
        and size * max(np_type.itemsize, 8 if dt == types_pb2.DT_STRING else 1) > max_bytes
    ):
        raise ValueError(
            f"tensor shape {list(shape)} holds {size} elements, more than the "
            f"{max_bytes}-byte request limit (--max-request-bytes) allows"
        )
    if dt == types_pb2.DT_STRING:
        values = np.empty(len(proto.string_val), dtype=object)
        values[:] = list(proto.string_val)
    elif proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype=np_type.newbyteorder("<"))
        values = values.astype(np_type)
    else:
        field = _DTYPES[dt][1]
        raw = getattr(proto, field)
        if field == "half_val":
            values = np.asarray(raw, dtype=np.uint16).view(np_type)
        else:
            values = np.asarray(raw, dtype=np_type)
    if values.size == size:
        return values.reshape(shape)
    if values.size == 1 and size >= 1:  # TF's "fill with the last value" rule
        return np.full(shape, values.reshape(-1)[0], dtype=values.dtype)
    if values.size == 0 and size == 0:
        return values.reshape(shape)
    raise ValueError(f"tensor has {values.size} values but its shape {list(shape)} needs {size}")


# --- JSON -----------------------------------------------------------------------------

_SPECIAL = {"nan": "NaN", "-nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _leaf_strings(array: np.ndarray, binary: bool) -> np.ndarray:
    if array.dtype == ml_dtypes.bfloat16:  # every bfloat16 is exactly a float32
        array = array.astype(np.float32)
    kind = array.dtype.kind
    if kind == "f":
        strs = array.astype(str)
        if not np.isfinite(array).all():
            strs = np.vectorize(lambda s: _SPECIAL.get(s, s), otypes=[object])(strs)
        return strs
    if kind == "b":
        return np.where(array, "true", "false")
    if kind in "iu":
        return array.astype(str)

    def enc(v):
        if isinstance(v, str):
            v = v.encode("utf-8")
        if not binary:
            try:
                return json.dumps(v.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        return '{"b64": "' + base64.b64encode(v).decode("ascii") + '"}'

    return np.vectorize(enc, otypes=[object])(array) if array.size else array.astype(str)


def _nest(strs) -> str:
    if not isinstance(strs, np.ndarray):  # one element: a str (or NumPy str) already
        return str(strs)
    if strs.ndim == 0:
        return str(strs.item())
    if strs.ndim == 1:
        return "[" + ",".join(strs.tolist()) + "]"
    return "[" + ",".join(_nest(s) for s in strs) + "]"


def array_to_json(array: np.ndarray, binary: bool = False) -> str:
    """One tensor as JSON text (nested lists; floats shortest-exact; strings as text,
    or `{"b64": ...}` when not UTF-8 or `binary`)."""
    return _nest(_leaf_strings(np.asarray(array), binary))


def rows_to_json(arrays: dict[str, np.ndarray], binary_names=(), named: bool = False) -> str:
    """Row ("instances"/"predictions") JSON: a list with one entry per example; a bare
    value per row when there is one tensor (unless `named`), else an object per row."""
    names = list(arrays)
    strs = {n: _leaf_strings(np.asarray(arrays[n]), n in binary_names) for n in names}
    n_rows = len(strs[names[0]])
    if len(names) == 1 and not named:
        return "[" + ",".join(_nest(strs[names[0]][i]) for i in range(n_rows)) + "]"
    rows = []
    for i in range(n_rows):
        rows.append("{" + ",".join(f"{json.dumps(n)}:{_nest(strs[n][i])}" for n in names) + "}")
    return "[" + ",".join(rows) + "]"


def json_to_array(value: Any, dtype: np.dtype) -> np.ndarray:
    """Client-side decoding of one JSON tensor into `dtype` (floats exact for float32)."""
    if dtype == np.object_:

        def dec(v):
            if isinstance(v, dict) and set(v) == {"b64"}:
                return base64.b64decode(v["b64"])
            return v.encode("utf-8") if isinstance(v, str) else v

        arr = np.asarray(value, dtype=object)
        return np.vectorize(dec, otypes=[object])(arr) if arr.size else arr
    if dtype == ml_dtypes.bfloat16:  # numbers -> float32 (exact for bfloat16 values) -> bfloat16
        return np.asarray(value, dtype=np.float32).astype(dtype)
    return np.asarray(value, dtype=dtype)
