"""TF Serving's REST JSON tensor codec (util/json_tensor): request bodies in the row
("instances") and columnar ("inputs") formats to named arrays, and outputs back to JSON;
the status and metadata responses as TF Serving renders them.

Decoding keeps memory near the body's size: the document is parsed once by the standard
library's C decoder (orjson is 3x faster but peaks at ~14x the body, against ~3x here:
`examples/bench_json_decode.py` measures both), each tensor is converted by NumPy in one call,
and only a value NumPy cannot take as it is (a bool among numbers, a string, a ragged or
over-deep list, an out-of-range integer) goes through the element-by-element walk that
produces TF Serving's error messages.
"""

from __future__ import annotations

import json
import warnings

import ml_dtypes
import numpy as np
from tfbn.serving import _tensor
from tfbn.serving._status import ServingError, error


def metadata_json(resp) -> str:
    """TF Serving's REST rendering of GetModelMetadataResponse (field names preserved)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    from tfbn._compat import message_to_dict

    opts = dict(preserving_proto_field_name=True, print_default_fields=True)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sig_map)
    return json.dumps(
        {
            "model_spec": message_to_dict(resp.model_spec, **opts),
            "metadata": {"signature_def": message_to_dict(sig_map, **opts)},
        },
        indent=1,
    )


def status_json(resp) -> str:
    from tfbn._compat import message_to_dict

    return json.dumps(message_to_dict(resp, print_default_fields=True), indent=1)


MAX_RANK = 64  # NumPy's limit (TensorFlow's own, TensorShape::MaxDimensions(), is 254)

# Python's json messages -> rapidjson's GetParseError_En text, which TF Serving returns.
_RAPIDJSON_MESSAGES = (
    ("Expecting value", "Invalid value."),
    ("Expecting property name enclosed in double quotes", "Missing a name for object member."),
    ("Expecting ':' delimiter", "Missing a colon after a name of object member."),
    ("Unterminated string", "Missing a closing quotation mark in string."),
    ("Invalid \\uXXXX escape", "Incorrect hex digit after \\u escape in string."),
    ("Invalid \\escape", "Invalid escape character in string."),
    ("Invalid control character", "Invalid encoding in string."),
)


def _open_container(text: str, pos: int) -> str:
    """'{' or '[': the innermost container open at `pos` (strings skipped)."""
    stack, i, in_str = [], 0, False
    while i < pos:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            stack.append(c)
        elif c in "]}" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else "["


def _parse_error(text: str, err: json.JSONDecodeError) -> ServingError:
    msg = next((rj for py, rj in _RAPIDJSON_MESSAGES if err.msg.startswith(py)), None)
    if msg is None and err.msg.startswith("Expecting ',' delimiter"):
        msg = (
            "Missing a comma or '}' after an object member."
            if _open_container(text, err.pos) == "{"
            else "Missing a comma or ']' after an array element."
        )
    return error(
        "INVALID_ARGUMENT", f"JSON Parse error: {msg or err.msg + '.'} at offset: {err.pos}"
    )


def loads(body: bytes):
    """Parse a request body as TF Serving's rapidjson settings do (NaN and Infinity
    accepted, text after the first complete value ignored), with its error messages."""
    if not body.strip():
        raise error("INVALID_ARGUMENT", "JSON Parse error: The document is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            "INVALID_ARGUMENT",
            f"JSON Parse error: Invalid encoding in string. at offset: {err.start}",
        ) from None
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        return json.JSONDecoder().raw_decode(text, start)[0]
    except json.JSONDecodeError as err:
        raise _parse_error(text, err) from None
    except RecursionError:
        raise error(
            "INVALID_ARGUMENT",
            "JSON Parse error: the document nests arrays/objects too deeply for this server",
        ) from None


_JSON_TYPES = {
    type(None): "Null",
    bool: "Boolean",
    dict: "Object",
    list: "Array",
    str: "String",
    int: "Number",
    float: "Number",
}
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int16": (-(2**31), 2**31 - 1),
    "int8": (-(2**31), 2**31 - 1),
    "uint8": (-(2**31), 2**31 - 1),
    "uint16": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}


def _json_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, separators=(",", ":"))


def _preview(v, limit: int = 200) -> str:
    """At most about `limit` characters of `v` as JSON, without rendering all of a large value."""
    out: list[str] = []
    budget = [limit]

    def emit(text: str) -> bool:
        out.append(text)
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(x) -> bool:
        if isinstance(x, list):
            if not emit("["):
                return False
            for i, item in enumerate(x):
                if (i and not emit(",")) or not walk(item):
                    return False
            return emit("]")
        if isinstance(x, dict):
            if not emit("{"):
                return False
            for i, (k, item) in enumerate(x.items()):
                if (i and not emit(",")) or not emit(json.dumps(str(k)) + ":") or not walk(item):
                    return False
            return emit("}")
        return emit(_json_text(x)[:limit])

    if not walk(v):
        out.append("...")
    return "".join(out)


def _type_name(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return _JSON_TYPES.get(type(v), "Unknown")


def _check_leaf(v, dt: int):
    from tensorflow.core.framework import types_pb2 as T

    def type_error():
        return error(
            "INVALID_ARGUMENT",
            f"JSON Value: {_json_text(v)} Type: {_type_name(v)} is not "
            f"of expected type: {_tensor.dtype_name(dt)}",
        )

    if dt in (T.DT_FLOAT, T.DT_DOUBLE, T.DT_HALF, T.DT_BFLOAT16):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise type_error()
        try:
            return float(v)  # cast, as TF Serving since 2.5 (GetFloat): no precision check
        except OverflowError:  # an integer beyond double's range: rapidjson cannot parse it
            raise error(
                "INVALID_ARGUMENT",
                f"JSON Value: {_json_text(v)} Number too big to be stored in double.",
            ) from None
    if dt == T.DT_STRING:
        if isinstance(v, str):
            return v.encode("utf-8")
        if isinstance(v, dict):
            if set(v) == {"b64"} and isinstance(v["b64"], str):
                import base64
                import binascii

                try:
                    return base64.b64decode(v["b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise error("INVALID_ARGUMENT", "Unable to base64 decode") from None
            raise error(
                "INVALID_ARGUMENT",
                f"JSON Value: {_json_text(v)} not formatted correctly for base64 data",
            )
        raise type_error()
    if dt == T.DT_BOOL:
        if not isinstance(v, bool):
            raise type_error()
        return v
    name = _tensor.dtype_name(dt)
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise type_error()
        return v
    raise error("UNIMPLEMENTED", f"Conversion of JSON Value: {_json_text(v)} to type: {name}")


def _dense_shape(val) -> list[int]:
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _flatten(val, level: int, shape: list[int], dt: int, out: list):
    if not isinstance(val, list):
        if level != len(shape):
            raise error(
                "INVALID_ARGUMENT",
                f"JSON Value: {_json_text(val)} found at incorrect level: "
                f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}",
            )
        out.append(_check_leaf(val, dt))
        return
    if level >= len(shape):
        raise error(
            "INVALID_ARGUMENT",
            f"Encountered list at unexpected level: {level} expected < {len(shape)}",
        )
    if len(val) != shape[level]:
        raise error(
            "INVALID_ARGUMENT",
            f"Encountered list at unexpected size: {len(val)} at level: "
            f"{level} expected size: {shape[level]}",
        )
    for v in val:
        _flatten(v, level + 1, shape, dt, out)


_FAST_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}  # target kind -> accepted NumPy kinds


def _fast_tensor(val, dt: int) -> np.ndarray | None:
    """`val` as an array of `dt` in one NumPy call, or None when it needs the exact walk
    (strings, objects, ragged or over-deep lists, bools among numbers, out-of-range ints)."""
    np_type = _tensor.numpy_dtype(dt)
    accepted = _FAST_KINDS.get("f" if np_type == ml_dtypes.bfloat16 else np_type.kind)
    if accepted is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. NumPy's ragged-array deprecation
            arr = np.array(val)
    except (ValueError, TypeError, OverflowError, RecursionError, Warning):
        return None
    if arr.dtype.kind not in accepted or arr.ndim > MAX_RANK:
        return None
    if np_type.kind in "iu" and arr.size:
        name = _tensor.dtype_name(dt)
        lo, hi = _INT_RANGES[name]
        if int(arr.min()) < lo or int(arr.max()) > hi:
            return None
    with np.errstate(over="ignore"):  # beyond float32's range becomes +-inf, as a C cast
        return arr.astype(np_type, copy=False)


def json_tensor(val, dt: int, fast: bool = True) -> np.ndarray:
    """One JSON tensor value as an array of DataType `dt` (TF Serving's rules and messages)."""
    if fast:
        arr = _fast_tensor(val, dt)
        if arr is not None:
            return arr
    shape = _dense_shape(val)
    if len(shape) > MAX_RANK:
        raise error(
            "INVALID_ARGUMENT",
            f"JSON array nested {len(shape)} deep: more than the "
            f"{MAX_RANK} dimensions a tensor can have in this server",
        )
    flat: list = []
    _flatten(val, 0, shape, dt, flat)
    np_type = _tensor.numpy_dtype(dt)
    if np_type == np.object_:
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    with np.errstate(over="ignore"):
        return np.asarray(flat, dtype=np_type).reshape(shape)


def _is_element_object(v) -> bool:
    return isinstance(v, dict) and not (set(v) == {"b64"} and isinstance(v.get("b64"), str))


def parse_predict_json(body: bytes, sig_inputs_of) -> tuple[str, dict[str, np.ndarray], str]:
    """Parse a REST predict body into (signature_name, named arrays, "row"|"columnar").

    `sig_inputs_of(signature_name)` returns the SignatureDef's inputs map (name -> TensorInfo).
    """
    doc = loads(body)
    # NumPy would read true/false among numbers as 1/0; TF Serving rejects them, so a body
    # that holds either word anywhere takes the element-by-element walk.
    fast = b"true" not in body and b"false" not in body
    sig = _signature_name(doc)
    infos = sig_inputs_of(sig)
    if not infos:
        raise error(
            "INVALID_ARGUMENT", f"Failed to get input map for signature: {sig or 'DEFAULT'}"
        )
    if "instances" in doc and "inputs" in doc:
        raise error(
            "INVALID_ARGUMENT",
            "JSON Value: {...} Not formatted correctly expecting only one "
            "of 'inputs' or 'instances' keys to exist ",
        )
    if "instances" in doc:
        return sig, _row_format(doc["instances"], infos, fast), "row"
    if "inputs" in doc:
        return sig, _columnar_format(doc["inputs"], infos, fast), "columnar"
    raise error("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")


def _signature_name(doc) -> str:
    """The request's "signature_name" ("" when absent); the document must be an object."""
    if not isinstance(doc, dict):
        raise error("INVALID_ARGUMENT", f"JSON Value: {_preview(doc)} Is not object")
    sig = doc.get("signature_name", "")
    if not isinstance(sig, str):
        raise error(
            "INVALID_ARGUMENT",
            f"JSON Value: {_preview(doc)} not formatted correctly. "
            "'signature_name' key must be a string value.",
        )
    return sig


def _row_format(inst, infos, fast: bool) -> dict[str, np.ndarray]:
    """The "instances" list (TF Serving's FillTensorMapFromInstancesList): a plain list for
    a single input, else a list of objects with one key per input; the rows of each input
    stacked into one array."""
    names = sorted(infos)
    if not isinstance(inst, list):
        raise error(
            "INVALID_ARGUMENT", "JSON Value: {...} Excepting 'instances' to be an list/array"
        )
    if not inst:
        raise error("INVALID_ARGUMENT", "JSON Value: {...} No values in 'instances' array")
    if not isinstance(inst[0], dict) and len(names) > 1:
        raise error(
            "INVALID_ARGUMENT",
            "instances is a plain list, but expecting list of objects "
            "as multiple input tensors required as per tensorinfo_map",
        )
    objects = _is_element_object(inst[0])
    columns = _instance_columns(inst, infos, names, objects)
    return {
        key: _stack_instances(key, items, infos[key].dtype, objects, fast)
        for key, items in columns.items()
    }


def _instance_columns(inst: list, infos, names: list[str], objects: bool) -> dict[str, list]:
    """The instances' values by input name, after checking every element has the first
    one's form (an object with exactly the inputs as keys, or a value/list)."""
    columns: dict[str, list] = {n: [] for n in names}
    for i, elem in enumerate(inst):
        if objects:
            _check_instance_object(i, elem, infos, names)
            for key in names:
                columns[key].append(elem[key])
        else:
            if _is_element_object(elem):
                raise error(
                    "INVALID_ARGUMENT",
                    f"Expecting value/list but got object at item {i} of input list",
                )
            columns[names[0]].append(elem)
    return columns


def _check_instance_object(i: int, elem, infos, names: list[str]) -> None:
    if not _is_element_object(elem):
        raise error(
            "INVALID_ARGUMENT",
            f"Expecting object but got list at item {i} of input list",
        )
    for key in elem:
        if key not in infos:
            raise error(
                "INVALID_ARGUMENT",
                f"Failed to process element: {i} key: {key} of "
                f"'instances' list. Error: INVALID_ARGUMENT: JSON object: does not "
                f"have named input: {key}",
            )
    if set(elem) != set(names):
        raise error(
            "INVALID_ARGUMENT",
            f"Failed to process element: {i} of 'instances' list. "
            f"JSON object: {_preview(elem)} keys must be equal to: "
            f"{','.join(names)}",
        )


def _stack_instances(key: str, items: list, dt: int, objects: bool, fast: bool) -> np.ndarray:
    """One input's values of every instance as one array (first dimension: the instances)."""
    whole = _fast_tensor(items, dt) if fast else None  # every row in one NumPy call
    if whole is not None and whole.ndim >= 1:
        return whole
    rows: list[np.ndarray] = []
    for i, item in enumerate(items):
        try:
            row = json_tensor(item, dt)
            if rows:
                _check_like_the_first(rows[0], row)
        except ServingError as err:
            where = f"{i} key: {key}" if objects else f"{i}"
            raise error(
                "INVALID_ARGUMENT",
                f"Failed to process element: {where} of 'instances' list. Error: {err}",
            ) from None
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0,))


