"""`parse_predict_json` on its own: every rule of TF Serving's FillPredictRequestFromJson
(util/json_tensor.cc) for the row ("instances") and columnar ("inputs") formats, and the
exact text of each error, as TF Serving words it (the REST tests check a few over the wire)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tfbn.serving._json_tensor import parse_predict_json
from tfbn.serving._status import ServingError

FLOAT, STRING, INT64 = types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64


def infos_of(**dtypes):
    infos = {k: meta_graph_pb2.TensorInfo(dtype=v) for k, v in dtypes.items()}
    return lambda signature_name: infos


ONE = infos_of(x=FLOAT)
TWO = infos_of(a=FLOAT, b=INT64)


def parse(doc, sig_inputs_of=ONE):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_predict_json(body, sig_inputs_of)


def message(doc, sig_inputs_of=ONE) -> str:
    with pytest.raises(ServingError) as info:
        parse(doc, sig_inputs_of)
    assert info.value.code.name == "INVALID_ARGUMENT"
    return info.value.message


def test_row_format_plain_list_and_objects():
    sig, arrays, fmt = parse({"instances": [[1.0, 2.0], [3.0, 4.0]]})
    assert (sig, fmt, list(arrays)) == ("", "row", ["x"])
    np.testing.assert_array_equal(arrays["x"], [[1, 2], [3, 4]])
    assert arrays["x"].dtype == np.float32
    sig, arrays, fmt = parse(
        {"signature_name": "s", "instances": [{"a": [1.0], "b": 2}, {"a": [3.0], "b": 4}]}, TWO
    )
    assert (sig, fmt) == ("s", "row")
    np.testing.assert_array_equal(arrays["a"], [[1], [3]])
    np.testing.assert_array_equal(arrays["b"], [2, 4])
    assert arrays["b"].dtype == np.int64


def test_row_format_takes_the_element_walk_for_booleans_and_b64():
    # a true/false anywhere in the body skips the one-call NumPy path
    _, arrays, _ = parse({"instances": [1.0, 2.0], "note": True})
    np.testing.assert_array_equal(arrays["x"], [1, 2])
    strings = infos_of(s=STRING)
    _, arrays, _ = parse({"instances": [{"b64": "YWI="}, "cd"]}, strings)
    assert list(arrays["s"]) == [b"ab", b"cd"]
    _, arrays, _ = parse({"instances": [{"s": {"b64": "YWI="}}]}, strings)
    assert list(arrays["s"]) == [b"ab"]


def test_columnar_format_single_value_b64_and_named_inputs():
    _, arrays, fmt = parse({"inputs": [[1.0], [2.0]]})
    assert fmt == "columnar"
    np.testing.assert_array_equal(arrays["x"], [[1], [2]])
    _, arrays, fmt = parse({"inputs": {"b64": "YWI="}}, infos_of(s=STRING))
    assert fmt == "columnar" and arrays["s"].shape == () and arrays["s"].item() == b"ab"
    _, arrays, fmt = parse({"inputs": {"a": [1.0, 2.0], "b": [3, 4]}}, TWO)
    np.testing.assert_array_equal(arrays["a"], [1, 2])
    np.testing.assert_array_equal(arrays["b"], [3, 4])


@pytest.mark.parametrize(
    "doc,sig_inputs_of,expected",
    [
        ([1, 2], ONE, "JSON Value: [1,2] Is not object"),
        (
            {"signature_name": 3, "instances": [1.0]},
            ONE,
            'JSON Value: {"signature_name":3,"instances":[1.0]} not formatted correctly. '
            "'signature_name' key must be a string value.",
        ),
        ({"instances": [1.0]}, infos_of(), "Failed to get input map for signature: DEFAULT"),
        (
            {"signature_name": "s", "instances": [1.0]},
            infos_of(),
            "Failed to get input map for signature: s",
        ),
        (
            {"instances": [1.0], "inputs": [1.0]},
            ONE,
            "JSON Value: {...} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist ",
        ),
        ({"instances": 1.0}, ONE, "JSON Value: {...} Excepting 'instances' to be an list/array"),
        ({"instances": []}, ONE, "JSON Value: {...} No values in 'instances' array"),
        (
            {"instances": [1.0]},
            TWO,
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map",
        ),
        (
            {"instances": [{"a": [1.0], "b": 1}, [1.0]]},
            TWO,
            "Expecting object but got list at item 1 of input list",
        ),
        (
            {"instances": [{"a": [1.0], "b": 1, "c": 2}]},
            TWO,
            "Failed to process element: 0 key: c of 'instances' list. Error: INVALID_ARGUMENT: "
            "JSON object: does not have named input: c",
        ),
        (
            {"instances": [{"a": [1.0], "b": 1}, {"a": [2.0]}]},
            TWO,
            "Failed to process element: 1 of 'instances' list. JSON object: {\"a\":[2.0]} "
            "keys must be equal to: a,b",
        ),
        (
            {"instances": [1.0, {"x": 2.0}]},
            ONE,
            "Expecting value/list but got object at item 1 of input list",
        ),
        (
            {"instances": [1.0, "a"]},
            ONE,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            'JSON Value: "a" Type: String is not of expected type: float',
        ),
        (
            {"instances": [{"a": [1.0], "b": 1.5}]},
            TWO,
            "Failed to process element: 0 key: b of 'instances' list. Error: INVALID_ARGUMENT: "
            "JSON Value: 1.5 Type: Number is not of expected type: int64",
        ),
        (
            {"instances": [[[1.0, 2.0]], [[1.0], [2.0]]]},
            ONE,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting shape [1,2] but got: [2,1]",
        ),
        (
            {"inputs": [1.0]},
            TWO,
            "inputs is a plain value/list, but expecting an object as multiple input tensors "
            "required as per tensorinfo_map",
        ),
        ({"inputs": {"a": [1.0]}}, TWO, "Missing named input: b in 'inputs' object."),
        (
            {"inputs": {"a": [1.0], "b": [1], "c": [2]}},
            TWO,
            "input tensor alias not found in signature: c. Inputs expected to be in the set {a,b}.",
        ),
        (
            {"inputs": [1.0, True]},
            ONE,
            "JSON Value: true Type: True is not of expected type: float",
        ),
        ({"other": 1}, ONE, "Missing 'inputs' or 'instances' key"),
    ],
)
def test_errors_are_worded_as_tf_serving_words_them(doc, sig_inputs_of, expected):
    assert message(doc, sig_inputs_of) == expected


def test_the_signature_name_is_what_the_input_map_is_asked_for():
    asked = []

    def sig_inputs_of(name):
        asked.append(name)
        return ONE(name)

    parse({"signature_name": "predict_images", "instances": [1.0]}, sig_inputs_of)
    parse({"instances": [1.0]}, sig_inputs_of)
    assert asked == ["predict_images", ""]


@pytest.mark.parametrize(
    "instances,infos,expected",
    [
        # TF Serving's json_tensor_test.cc: a size that differs is reported as a size
        (
            [[1, 2], [3, 4], [5, 6, 7]],
            ONE,
            "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 2 but got: 3",
        ),
        (
            [[1, 2], [3, 4], [[5, 6]]],
            ONE,
            "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting shape [2] but got: [1,2]",
        ),
        (
            [1, [1]],
            ONE,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting shape [] but got: [1]",
        ),
        (
            [[], [1.0]],
            ONE,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 0 but got: 1",
        ),
        # objects: the element and the key
        (
            [{"a": [1.0], "b": 1}, {"a": [1.0], "b": 2}, {"a": [1.0, 2.0], "b": 3}],
            TWO,
            "Failed to process element: 2 key: a of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 1 but got: 2",
        ),
        # element by element, as TF Serving: the first bad element is reported, whatever is wrong
        (
            [[1.0], [1.0, 2.0], ["x"]],
            ONE,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 1 but got: 2",
        ),
    ],
)
def test_instances_of_different_shapes_name_the_element_and_what_differs(
    instances, infos, expected
):
    assert message({"instances": instances}, infos) == expected
