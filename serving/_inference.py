"""Classify, Regress and MultiInference: tf.Example inputs, TF Serving's semantics.

TF Serving's classifier.cc, regressor.cc, multi_inference.cc and util.cc
(InputToSerializedExampleTensor) in Python, over any servable that has
`signature_defs` (name -> SignatureDef) and `call(signature_key, {alias: array},
[output aliases]) -> {alias: array}`:

- An `Input` proto (`example_list`, or `example_list_with_context` whose context is
  prepended to every example's serialised bytes, so the two merge on parsing) becomes
  a 1-D DT_STRING tensor of serialised tf.Examples, fed to the signature's `inputs`.
- Classification reads `classes` (DT_STRING, [batch, n]) and/or `scores` (DT_FLOAT,
  [batch, n]); regression reads `outputs` ([batch] or [batch, 1], DT_FLOAT).
- The method name is checked only with `--enable_signature_method_name_check` (TF
  Serving's default is off, which is what lets TF2 exports, whose signatures all say
  `tensorflow/serving/predict`, be classified); otherwise the signature's shape
  (one input `inputs`, the expected outputs) is checked, with TF Serving's messages.
- REST `:classify` / `:regress` bodies (`signature_name`, `examples`, optional
  `context`) become the same `Input`; answers are `{"results": ...}`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from google.protobuf import text_format
from tfbn.serving._status import ServingError, error

__all__ = [
    "CLASSIFY_METHOD",
    "REGRESS_METHOD",
    "classification_json",
    "classify",
    "examples_from_input",
    "input_from_json",
    "multi_inference",
    "regress",
    "regression_json",
]

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"


def _invalid(message: str) -> ServingError:
    return error("INVALID_ARGUMENT", message)


def _debug_string(proto) -> str:
    return text_format.MessageToString(proto)


# --- Input proto -> serialised examples --------------------------------------------


def examples_from_input(input_proto) -> np.ndarray:
    """A `tensorflow.serving.Input` as a 1-D object array of serialised tf.Examples."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        serialized = [e.SerializeToString() for e in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        ctx = input_proto.example_list_with_context
        context = ctx.context.SerializeToString()
        serialized = [context + e.SerializeToString() for e in ctx.examples]
    else:
        serialized = []
    if not serialized:
        raise _invalid("Input is empty.")
    out = np.empty(len(serialized), dtype=object)
    out[:] = serialized
    return out


# --- signatures ------------------------------------------------------------------------


def _find_signature(servable, model_spec, kind: str, method: str, method_check: bool):
    name = model_spec.signature_name or DEFAULT_SIGNATURE
    sig = servable.signature_defs.get(name)
    if sig is None:
        raise _invalid(f"No signature was found with the name: {name}")
    if method_check and sig.method_name != method:
        raise _invalid(
            f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}"
        )
    return name, sig


def _classification_io(sig, method_check: bool) -> tuple[str, list[str]]:
    if method_check and sig.method_name != CLASSIFY_METHOD:
        raise _invalid(
            f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
            f"Was: {sig.method_name}"
        )
    if len(sig.inputs) != 1:
        raise _invalid("Expected one input Tensor.")
    if len(sig.outputs) not in (1, 2):
        raise _invalid(f"Expected one or two output Tensors, found {len(sig.outputs)}")
    if "inputs" not in sig.inputs:
        raise _invalid(f"No classification inputs found in SignatureDef: {_debug_string(sig)}")
    outputs = [a for a in ("classes", "scores") if a in sig.outputs]
    if not outputs:
        raise _invalid(
            "Expected classification signature outputs to contain at least one of "
            f'"classes" or "scores". Signature was: {_debug_string(sig)}'
        )
    return "inputs", outputs


