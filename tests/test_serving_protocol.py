"""TF Serving's Classify / Regress / MultiInference, GetModelStatus with labels, version
labels, TF Lite and warm-up, on TF Serving's fixtures and on a `tfbn export` model.

The behaviours are those TF Serving's tensorflow_model_server_test.py asserts (and
classifier.cc / regressor.cc / multi_inference.cc / json_tensor.cc define); the code
here is the project's own. Every server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import os
import shutil

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from _serving_helpers import HALF_PLUS_TWO, HALF_PLUS_TWO_TF2, TESTDATA, TWO_VERSIONS
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tfbn.serving import _config, _tensor
from tfbn.serving._loading import LoadOptions
from tfbn.serving._metrics import MonitoringConfig
from tfbn.serving._status import ServingError
from tfbn.serving.server import DevServer

pytestmark = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing")

TFLITE = os.path.join(TESTDATA, "saved_model_half_plus_two_tflite")
TFLITE_SIGDEF = os.path.join(TESTDATA, "saved_model_half_plus_two_tflite_with_sigdef")
COUNTER = os.path.join(TESTDATA, "saved_model_counter")
CLASSIFY, REGRESS = "tensorflow/serving/classify", "tensorflow/serving/regress"
N_FEATURES, N_CLASSES = 4, 3


# --- a tfbn export with classify and regress signatures over tf.Examples --------------


def _export_with_example_signatures(base: str):
    """A Dense-BN-Dense model exported by tfbn.export_saved_model, with a `classify`
    signature (classes + scores) and a `regress` one, both parsing serialised tf.Examples
    with one float feature `features` of length 4, next to `serving_default`."""
    import keras

    from tfbn import export_saved_model

    keras.utils.set_random_seed(1)
    inp = keras.Input((N_FEATURES,), name="features")
    x = keras.layers.Dense(8)(inp)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inp, keras.layers.Dense(N_CLASSES)(x))
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8).astype("float32"))
    spec = {"features": tf.io.FixedLenFeature([N_FEATURES], tf.float32)}
    labels = tf.constant([[f"class_{i}".encode() for i in range(N_CLASSES)]])

    def classify(exported):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def fn(inputs):
            logits = exported(tf.io.parse_example(inputs, spec)["features"], training=False)
            n = tf.shape(logits)[0]
            return {"scores": tf.nn.softmax(logits), "classes": tf.tile(labels, [n, 1])}

        return fn

    def regress(exported):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def fn(inputs):
            logits = exported(tf.io.parse_example(inputs, spec)["features"], training=False)
            return {"outputs": logits[:, :1]}

        return fn

    rows = np.random.default_rng(0).standard_normal((6, N_FEATURES)).astype(np.float32)
    result = export_saved_model(
        model,
        base,
        sample_inputs=rows,
        model_name="bn",
        extra_signatures={"classify": classify, "regress": regress},
    )
    return model, result


@pytest.fixture(scope="module")
def bn_export(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("bn") / "bn")
    model, result = _export_with_example_signatures(base)
    return base, model, result


@pytest.fixture(scope="module")
def server(bn_export):
    models = [
        _config.ModelConfig("default", HALF_PLUS_TWO),
        _config.ModelConfig("tf2", HALF_PLUS_TWO_TF2),
        _config.ModelConfig(
            "two", TWO_VERSIONS, policy="all", labels={"stable": 123, "canary": 124}
        ),
        _config.ModelConfig("bn", bn_export[0]),
    ]
    with DevServer(
        models,
        port=0,
        rest_api_port=0,
        allow_version_labels_for_unavailable_models=True,
        monitoring=MonitoringConfig(enable=True),
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def _input(proto_input, xs, context=None):
    """Fill an Input proto with one example per x (feature `x`), optionally with context."""
    if context is not None:
        proto_input.example_list_with_context.context.CopyFrom(context)
        target = proto_input.example_list_with_context.examples
    else:
        target = proto_input.example_list.examples
    for x in xs:
        ex = target.add()
        if x is not None:
            ex.features.feature["x"].float_list.value.append(x)


def _classify_request(model, signature, xs, context=None):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    _input(req.input, xs, context)
    return req


def _regress_request(model, signature, xs):
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    _input(req.input, xs)
    return req


def _post(server, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.rest_url + path, data=data, timeout=30)


def _rpc_error(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value.code(), info.value.details()


# --- Classify / Regress / MultiInference over gRPC ----------------------------------------


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_grpc_classify_like_tf_serving(stub, model):
    resp = stub.Classify(_classify_request(model, "classify_x_to_y", [2.0]), timeout=30)
    assert len(resp.result.classifications) == 1
    assert [(c.label, c.score) for c in resp.result.classifications[0].classes] == [("", 3.0)]
    assert (
        resp.model_spec.name,
        resp.model_spec.signature_name,
        resp.model_spec.version.value,
    ) == (model, "classify_x_to_y", 123)
    resp = stub.Classify(_classify_request(model, "classify_x_to_y", [1.0, 2.0, 5.0]), timeout=30)
    assert [c.classes[0].score for c in resp.result.classifications] == [2.5, 3.0, 4.5]


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_grpc_regress_like_tf_serving(stub, model):
    resp = stub.Regress(_regress_request(model, "regress_x_to_y", [2.0]), timeout=30)
    assert [r.value for r in resp.result.regressions] == [3.0]
    assert (
        resp.model_spec.name,
        resp.model_spec.signature_name,
        resp.model_spec.version.value,
    ) == (model, "regress_x_to_y", 123)
    resp = stub.Regress(_regress_request(model, "regress_x_to_y2", [1.0, 5.0]), timeout=30)
    assert [r.value for r in resp.result.regressions] == [3.5, 5.5]  # y2 = 0.5 x + 3


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_grpc_multi_inference_like_tf_serving(stub, model):
    req = inference_pb2.MultiInferenceRequest()
    for sig, method in (("regress_x_to_y", REGRESS), ("classify_x_to_y", CLASSIFY)):
        task = req.tasks.add(method_name=method)
        task.model_spec.name = model
        task.model_spec.signature_name = sig
    _input(req.input, [2.0])
    resp = stub.MultiInference(req, timeout=30)
    assert len(resp.results) == 2
    assert resp.results[0].regression_result.regressions[0].value == 3.0
    assert resp.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for result, sig in zip(resp.results, ("regress_x_to_y", "classify_x_to_y"), strict=True):
        assert (
            result.model_spec.name,
            result.model_spec.signature_name,
            result.model_spec.version.value,
        ) == (model, sig, 123)


def test_context_is_merged_into_every_example(stub, server):
    # The context carries x; the examples carry nothing: every example sees x = 4.
    from tensorflow.core.example import example_pb2

    context = example_pb2.Example()
    context.features.feature["x"].float_list.value.append(4.0)
    resp = stub.Classify(
        _classify_request("default", "classify_x_to_y", [None, None], context), timeout=30
    )
    assert [c.classes[0].score for c in resp.result.classifications] == [4.0, 4.0]
    r = _post(
        server,
        "/v1/models/tf2:classify",
        {"signature_name": "classify_x_to_y", "context": {"x": 4.0}, "examples": [{}, {}]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"results": [[["", 4.0]], [["", 4.0]]]}


def test_grpc_errors_of_the_wrong_kind_of_signature(stub):
    code, msg = _rpc_error(stub.Classify, _classify_request("default", "serving_default", [2.0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("No classification inputs found in SignatureDef: inputs {")
    code, msg = _rpc_error(stub.Regress, _regress_request("tf2", "classify_x_to_y", [2.0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("No regression outputs found in SignatureDef: ")
    code, msg = _rpc_error(stub.Regress, _regress_request("default", "nope", [2.0]))
    assert (code, msg) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "No signature was found with the name: nope",
    )
    # No signature name: serving_default, a predict signature with input x.
    code, msg = _rpc_error(stub.Classify, _classify_request("default", "", [2.0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "No classification inputs found" in msg
    code, msg = _rpc_error(stub.Classify, _classify_request("default", "classify_x_to_y", []))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    code, msg = _rpc_error(stub.Classify, classification_pb2.ClassificationRequest())
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    code, msg = _rpc_error(stub.Classify, _classify_request("missing", "classify_x_to_y", [2.0]))
    assert code == grpc.StatusCode.NOT_FOUND and "Servable not found" in msg


def test_grpc_multi_inference_errors(stub):
    def request(*tasks):
        req = inference_pb2.MultiInferenceRequest()
        for model, sig, method in tasks:
            task = req.tasks.add(method_name=method)
            task.model_spec.name, task.model_spec.signature_name = model, sig
        _input(req.input, [2.0])
        return req

    cases = [
        (
            request(("default", "regress_x_to_y", REGRESS), ("tf2", "classify_x_to_y", CLASSIFY)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
        ),
        (
            request(("default", "regress_x_to_y", REGRESS), ("default", "regress_x_to_y", REGRESS)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Duplicate evaluation of signature: regress_x_to_y",
        ),
        (
            request(("default", "nope", REGRESS)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Requested signature not found in model graph: nope",
        ),
        (
            request(("default", "regress_x_to_y", "tensorflow/serving/predict")),
            grpc.StatusCode.UNIMPLEMENTED,
            "Unsupported signature method_name: tensorflow/serving/predict",
        ),
        (
            request(("", "regress_x_to_y", REGRESS)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ModelSpec has no name specified.",
        ),
    ]
    for req, want_code, want_msg in cases:
        code, msg = _rpc_error(stub.MultiInference, req)
        assert code == want_code, msg
        if want_msg is not None:
            assert msg == want_msg


def test_grpc_status_codes_of_the_servicers(server, stub, monkeypatch):
    """Every servicer method answers a request without a ModelSpec, a ValueError and an
    unexpected exception (a bug) with TF Serving's status codes, and keeps serving."""
    channel = grpc.insecure_channel(server.grpc_target)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    missing = (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    assert _rpc_error(stub.Regress, regression_pb2.RegressionRequest()) == missing
    assert (
        _rpc_error(models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest()) == missing
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    for raised, expected in [
        (ValueError("no such thing"), (grpc.StatusCode.INVALID_ARGUMENT, "no such thing")),
        (RuntimeError("a bug"), (grpc.StatusCode.INTERNAL, "RuntimeError: a bug")),
    ]:

        def fail(*args, raised=raised):
            raise raised

        monkeypatch.setattr(server.manager, "status", fail)
        assert _rpc_error(models.GetModelStatus, request) == expected
    monkeypatch.undo()
    assert models.GetModelStatus(request, timeout=30).model_version_status[0].version == 123
    channel.close()


def test_grpc_request_count_has_the_status_the_client_got(server, stub, monkeypatch):
    """The request_count metric's status label is the code the call was answered with,
    also when a ValueError or an unexpected exception became that code (as over REST)."""

    def count(status):
        value = server.metrics.registry.get_sample_value(
            ":tensorflow:serving:request_count_total",
            {"model_name": "default", "status": status},
        )
        return value or 0.0

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "default"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0]))
    for raised, code in [
        (ValueError("bad value"), grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
    ]:

        def fail(*args, raised=raised):
            raise raised

        monkeypatch.setattr(server.manager, "use", fail)
        before = {s: count(s) for s in (code.name, "UNKNOWN")}
        assert _rpc_error(stub.Predict, request)[0] == code
        assert count(code.name) == before[code.name] + 1
        assert count("UNKNOWN") == before["UNKNOWN"]


# --- REST :classify / :regress -----------------------------------------------------------


def test_rest_classify_and_regress_like_tf_serving(server):
    r = _post(
        server,
        "/v1/models/default:classify",
        {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"results": [[["", 3.0]]]}
    r = _post(
        server,
        "/v1/models/default:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"results": [3.0]}
    r = _post(
        server,
        "/v1/models/tf2:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": [1.0]}, {"x": 5.0}]},
    )
    assert r.json() == {"results": [2.5, 4.5]}
    r = _post(
        server,
        "/v1/models/two/versions/123:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert r.json() == {"results": [3.0]}


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"signature_name": "serving_default", "examples": [{"x": 2.0}]},
            "No classification inputs found in SignatureDef",
        ),
        ({"examples": [{"x": 2.0}]}, "No classification inputs found in SignatureDef"),
        (
            {"signature_name": "classify_x_to_y"},
            "When method is classify, key 'examples' is expected and was not found",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": {"x": 2.0}},
            "Expecting 'examples' value to be an list/array",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": []},
            "'examples' value is an empty array",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": [[2.0]]},
            "Example must be JSON object but got JSON Array",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": [{"x": [2.0, 3]}]},
            "Unexpected element type in feature: x expecting type: float",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": [{"x": None}]},
            "Feature: x has element with unexpected JSON type: Null",
        ),
        (
            {"signature_name": "classify_x_to_y", "examples": [{"x": [[2.0]]}]},
            "Feature: x has element with unexpected JSON type: Array",
        ),
        (
            {"signature_name": 7, "examples": [{"x": 2.0}]},
            "'signature_name' key must be a string value.",
        ),
        (
            {"signature_name": "nope", "examples": [{"x": 2.0}]},
            "No signature was found with the name: nope",
        ),
    ],
)
def test_rest_classify_errors(server, body, message):
    r = _post(server, "/v1/models/default:classify", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_rest_regress_on_a_classification_signature_is_400(server):
    r = _post(
        server,
        "/v1/models/default:regress",
        {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("No regression outputs found in SignatureDef")
    r = _post(server, "/v1/models/default:regress", b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("JSON Parse error")


def test_tf_example_features_of_every_kind(server):
    # int64 (ints and booleans), bytes (text and b64) and floats become the Example's
    # feature lists; the half_plus_two graph reads only x, the rest must parse.
    r = _post(
        server,
        "/v1/models/default:regress",
        {
            "signature_name": "regress_x_to_y",
            "examples": [{"x": 2.0, "n": [1, True], "s": "text", "b": {"b64": "AAE="}}],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"results": [3.0]}
    r = _post(
        server,
        "/v1/models/default:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0, "n": 2**64 - 1}]},
    )
    assert r.status_code == 400
    assert r.json()["error"] == "Feature: n has uint64_t element. Only int64_t is supported."


# --- a model tfbn export wrote, with tf.Example signatures ------------------------------


def _bn_examples(rows):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "bn"
    req.model_spec.signature_name = "classify"
    for row in rows:
        req.input.example_list.examples.add().features.feature["features"].float_list.value.extend(
            row.tolist()
        )
    return req


def test_classify_and_regress_a_tfbn_export(server, stub, bn_export):
    _, model, _ = bn_export
    rows = np.random.default_rng(5).standard_normal((5, N_FEATURES)).astype(np.float32)
    logits = model(rows, training=False).numpy()
    scores = tf.nn.softmax(logits).numpy()

    resp = stub.Classify(_bn_examples(rows), timeout=30)
    got = np.array([[c.score for c in row.classes] for row in resp.result.classifications])
    labels = [[c.label for c in row.classes] for row in resp.result.classifications]
    np.testing.assert_allclose(got, scores, rtol=1e-4, atol=1e-6)
    assert labels == [[f"class_{i}" for i in range(N_CLASSES)]] * len(rows)

    req = regression_pb2.RegressionRequest()
    req.model_spec.name, req.model_spec.signature_name = "bn", "regress"
    req.input.CopyFrom(_bn_examples(rows).input)
    resp = stub.Regress(req, timeout=30)
    np.testing.assert_allclose(
        [r.value for r in resp.result.regressions], logits[:, 0], rtol=1e-4, atol=1e-5
    )

    r = _post(
        server,
        "/v1/models/bn:classify",
        {"signature_name": "classify", "examples": [{"features": rows[0].tolist()}]},
    )
    assert r.status_code == 200, r.text
    ((row,),) = [r.json()["results"]]
    assert [c[0] for c in row] == [f"class_{i}" for i in range(N_CLASSES)]
    np.testing.assert_allclose([c[1] for c in row], scores[0], rtol=1e-4, atol=1e-6)
    # Its serving_default is a predict signature: Classify says so with TF Serving's words.
    code, msg = _rpc_error(stub.Classify, _classify_request("bn", "", [1.0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "No classification inputs found" in msg


# --- GetModelStatus and version labels ----------------------------------------------------


def test_get_model_status_with_a_label_returns_every_version(server):
    channel = grpc.insecure_channel(server.grpc_target)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    for label in ("stable", "canary", "no-such-label"):
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "two"
        req.model_spec.version_label = label
        resp = stub.GetModelStatus(req, timeout=30)
        assert sorted(s.version for s in resp.model_version_status) == [123, 124]
        r = requests.get(f"{server.rest_url}/v1/models/two/labels/{label}", timeout=30)
        assert r.status_code == 200, r.text
        assert sorted(s["version"] for s in r.json()["model_version_status"]) == ["123", "124"]
    channel.close()
    # A label still picks its version for inference.
    r = _post(server, "/v1/models/two/labels/stable:predict", {"instances": [1.0]})
    assert r.json() == {"predictions": [2.5]}


def test_labels_need_available_versions_unless_allowed():
    cfg = [_config.ModelConfig("two", TWO_VERSIONS, policy="all", labels={"stable": 123})]
    with pytest.raises(ServingError) as info:
        DevServer(cfg, port=0, rest_api_port=None)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.message == (
        "Request to assign label to version 123 of model two, which is "
        "not currently available for inference"
    )
    # Allowed: a label may even point at a version that never loads; using it is NOT_FOUND.
    cfg = [_config.ModelConfig("two", TWO_VERSIONS, policy="all", labels={"future": 999})]
    with DevServer(
        cfg,
        port=0,
        rest_api_port=0,
        allow_version_labels_for_unavailable_models=True,
        file_system_poll_wait_seconds=0,
    ) as srv:
        r = _post(srv, "/v1/models/two/labels/future:predict", {"instances": [1.0]})
        assert r.status_code == 404
        assert r.json() == {"error": "Servable not found for request: Specific(two, 999)"}


def test_reloaded_labels_may_point_at_loaded_versions(tmp_path):
    cfg = [_config.ModelConfig("two", TWO_VERSIONS, policy="all")]
    with DevServer(cfg, port=None, rest_api_port=0, file_system_poll_wait_seconds=0) as srv:
        srv.manager.reload_config(
            [_config.ModelConfig("two", TWO_VERSIONS, policy="all", labels={"stable": 123})]
        )
        r = _post(srv, "/v1/models/two/labels/stable:predict", {"instances": [1.0]})
        assert r.status_code == 200 and r.json() == {"predictions": [2.5]}
        # Moving a label to a version that is not loaded is refused; the old one stays.
        with pytest.raises(ServingError, match="not currently available"):
            srv.manager.reload_config(
                [_config.ModelConfig("two", TWO_VERSIONS, policy="all", labels={"stable": 125})]
            )
        r = _post(srv, "/v1/models/two/labels/stable:predict", {"instances": [1.0]})
        assert r.status_code == 200


# --- method-name check ----------------------------------------------------------------------


def test_signature_method_name_check(tmp_path):
    models = [
        _config.ModelConfig("default", HALF_PLUS_TWO),
        _config.ModelConfig("tf2", HALF_PLUS_TWO_TF2),
    ]
    options = LoadOptions(enable_signature_method_name_check=True)
    with DevServer(
        models, port=0, rest_api_port=None, load_options=options, file_system_poll_wait_seconds=0
    ) as srv:
        channel = grpc.insecure_channel(srv.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # TF1 signatures carry the classify method name: fine.
        resp = stub.Classify(_classify_request("default", "classify_x_to_y", [2.0]), timeout=30)
        assert resp.result.classifications[0].classes[0].score == 3.0
        # TF2 exports say "predict" everywhere, which the check rejects.
        code, msg = _rpc_error(stub.Classify, _classify_request("tf2", "classify_x_to_y", [2.0]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert msg == (
            "Expected classification signature method_name to be "
            "tensorflow/serving/classify. Was: tensorflow/serving/predict"
        )
        code, msg = _rpc_error(stub.Regress, _regress_request("tf2", "regress_x_to_y", [2.0]))
        assert msg == (
            "Expected regression signature method_name to be "
            "tensorflow/serving/regress. Was: tensorflow/serving/predict"
        )
        channel.close()


# --- TF Lite --------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [TFLITE, TFLITE_SIGDEF], ids=["generated", "sigdef"])
def test_tflite_model_like_tf_serving(base):
    options = LoadOptions(prefer_tflite_model=True)
    with DevServer(
        [_config.ModelConfig("default", base)],
        port=0,
        rest_api_port=0,
        load_options=options,
        file_system_poll_wait_seconds=0,
    ) as srv:
        channel = grpc.insecure_channel(srv.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for specify_output in (True, False):
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "default"
            req.model_spec.signature_name = "serving_default"
            req.inputs["x"].CopyFrom(
                _tensor.to_tensor_proto(np.array([2.0], np.float32), typed_fields=True)
            )
            if specify_output:
                req.output_filter.append("y")
            resp = stub.Predict(req, timeout=30)
            assert list(resp.outputs["y"].float_val) == [3.0]
            assert resp.outputs["y"].dtype == 1  # DT_FLOAT
            assert (resp.model_spec.signature_name, resp.model_spec.version.value) == (
                "serving_default",
                123,
            )
        channel.close()
        r = _post(srv, "/v1/models/default:predict", {"instances": [[1.0], [2.0], [5.0]]})
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": [[2.5], [3.0], [4.5]]}
        meta = requests.get(srv.rest_url + "/v1/models/default/metadata", timeout=30).json()
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert set(sig["inputs"]) == {"x"} and set(sig["outputs"]) == {"y"}
        assert sig["method_name"] == "tensorflow/serving/predict"


def test_tflite_is_used_only_when_preferred(tmp_path):
    # A version with both files serves the SavedModel unless --prefer_tflite_model.
    version = tmp_path / "both" / "123"
    shutil.copytree(os.path.join(HALF_PLUS_TWO, "00000123"), version)
    shutil.copy(os.path.join(TFLITE_SIGDEF, "00000123", "model.tflite"), version)
    base = str(tmp_path / "both")
    for prefer, signatures in ((False, 5), (True, 1)):
        with DevServer(
            [_config.ModelConfig("m", base)],
            port=None,
            rest_api_port=0,
            load_options=LoadOptions(prefer_tflite_model=prefer),
            file_system_poll_wait_seconds=0,
        ) as srv:
            meta = requests.get(srv.rest_url + "/v1/models/m/metadata", timeout=30).json()
            assert len(meta["metadata"]["signature_def"]["signature_def"]) == signatures
            r = _post(srv, "/v1/models/m:predict", {"instances": [[2.0]]})
            assert r.json() == {"predictions": [[3.0]]}


def test_tflite_fixture_without_prefer_flag_fails_to_load():
    # No saved_model.pb and the flag off: TF Serving cannot load it either.
    with DevServer(
        [_config.ModelConfig("default", TFLITE)],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    ) as srv:
        status = requests.get(srv.rest_url + "/v1/models/default", timeout=30).json()
        (version,) = status["model_version_status"]
        assert version["state"] == "END" and version["status"]["error_code"] == "NOT_FOUND"


# --- warm-up -----------------------------------------------------------------------------


def _counter_with_warmup(tmp_path, records) -> str:
    base = tmp_path / "counter"
    shutil.copytree(COUNTER, base)
    extra = base / "00000123" / "assets.extra"
    extra.mkdir()
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for record in records:
            writer.write(record if isinstance(record, bytes) else record.SerializeToString())
    return str(base)


def _incr_by(delta: float, signature="incr_counter_by"):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "counter"
    req.model_spec.signature_name = signature
    req.inputs["delta"].CopyFrom(_tensor.to_tensor_proto(np.array(delta, np.float32)))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=req))


def _counter_value(srv) -> float:
    channel = grpc.insecure_channel(srv.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = "counter", "get_counter"
    value = float(_tensor.from_tensor_proto(stub.Predict(req, timeout=30).outputs["output"]))
    channel.close()
    return value


@pytest.mark.parametrize(
    "options, expected",
    [
        (LoadOptions(), 2.0 + 3.0),
        (LoadOptions(num_request_iterations_for_warmup=3), 3 * (2.0 + 3.0)),
        (LoadOptions(enable_model_warmup=False), 0.0),
    ],
    ids=["default", "three-iterations", "disabled"],
)
def test_warmup_replays_records_before_the_version_serves(tmp_path, options, expected):
    base = _counter_with_warmup(tmp_path, [_incr_by(2.0), _incr_by(3.0)])
    with DevServer(
        [_config.ModelConfig("counter", base)],
        port=0,
        rest_api_port=None,
        load_options=options,
        file_system_poll_wait_seconds=0,
    ) as srv:
        assert _counter_value(srv) == expected


@pytest.mark.parametrize(
    "record, message",
    [
        (
            _incr_by(1.0, signature="nope"),
            'Serving signature name: "nope" not found in signature def',
        ),
        (b"not a PredictionLog \xff\xff", "Failed to parse warmup record"),
        (prediction_log_pb2.PredictionLog(), "Unsupported log_type for warmup: None"),
    ],
    ids=["bad-signature", "garbage", "empty-log"],
)
def test_failing_warmup_keeps_the_version_from_serving(tmp_path, record, message):
    base = _counter_with_warmup(tmp_path, [record])
    with DevServer(
        [_config.ModelConfig("counter", base)],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    ) as srv:
        status = requests.get(srv.rest_url + "/v1/models/counter", timeout=30).json()
        (version,) = status["model_version_status"]
        assert version["state"] == "END"
        assert message in version["status"]["error_message"]
        r = _post(
            srv, "/v1/models/counter:predict", {"signature_name": "get_counter", "instances": [1.0]}
        )
        assert r.status_code != 200
    # The same directory loads with warm-up off.
    with DevServer(
        [_config.ModelConfig("counter", base)],
        port=0,
        rest_api_port=None,
        load_options=LoadOptions(enable_model_warmup=False),
        file_system_poll_wait_seconds=0,
    ) as srv:
        assert _counter_value(srv) == 0.0


def test_too_many_warmup_records_fail_the_load(tmp_path):
    base = _counter_with_warmup(tmp_path, [_incr_by(0.0)] * 1001)
    with DevServer(
        [_config.ModelConfig("counter", base)],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    ) as srv:
        (version,) = requests.get(srv.rest_url + "/v1/models/counter", timeout=30).json()[
            "model_version_status"
        ]
        assert (
            "Number of warmup records exceeds the maximum (1000)"
            in version["status"]["error_message"]
        )


def test_warmup_of_a_tfbn_export_runs_and_is_measured(server, bn_export):
    # The export wrote warm-up records (PredictLogs); the server replayed them when it
    # loaded the version, and the Prometheus page counts one OK warm-up for its path.
    _, _, result = bn_export
    page = requests.get(server.rest_url + "/monitoring/prometheus/metrics", timeout=30).text
    line = next(
        ln
        for ln in page.splitlines()
        if ln.startswith(":tensorflow:serving:model_warmup_latency_count") and result.path in ln
    )
    assert 'status="OK"' in line and line.endswith(" 1.0")