def _check_like_the_first(first: np.ndarray, row: np.ndarray) -> None:
    """An instance's tensor must have the first one's size, then its shape (AddInstanceItem)."""
    if row.size != first.size:
        raise error("INVALID_ARGUMENT", f"Expecting tensor size: {first.size} but got: {row.size}")
    if row.shape != first.shape:
        raise error(
            "INVALID_ARGUMENT",
            f"Expecting shape [{','.join(map(str, first.shape))}] but "
            f"got: [{','.join(map(str, row.shape))}]",
        )


def _columnar_format(val, infos, fast: bool) -> dict[str, np.ndarray]:
    """The "inputs" value (TF Serving's FillTensorMapFromInputsMap): the tensor itself for
    a single input (a value, a list or a b64 object), else an object by input name."""
    names = sorted(infos)
    if not _is_element_object(val):
        if len(names) > 1:
            raise error(
                "INVALID_ARGUMENT",
                "inputs is a plain value/list, but expecting an object as "
                "multiple input tensors required as per tensorinfo_map",
            )
        return {names[0]: json_tensor(val, infos[names[0]].dtype, fast)}
    arrays = {}
    for key in names:
        if key not in val:
            raise error("INVALID_ARGUMENT", f"Missing named input: {key} in 'inputs' object.")
        arrays[key] = json_tensor(val[key], infos[key].dtype, fast)
    for key in val:
        if key not in infos:
            raise error(
                "INVALID_ARGUMENT",
                f"input tensor alias not found in signature: {key}. "
                f"Inputs expected to be in the set {{{','.join(names)}}}.",
            )
    return arrays


def predict_json(outputs: dict[str, np.ndarray], fmt: str) -> str:
    binary = {n for n in outputs if n.endswith("_bytes")}
    if fmt == "row":
        batch = None
        for name, arr in outputs.items():
            if arr.ndim == 0:
                raise error("INVALID_ARGUMENT", f"Tensor name: {name} has no shape information ")
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise error(
                    "INVALID_ARGUMENT",
                    f"Tensor name: {name} has inconsistent batch size: "
                    f"{arr.shape[0]} expecting: {batch}",
                )
        return '{"predictions": ' + _tensor.rows_to_json(outputs, binary) + "}"
    if len(outputs) == 1:
        ((name, arr),) = outputs.items()
        return '{"outputs": ' + _tensor.array_to_json(arr, name in binary) + "}"
    parts = [
        f"{json.dumps(n)}: {_tensor.array_to_json(a, n in binary)}" for n, a in outputs.items()
    ]
    return '{"outputs": {' + ", ".join(parts) + "}}"