def _regression_io(sig, method_check: bool) -> tuple[str, list[str]]:
    if method_check and sig.method_name != REGRESS_METHOD:
        raise _invalid(
            f"Expected regression signature method_name to be {REGRESS_METHOD}. "
            f"Was: {sig.method_name}"
        )
    if len(sig.inputs) != 1:
        raise _invalid("Expected one input Tensor.")
    if len(sig.outputs) != 1:
        raise _invalid("Expected one output Tensor.")
    if "inputs" not in sig.inputs:
        raise _invalid(f"No regression inputs found in SignatureDef: {_debug_string(sig)}")
    if "outputs" not in sig.outputs:
        raise _invalid(f"No regression outputs found in SignatureDef: {_debug_string(sig)}")
    return "inputs", ["outputs"]


def _shape_string(arr: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in arr.shape) + "]"


def _dtype_name(arr: np.ndarray) -> str:
    from tensorflow.core.framework import types_pb2
    from tfbn.serving import _tensor

    try:
        return types_pb2.DataType.Name(_tensor.datatype_of(arr))
    except ValueError:
        return str(arr.dtype)


def _fill_classification(num_examples: int, outputs: dict[str, np.ndarray], result) -> None:
    classes = outputs.get("classes")
    scores = outputs.get("scores")
    for name, arr, want in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if arr is None:
            continue
        if arr.ndim != 2:
            raise _invalid(
                f"Expected Tensor shape: [batch_size num_classes] but got {_shape_string(arr)}"
            )
        if _dtype_name(arr) != want:
            raise _invalid(f"Expected {name} Tensor of {want}. Got: {_dtype_name(arr)}")
        if arr.shape[0] != num_examples:
            raise _invalid(
                f"Expected {name} output batch size of {num_examples}. Got: {arr.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise _invalid(
            "Tensors class and score should match in dim_size(1). Got "
            f"{classes.shape[1]} vs. {scores.shape[1]}"
        )
    num_classes = (classes if classes is not None else scores).shape[1]
    for i in range(num_examples):
        row = result.classifications.add()
        for c in range(num_classes):
            cls = row.classes.add()
            if classes is not None:
                label = classes[i, c]
                cls.label = (
                    label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
                )
            if scores is not None:
                cls.score = float(scores[i, c])


def _fill_regression(num_examples: int, outputs: dict[str, np.ndarray], result) -> None:
    arr = outputs["outputs"]
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
        raise _invalid(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
            f"but got {_shape_string(arr)}"
        )
    if arr.shape[0] != num_examples:
        raise _invalid(
            f"Input batch size did not match output batch size: {num_examples} vs. {arr.shape[0]}"
        )
    if _dtype_name(arr) != "DT_FLOAT":
        raise _invalid(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(arr)}")
    for value in arr.reshape(-1):
        result.regressions.add(value=float(value))


def _model_spec(dst, src_spec, version: int) -> None:
    """TF Serving's MakeModelSpec: the request's name and signature name (as sent, so
    an empty one stays empty), and the version that ran."""
    dst.name = src_spec.name
    dst.signature_name = src_spec.signature_name
    dst.version.value = int(version)


# --- the three RPCs ------------------------------------------------------------------


def classify(servable, request, method_check: bool = False):
    """ClassificationRequest -> ClassificationResponse on one loaded version."""
    from tensorflow_serving.apis import classification_pb2

    key, sig = _find_signature(
        servable, request.model_spec, "classification", CLASSIFY_METHOD, method_check
    )
    in_alias, out_aliases = _classification_io(sig, method_check)
    examples = examples_from_input(request.input)
    outputs = servable.call(key, {in_alias: examples}, out_aliases)
    resp = classification_pb2.ClassificationResponse()
    _model_spec(resp.model_spec, request.model_spec, servable.version)
    _fill_classification(len(examples), outputs, resp.result)
    return resp


