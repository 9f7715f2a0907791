"""TF Serving's REST JSON tensor codec (util/json_tensor): request bodies in the row
("instances") and columnar ("inputs") formats to named arrays, and outputs back to JSON;
the status and metadata responses as TF Serving renders them."""

from __future__ import annotations

import json
import math

import numpy as np
from tfbn.serving import _tensor
from tfbn.serving._status import ServingError, error


def metadata_json(resp) -> str:
    """TF Serving's REST rendering of GetModelMetadataResponse (field names preserved)."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    opts = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sig_map)
    return json.dumps({"model_spec": json_format.MessageToDict(resp.model_spec, **opts),
                       "metadata": {"signature_def": json_format.MessageToDict(sig_map, **opts)}},
                      indent=1)


def status_json(resp) -> str:
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(resp, always_print_fields_with_no_presence=True),
                      indent=1)



_FLOAT32_MAX = float(np.finfo(np.float32).max)
_JSON_TYPES = {type(None): "Null", bool: "Boolean", dict: "Object", list: "Array", str: "String",
               int: "Number", float: "Number"}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int16": (-(2**31), 2**31 - 1),
               "int8": (-(2**31), 2**31 - 1), "uint8": (-(2**31), 2**31 - 1),
               "uint16": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
               "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}


def _json_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, separators=(",", ":"))


def _type_name(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return _JSON_TYPES.get(type(v), "Unknown")


def _check_leaf(v, dt: int):
    from tensorflow.core.framework import types_pb2 as T

    def type_error():
        return error("INVALID_ARGUMENT", f"JSON Value: {_json_text(v)} Type: {_type_name(v)} is not "
                                        f"of expected type: {_tensor.dtype_name(dt)}")

    if dt in (T.DT_FLOAT, T.DT_DOUBLE, T.DT_HALF):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise type_error()
        if dt == T.DT_FLOAT:
            if isinstance(v, int) and abs(v) > 2**24 - 1 or (
                    isinstance(v, float) and math.isfinite(v) and abs(v) > _FLOAT32_MAX):
                raise error("INVALID_ARGUMENT", f"Cannot convert JSON value: {_json_text(v)} to float "
                                               "without loss of precision.")
        return v
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
            raise error("INVALID_ARGUMENT", f"JSON Value: {_json_text(v)} not formatted correctly for "
                                           "base64 data")
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
            raise error("INVALID_ARGUMENT", f"JSON Value: {_json_text(val)} found at incorrect level: "
                                           f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
        out.append(_check_leaf(val, dt))
        return
    if level >= len(shape):
        raise error("INVALID_ARGUMENT",
                   f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(val) != shape[level]:
        raise error("INVALID_ARGUMENT", f"Encountered list at unexpected size: {len(val)} at level: "
                                       f"{level} expected size: {shape[level]}")
    for v in val:
        _flatten(v, level + 1, shape, dt, out)


def json_tensor(val, dt: int) -> np.ndarray:
    shape = _dense_shape(val)
    flat: list = []
    _flatten(val, 0, shape, dt, flat)
    np_type = _tensor.numpy_dtype(dt)
    if np_type == np.object_:
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=np_type).reshape(shape)


def _is_element_object(v) -> bool:
    return isinstance(v, dict) and not (set(v) == {"b64"} and isinstance(v.get("b64"), str))


def parse_json_document(body: bytes) -> dict:
    """A REST request body as a JSON object (TF Serving's ParseJson and its messages);
    shared by :predict, :classify and :regress."""
    if not body.strip():
        raise error("INVALID_ARGUMENT", "JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError as err:
        raise error("INVALID_ARGUMENT", f"JSON Parse error: Invalid encoding in string. at offset: "
                                       f"{err.start}") from None
    except json.JSONDecodeError as err:
        raise error("INVALID_ARGUMENT", f"JSON Parse error: {err.msg} at offset: {err.pos}") from None
    except RecursionError:
        raise error("INVALID_ARGUMENT", "JSON Parse error: nesting too deep") from None
    if not isinstance(doc, dict):
        raise error("INVALID_ARGUMENT", f"JSON Value: {_json_text(doc)[:200]} Is not object")
    return doc


def parse_predict_json(body: bytes, sig_inputs_of) -> tuple[str, dict[str, np.ndarray], str]:
    """Parse a REST predict body into (signature_name, named arrays, "row"|"columnar").

    `sig_inputs_of(signature_name)` returns the SignatureDef's inputs map (name -> TensorInfo).
    """
    doc = parse_json_document(body)
    sig = doc.get("signature_name", "")
    if not isinstance(sig, str):
        raise error("INVALID_ARGUMENT", f"JSON Value: {_json_text(doc)[:200]} not formatted correctly. "
                                       "'signature_name' key must be a string value.")
    infos = sig_inputs_of(sig)
    if not infos:
        raise error("INVALID_ARGUMENT", f"Failed to get input map for signature: {sig or 'DEFAULT'}")
    names = sorted(infos)
    if "instances" in doc and "inputs" in doc:
        raise error("INVALID_ARGUMENT", "JSON Value: {...} Not formatted correctly expecting only one "
                                       "of 'inputs' or 'instances' keys to exist ")
    if "instances" in doc:
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise error("INVALID_ARGUMENT", "JSON Value: {...} Excepting 'instances' to be an list/array")
        if not inst:
            raise error("INVALID_ARGUMENT", "JSON Value: {...} No values in 'instances' array")
        objects = _is_element_object(inst[0])
        if not isinstance(inst[0], dict) and len(names) > 1:
            raise error("INVALID_ARGUMENT", "instances is a plain list, but expecting list of objects "
                                           "as multiple input tensors required as per tensorinfo_map")
        columns: dict[str, list] = {n: [] for n in names}
        for i, elem in enumerate(inst):
            if objects:
                if not _is_element_object(elem):
                    raise error("INVALID_ARGUMENT", f"Expecting object but got list at item {i} of input list")
                for key in elem:
                    if key not in infos:
                        raise error("INVALID_ARGUMENT", f"Failed to process element: {i} key: {key} of "
                                   f"'instances' list. Error: INVALID_ARGUMENT: JSON object: does not "
                                   f"have named input: {key}")
                if set(elem) != set(names):
                    raise error("INVALID_ARGUMENT", f"Failed to process element: {i} of 'instances' list. "
                               f"JSON object: {_json_text(elem)[:200]} keys must be equal to: "
                               f"{','.join(names)}")
                for key in names:
                    columns[key].append(elem[key])
            else:
                if _is_element_object(elem):
                    raise error("INVALID_ARGUMENT",
                               f"Expecting value/list but got object at item {i} of input list")
                columns[names[0]].append(elem)
        arrays = {}
        for key, items in columns.items():
            dt = infos[key].dtype
            rows = []
            for i, item in enumerate(items):
                try:
                    rows.append(json_tensor(item, dt))
                except ServingError as err:
                    where = f"{i} key: {key}" if objects else f"{i}"
                    raise error("INVALID_ARGUMENT", f"Failed to process element: {where} of "
                               f"'instances' list. Error: {err}") from None
            shapes = {r.shape for r in rows}
            if len(shapes) > 1:
                first = rows[0].shape
                bad = next(r.shape for r in rows if r.shape != first)
                raise error("INVALID_ARGUMENT", f"Failed to process element: 1 of 'instances' list. "
                           f"Error: INVALID_ARGUMENT: Expecting shape [{','.join(map(str, first))}] but "
                           f"got: [{','.join(map(str, bad))}]")
            arrays[key] = np.stack(rows) if rows else np.zeros((0,))
        return sig, arrays, "row"
    if "inputs" in doc:
        val = doc["inputs"]
        if not isinstance(val, dict) or not _is_element_object(val):
            if len(names) > 1:
                raise error("INVALID_ARGUMENT", "inputs is a plain value/list, but expecting an object as "
                                               "multiple input tensors required as per tensorinfo_map")
            return sig, {names[0]: json_tensor(val, infos[names[0]].dtype)}, "columnar"
        arrays = {}
        for key in names:
            if key not in val:
                raise error("INVALID_ARGUMENT", f"Missing named input: {key} in 'inputs' object.")
            arrays[key] = json_tensor(val[key], infos[key].dtype)
        for key in val:
            if key not in infos:
                raise error("INVALID_ARGUMENT", f"input tensor alias not found in signature: {key}. "
                           f"Inputs expected to be in the set {{{','.join(names)}}}.")
        return sig, arrays, "columnar"
    raise error("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")


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
                raise error("INVALID_ARGUMENT", f"Tensor name: {name} has inconsistent batch size: "
                                               f"{arr.shape[0]} expecting: {batch}")
        return '{"predictions": ' + _tensor.rows_to_json(outputs, binary) + "}"
    if len(outputs) == 1:
        (name, arr), = outputs.items()
        return '{"outputs": ' + _tensor.array_to_json(arr, name in binary) + "}"
    parts = [f"{json.dumps(n)}: {_tensor.array_to_json(a, n in binary)}" for n, a in outputs.items()]
    return '{"outputs": {' + ", ".join(parts) + "}}"