def regress(servable, request, method_check: bool = False):
    """RegressionRequest -> RegressionResponse on one loaded version."""
    from tensorflow_serving.apis import regression_pb2

    key, sig = _find_signature(
        servable, request.model_spec, "regression", REGRESS_METHOD, method_check
    )
    in_alias, out_aliases = _regression_io(sig, method_check)
    examples = examples_from_input(request.input)
    outputs = servable.call(key, {in_alias: examples}, out_aliases)
    resp = regression_pb2.RegressionResponse()
    _model_spec(resp.model_spec, request.model_spec, servable.version)
    _fill_regression(len(examples), outputs, resp.result)
    return resp


def multi_inference_model_spec(request):
    """The ModelSpec a MultiInferenceRequest is served from (its first task's)."""
    from tensorflow_serving.apis import model_pb2

    if request.tasks and request.tasks[0].HasField("model_spec"):
        return request.tasks[0].model_spec
    return model_pb2.ModelSpec()


def multi_inference(servable, request, method_check: bool = False):
    """MultiInferenceRequest -> MultiInferenceResponse: every task on the same examples.

    Validation is TF Serving's (one model name, no duplicate signature, classify or
    regress methods only). Each task's signature then runs on the same serialised
    examples; TF Serving runs the union of their outputs in one Session.run.
    """
    from tensorflow_serving.apis import inference_pb2

    model_name = ""
    seen: set[str] = set()
    plans = []
    for task in request.tasks:
        if not task.model_spec.name:
            raise _invalid("Found ModelSpec with an empty model name.")
        if not model_name:
            model_name = task.model_spec.name
        elif model_name != task.model_spec.name:
            raise _invalid(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        key = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if key in seen:
            raise _invalid(f"Duplicate evaluation of signature: {key}")
        seen.add(key)
        sig = servable.signature_defs.get(key)
        if sig is None:
            raise _invalid(f"Requested signature not found in model graph: {key}")
        if task.method_name == CLASSIFY_METHOD:
            io = _classification_io(sig, method_check)
        elif task.method_name == REGRESS_METHOD:
            io = _regression_io(sig, method_check)
        else:
            raise error("UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}")
        plans.append((task, key, io))
    examples = examples_from_input(request.input)
    resp = inference_pb2.MultiInferenceResponse()
    for task, key, (in_alias, out_aliases) in plans:
        outputs = servable.call(key, {in_alias: examples}, out_aliases)
        result = resp.results.add()
        if task.method_name == CLASSIFY_METHOD:
            _fill_classification(len(examples), outputs, result.classification_result)
        else:
            _fill_regression(len(examples), outputs, result.regression_result)
        _model_spec(result.model_spec, task.model_spec, servable.version)
    return resp


# --- REST JSON ---------------------------------------------------------------------------


def _json_type(v) -> str:
    if v is None:
        return "Null"
    if isinstance(v, bool):
        return "True" if v else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(v), "Number")


def _json_debug(v) -> str:
    text = json.dumps(v, separators=(",", ":"))
    return text if len(text) <= 200 else text[:200] + "..."


def _add_feature_value(val, name: str, feature) -> None:
    kind = feature.WhichOneof("kind")

    def incompatible():
        names = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}
        return _invalid(
            f"Unexpected element type in feature: {name} expecting type: "
            f"{names.get(kind, 'UNKNOWN')}"
        )

    def check(want: str):
        if kind not in (None, want):
            raise incompatible()

    if val is None or isinstance(val, list):
        raise _invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(val)}")
    if isinstance(val, bool):
        check("int64_list")
        feature.int64_list.value.append(1 if val else 0)
    elif isinstance(val, dict):
        if set(val) != {"b64"} or not isinstance(val["b64"], str):
            raise _invalid(
                f"Feature: {name} has element with unexpected JSON type: {_json_type(val)}"
            )
        check("bytes_list")
        try:
            feature.bytes_list.value.append(base64.b64decode(val["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise _invalid("Unable to base64 decode") from None
    elif isinstance(val, str):
        check("bytes_list")
        feature.bytes_list.value.append(val.encode("utf-8"))
    elif isinstance(val, float):
        check("float_list")
        feature.float_list.value.append(val)
    elif isinstance(val, int):
        check("int64_list")
        if val >= 2**63:
            raise _invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        if val < -(2**63):
            raise _invalid(f"Feature: {name} has element with unexpected JSON type: Number")
        feature.int64_list.value.append(val)


def _example_from_json(val, example) -> None:
    from tensorflow.core.example import feature_pb2

    if not isinstance(val, dict):
        raise _invalid(f"Example must be JSON object but got JSON {_json_type(val)}")
    for name, content in val.items():
        feature = feature_pb2.Feature()
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)
        example.features.feature[name].CopyFrom(feature)


def input_from_json(doc: Any):
    """A parsed REST `:classify` / `:regress` body -> (signature_name, Input proto).

    `doc` is the decoded JSON document (the caller parses the body with the server's
    JSON rules and checks it is an object)."""
    from tensorflow_serving.apis import input_pb2

    if not isinstance(doc, dict):
        raise _invalid(f"JSON Value: {_json_debug(doc)} Is not object")
    sig = doc.get("signature_name", "")
    if not isinstance(sig, str):
        raise _invalid(
            f"JSON Value: {_json_debug(doc)} not formatted correctly. 'signature_name' "
            "key must be a string value."
        )
    proto = input_pb2.Input()
    has_context = "context" in doc
    if has_context:
        _example_from_json(doc["context"], proto.example_list_with_context.context)
    if "examples" not in doc:
        # TF Serving says "classify" for :regress too (json_tensor.cc).
        raise _invalid(
            f"JSON Value: {_json_debug(doc)} When method is classify, key 'examples' "
            "is expected and was not found"
        )
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise _invalid(
            f"JSON Value: {_json_debug(doc)} Expecting 'examples' value to be an list/array"
        )
    if not examples:
        raise _invalid(f"JSON Value: {_json_debug(doc)} 'examples' value is an empty array")
    target = (
        proto.example_list_with_context.examples if has_context else proto.example_list.examples
    )
    for val in examples:
        _example_from_json(val, target.add())
    return sig, proto


def _float_json(value: float) -> str:
    from tfbn.serving import _tensor

    return _tensor.array_to_json(np.float32(value))


def classification_json(result) -> str:
    """ClassificationResult -> `{"results": [[[label, score], ...], ...]}`."""
    if not result.classifications:
        raise _invalid("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for row in result.classifications:
        rows.append(
            "["
            + ", ".join(f"[{json.dumps(c.label)}, {_float_json(c.score)}]" for c in row.classes)
            + "]"
        )
    return '{\n    "results": [\n        ' + ",\n        ".join(rows) + "\n    ]\n}"


def regression_json(result) -> str:
    """RegressionResult -> `{"results": [value, ...]}`."""
    if not result.regressions:
        raise _invalid("Cannot convert empty RegressionResults to JSON")
    values = ", ".join(_float_json(r.value) for r in result.regressions)
    return '{\n    "results": [' + values + "]\n}"


def rest_classify_regress(
    manager, verb: str, name: str, version: int | None, label: str | None, body: bytes
) -> str:
    """REST `:classify` / `:regress` (TF Serving's ProcessClassifyRequest and
    ProcessRegressRequest): JSON body -> request proto -> the same code as gRPC -> JSON."""
    from tensorflow_serving.apis import classification_pb2, regression_pb2
    from tfbn.serving._json_tensor import loads

    doc = loads(body)  # the server's JSON decoding, with TF Serving's parse messages
    signature_name, input_proto = input_from_json(doc)
    request = (
        classification_pb2.ClassificationRequest()
        if verb == "classify"
        else regression_pb2.RegressionRequest()
    )
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature_name
    request.input.CopyFrom(input_proto)
    check = manager.load_options.enable_signature_method_name_check
    with manager.use(name, version, label) as servable:
        if verb == "classify":
            return classification_json(classify(servable, request, check).result)
        return regression_json(regress(servable, request, check).result)
