"""The development server against TF Serving's own fixtures and behaviours.

Every server binds 127.0.0.1 on a free port (port 0) and is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from _serving_helpers import (
    BAD,
    HALF_PLUS_THREE,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    INPUT,
    MATRIX,
    OUTPUT,
    TESTDATA,
    TWO_VERSIONS,
    copy_version,
    examples,
    export_bn_models,
)
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tfbn.serving import _config, _tensor
from tfbn.serving.server import DevServer, ServingError, http_status

pytestmark = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing")


@pytest.fixture(scope="module")
def server():
    models = [
        _config.ModelConfig("default", HALF_PLUS_TWO),
        _config.ModelConfig("tf2", HALF_PLUS_TWO_TF2),
        _config.ModelConfig("two", TWO_VERSIONS, labels={"stable": 124}),
        _config.ModelConfig("bad", BAD),
        _config.ModelConfig("matrix", MATRIX),
    ]
    # Labels in the first config need the flag, as in TF Serving.
    with DevServer(
        models,
        port=0,
        rest_api_port=0,
        max_request_bytes=64 * 1024,
        allow_version_labels_for_unavailable_models=True,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )
    channel.close()


def post(server, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.rest_url + path, data=data, timeout=10, **kw)


def get(server, path):
    return requests.get(server.rest_url + path, timeout=10)


# --- REST conformance: the answers TF Serving's own tests assert -----------------------


@pytest.mark.parametrize("model", ["default", "tf2"])
def test_rest_predict_row_format(server, model):
    r = post(server, f"/v1/models/{model}:predict", {"instances": [1.0, 2.0, 5.0]})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"predictions": [2.5, 3.0, 4.5]}
    r = post(server, f"/v1/models/{model}:predict", {"instances": [2.0, 3.0, 4.0]})
    assert r.json() == {"predictions": [3.0, 3.5, 4.0]}


def test_rest_predict_columnar_format(server):
    r = post(server, "/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]})
    assert r.status_code == 200 and r.json() == {"outputs": [3.0, 3.5, 4.0]}
    r = post(server, "/v1/models/default:predict", {"inputs": {"x": [[2.0], [3.0]]}})
    assert r.json() == {"outputs": [[3.0], [3.5]]}
    r = post(
        server,
        "/v1/models/default:predict",
        {"signature_name": "serving_default", "instances": [{"x": [1.0]}, {"x": [5.0]}]},
    )
    assert r.json() == {"predictions": [[2.5], [4.5]]}


def test_rest_status_json(server):
    r = get(server, "/v1/models/default")
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {
                "version": "123",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert get(server, "/v1/models/default/versions/123").json() == r.json()


def test_rest_metadata_equals_tf_serving_json(server):
    with open(os.path.join(TESTDATA, "half_plus_two_model_metadata.json")) as f:
        expected = json.load(f)
    r = get(server, "/v1/models/default/metadata")
    assert r.status_code == 200
    assert r.json() == expected  # dict equality: order-insensitive
    with open(
        os.path.join(TESTDATA, "saved_model_half_plus_two_tf2_2_versions_metadata.json")
    ) as f:
        tf2 = json.load(f)
    got = get(server, "/v1/models/tf2/metadata").json()
    # That file describes the TF2 two-version export (other tensor names); the signatures,
    # dtypes and shapes are the ones of the TF2 half_plus_two we serve.
    got_sigs, want_sigs = (d["metadata"]["signature_def"]["signature_def"] for d in (got, tf2))
    assert set(got_sigs) == set(want_sigs)
    for key, sig in want_sigs.items():
        for side in ("inputs", "outputs"):
            assert {a: (t["dtype"], t["tensor_shape"]) for a, t in got_sigs[key][side].items()} == {
                a: (t["dtype"], t["tensor_shape"]) for a, t in sig[side].items()
            }
    assert got["model_spec"] == {"name": "tf2", "signature_name": "", "version": "123"}


def test_two_versions_serves_latest_and_pins_versions(server):
    status = get(server, "/v1/models/two").json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("124", "AVAILABLE")]
    assert get(server, "/v1/models/two/metadata").json()["model_spec"]["version"] == "124"
    assert (
        get(server, "/v1/models/two/labels/stable/metadata").json()["model_spec"]["version"]
        == "124"
    )
    r = post(server, "/v1/models/two/versions/124:predict", {"instances": [1.0]})
    assert r.json() == {"predictions": [2.5]}
    r = post(server, "/v1/models/two/versions/123:predict", {"instances": [1.0]})
    assert r.status_code == 404
    assert r.json() == {"error": "Servable not found for request: Specific(two, 123)"}


def test_bad_model_fails_cleanly(server, stubs):
    status = get(server, "/v1/models/bad").json()["model_version_status"]
    assert status[0]["version"] == "123" and status[0]["state"] == "END"
    assert status[0]["status"]["error_code"] == "NOT_FOUND"
    assert "Could not find SavedModel .pb" in status[0]["status"]["error_message"]
    r = post(server, "/v1/models/bad:predict", {"instances": [1.0]})
    assert r.status_code == 400 and "failed to load" in r.json()["error"]
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "bad"
    req.inputs["x"].CopyFrom(_float_tensor([2.0]))
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].Predict(req, timeout=5)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # ... and the rest of the server is unaffected
    assert post(server, "/v1/models/default:predict", {"instances": [1.0]}).status_code == 200


def test_batching_fixture_matrix_model(server):
    x = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    r = post(server, "/v1/models/matrix:predict", {"instances": x.tolist()})
    assert np.array_equal(np.asarray(r.json()["predictions"], np.float32), x * 0.5 + 2)


# --- REST errors: TF Serving's messages and HTTP statuses ------------------------------


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        (
            "/v1/models/nosuch:predict",
            {"instances": [1.0]},
            404,
            "Servable not found for request: Latest(nosuch)",
        ),
        (
            "/v1/models/default/versions/999:predict",
            {"instances": [1.0]},
            404,
            "Servable not found for request: Specific(default, 999)",
        ),
        (
            "/v1/models/two/labels/canary:predict",
            {"instances": [1.0]},
            400,
            "Unrecognized servable version label: canary",
        ),
        ("/v1/models/default:predict", b"{not json", 400, "JSON Parse error"),
        ("/v1/models/default:predict", b"", 400, "JSON Parse error: The document is empty"),
        ("/v1/models/default:predict", b"[1, 2]", 400, "Is not object"),
        (
            "/v1/models/default:predict",
            {"instances": ["a", "b"]},
            400,
            "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"a\" "
            "Type: String is not of expected type: float",
        ),
        (
            "/v1/models/default:predict",
            {"inputs": [[1.0], [True]]},
            400,
            "JSON Value: true Type: True is not of expected type: float",
        ),
        (
            "/v1/models/default:predict",
            {"instances": [{"y": 1.0}]},
            400,
            "JSON object: does not have named input: y",
        ),
        (
            "/v1/models/default:predict",
            {"inputs": {"y": [1.0]}},
            400,
            "Missing named input: x in 'inputs' object.",
        ),
        (
            "/v1/models/default:predict",
            {"instances": [1.0], "inputs": [1.0]},
            400,
            "expecting only one of 'inputs' or 'instances' keys to exist",
        ),
        ("/v1/models/default:predict", {"instances": []}, 400, "No values in 'instances' array"),
        ("/v1/models/default:predict", {"foo": 1}, 400, "Missing 'inputs' or 'instances' key"),
        (
            "/v1/models/default:predict",
            {"instances": [[1.0], [1.0, 2.0]]},
            400,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 1 but got: 2",
        ),
        (
            "/v1/models/default:predict",
            {"signature_name": "nope", "instances": [1.0]},
            400,
            'Serving signature name: "nope" not found in signature def',
        ),
        (
            "/v1/models/default:predict",
            {"signature_name": 7, "instances": [1.0]},
            400,
            "'signature_name' key must be a string value.",
        ),
        ("/v1/models/default:regress", {"examples": []}, 400, "'examples' value is an empty array"),
        (
            "/v1/models/default/metadata:predict",
            {"instances": [1.0]},
            400,
            "Malformed request: POST",
        ),
    ],
)
def test_rest_errors(server, path, body, status, message):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert message in r.json()["error"]
    assert http_status(grpc.StatusCode.NOT_FOUND) == 404  # the mapping itself, for the record


@pytest.mark.parametrize(
    "path,status,message",
    [
        ("/v1/models/nosuch", 404, "Could not find any versions of model nosuch"),
        ("/v1/models/default/versions/9", 404, "Could not find version 9 of model default"),
        ("/v1/models/nosuch/metadata", 404, "Servable not found for request: Latest(nosuch)"),
        ("/v1/models", 400, "Missing model name in request."),
        ("/v1/models/default:predict", 400, "Malformed request: GET /v1/models/default:predict"),
        ("/v2/models/default", 404, "Not found"),
    ],
)
def test_rest_get_errors(server, path, status, message):
    r = get(server, path)
    assert r.status_code == status and message in r.json()["error"]


def test_rest_oversize_body_is_refused_and_server_keeps_serving(server):
    body = json.dumps({"instances": [1.0] * 20000}).encode()
    assert len(body) > server.max_request_bytes
    r = post(server, "/v1/models/default:predict", body)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    assert post(server, "/v1/models/default:predict", {"instances": [1.0]}).json() == {
        "predictions": [2.5]
    }


def test_malformed_http_and_json_do_not_stop_the_server(server):
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"POST /v1/models/default:predict HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"\x00\xff\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as s:
            s.sendall(raw)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0] + b" "
    deep = b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert post(server, "/v1/models/default:predict", deep).status_code in (400, 413)
    assert post(server, "/v1/models/default:predict", {"instances": [1.0]}).status_code == 200


# --- gRPC conformance ------------------------------------------------------------------


def _float_tensor(values, shape=None):
    t = predict_pb2.PredictRequest().inputs["x"]
    t.dtype = types_pb2.DT_FLOAT
    t.float_val.extend(values)
    for d in shape or [len(values)]:
        t.tensor_shape.dim.add().size = d
    return t


@pytest.mark.parametrize("specify_output", [True, False])
def test_grpc_predict_like_tf_serving_test(stubs, specify_output):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "default"
    req.inputs["x"].CopyFrom(_float_tensor([2.0], [1]))
    if specify_output:
        req.output_filter.append("y")
    result = stubs[0].Predict(req, timeout=5)
    assert "y" in result.outputs
    assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert list(result.outputs["y"].float_val) == [3.0]
    assert result.model_spec.name == "default"
    assert result.model_spec.signature_name == "serving_default"
    assert result.model_spec.version.value == 123


def test_grpc_model_status_and_metadata(stubs):
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "default"
    result = stubs[1].GetModelStatus(req, timeout=5)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == 123
    assert result.model_version_status[0].status.error_code == 0
    mreq = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    mreq.model_spec.name = "two"
    meta = stubs[0].GetModelMetadata(mreq, timeout=5)
    assert meta.model_spec.version.value == 124
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(sig_map)
    assert sig_map.signature_def["serving_default"].inputs["x"].dtype == types_pb2.DT_FLOAT
    mreq.metadata_field[:] = ["bogus"]
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].GetModelMetadata(mreq, timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "Metadata field bogus is not supported"


def _predict_error(stubs, req):
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].Predict(req, timeout=5)
    return err.value.code(), err.value.details()


def test_grpc_errors(stubs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "nosuch"
    req.inputs["x"].CopyFrom(_float_tensor([1.0]))
    assert _predict_error(stubs, req) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest(nosuch)",
    )
    req.model_spec.name = "default"
    req.model_spec.version.value = 7
    assert _predict_error(stubs, req) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Specific(default, 7)",
    )
    req.model_spec.ClearField("version")
    req.inputs["z"].CopyFrom(_float_tensor([1.0]))
    code, msg = _predict_error(stubs, req)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(
        "input size does not match signature"
    )
    del req.inputs["x"]
    assert _predict_error(stubs, req) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input tensor alias not found in signature: z. Inputs expected to be in the set {x}.",
    )
    del req.inputs["z"]
    req.inputs["x"].dtype = types_pb2.DT_STRING
    req.inputs["x"].string_val.append(b"a")
    req.inputs["x"].tensor_shape.dim.add().size = 1
    assert _predict_error(stubs, req) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be float but string is provided",
    )
    req.inputs["x"].CopyFrom(_float_tensor([1.0]))
    req.output_filter.append("nope")
    code, msg = _predict_error(stubs, req)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found" in msg
    del req.output_filter[:]
    req.model_spec.signature_name = "missing"
    code, msg = _predict_error(stubs, req)
    assert msg == 'Serving signature name: "missing" not found in signature def'
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].Classify(classification_pb2.ClassificationRequest(), timeout=5)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Missing ModelSpec",
    )


def test_grpc_oversize_message(server, stubs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "default"
    req.inputs["x"].CopyFrom(_float_tensor([1.0] * 40000))
    code, _ = _predict_error(stubs, req)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    req.inputs["x"].CopyFrom(_float_tensor([1.0]))
    assert list(stubs[0].Predict(req, timeout=5).outputs["y"].float_val) == [2.5]


# --- versions, polling, config files -----------------------------------------------------


@pytest.mark.parametrize(
    "batching",
    [None, _config.BatchingParameters(max_batch_size=4, batch_timeout_micros=2000)],
    ids=["plain", "batching"],
)
def test_new_versions_are_picked_up_without_failing_requests(tmp_path, batching):
    """In-flight requests finish on the version they started on (it is unloaded after)."""
    base = str(tmp_path / "hp")
    copy_version(os.path.join(HALF_PLUS_TWO, "00000123"), base, 1)
    models = [_config.ModelConfig("m", base)]
    with DevServer(
        models, port=None, rest_api_port=0, file_system_poll_wait_seconds=0.1, batching=batching
    ) as srv:
        errors, answers, stop = [], set(), threading.Event()

        def hammer():
            with requests.Session() as s:
                while not stop.is_set():
                    r = s.post(
                        srv.rest_url + "/v1/models/m:predict",
                        data=b'{"instances": [2.0]}',
                        timeout=10,
                    )
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        answers.add(r.json()["predictions"][0])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            copy_version(os.path.join(HALF_PLUS_THREE, "00000123"), base, 2)
            _wait_for(
                lambda: (
                    post(srv, "/v1/models/m:predict", {"instances": [2.0]}).json()
                    == {"predictions": [4.0]}
                )
            )
            # a broken newer version: loading fails, version 2 keeps serving
            os.makedirs(os.path.join(base, "3"))
            with open(os.path.join(base, "3", "saved_model.pb"), "wb") as f:
                f.write(b"not a protobuf")
            _wait_for(lambda: get(srv, "/v1/models/m/versions/3").status_code == 200)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert answers == {3.0, 4.0}
        status = {s["version"]: s for s in get(srv, "/v1/models/m").json()["model_version_status"]}
        assert status["3"]["state"] == "END" and status["3"]["status"]["error_code"] != "OK"
        assert status["2"]["state"] == "AVAILABLE"
        assert status["1"]["state"] == "END" and status["1"]["status"]["error_code"] == "OK"
        assert post(srv, "/v1/models/m:predict", {"instances": [2.0]}).json() == {
            "predictions": [4.0]
        }


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_model_config_file_and_specific_versions(tmp_path):
    with open(os.path.join(TESTDATA, "good_model_config.txt")) as f:
        text = (
            f.read()
            .replace("${TEST_HALF_PLUS_TWO_DIR}", HALF_PLUS_TWO)
            .replace("${TEST_HALF_PLUS_THREE_DIR}", HALF_PLUS_THREE)
        )
    cfg = tmp_path / "models.config"
    cfg.write_text(text)
    models = _config.load_model_config_file(cfg)
    assert [m.name for m in models] == ["half_plus_two", "half_plus_three"]
    spec = _config.parse_model_config(
        f'model_config_list {{ config {{ name: "two" base_path: "{TWO_VERSIONS}" '
        "model_version_policy { specific { versions: 123 } } "
        'version_labels { key: "old" value: 123 } } }'
    )
    with DevServer(
        models + spec, port=0, rest_api_port=None, allow_version_labels_for_unavailable_models=True
    ) as srv:
        channel = grpc.insecure_channel(srv.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for name, expected in (("half_plus_two", 3.0), ("half_plus_three", 4.0), ("two", 3.0)):
            req = predict_pb2.PredictRequest()
            req.model_spec.name = name
            req.inputs["x"].CopyFrom(_float_tensor([2.0]))
            assert list(stub.Predict(req, timeout=5).outputs["y"].float_val) == [expected]
        req.model_spec.version_label = "old"
        assert stub.Predict(req, timeout=5).model_spec.version.value == 123
        channel.close()


def test_bad_config_files_are_rejected_with_tf_serving_messages(tmp_path):
    with pytest.raises(
        ValueError, match="Error parsing text-format tensorflow.serving.ModelServerConfig"
    ):
        _config.load_model_config_file(os.path.join(TESTDATA, "bad_model_config.txt"))
    params = _config.load_batching_parameters(os.path.join(TESTDATA, "batching_config.txt"))
    assert (
        params.max_batch_size,
        params.batch_timeout_micros,
        params.num_batch_threads,
        params.max_enqueued_batches,
    ) == (128, 0, 8, 1000000)
    with pytest.raises(ValueError, match="no field named"):
        _config.parse_batching_parameters("max_batch_sizes { value: 1 }")
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        _config.parse_batching_parameters("max_batch_size { value: 8 } allowed_batch_sizes: 4")
    with pytest.raises(ValueError, match="increase monotonically"):
        _config.parse_batching_parameters(
            "max_batch_size { value: 8 } allowed_batch_sizes: 8 "
            "allowed_batch_sizes: 4 allowed_batch_sizes: 8"
        )


# --- batching emulation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_models(tmp_path_factory):
    return export_bn_models(str(tmp_path_factory.mktemp("bn")))


def test_batching_pads_with_copies_of_a_real_row(bn_models):
    from tfbn.serving.server import Servable, _Batcher

    params = _config.BatchingParameters(
        max_batch_size=8, batch_timeout_micros=0, allowed_batch_sizes=(4, 8)
    )
    servable = Servable("m", 1, os.path.join(bn_models["training"], "1"))
    x = examples(3)[INPUT]
    direct = servable.call("serving_default", {INPUT: np.concatenate([x, x[:1]])}, [OUTPUT])[OUTPUT]
    servable.batcher = _Batcher(params)
    try:
        _, out = servable.run("serving_default", {INPUT: x})
        assert servable.batcher.batch_sizes == {4: 1}
        # training-mode BN saw the padded batch of 4: rows 0..2 of [x, x[0]]
        np.testing.assert_array_equal(out[OUTPUT], direct[:3])
        with pytest.raises(
            ServingError, match="Task size 9 is larger than maximum input batch size 8"
        ):
            servable.run("serving_default", {INPUT: examples(9)[INPUT]})
    finally:
        servable.close()


def test_server_side_batching_mixes_concurrent_requests(bn_models):
    from tfbn.serving.client import GrpcClient

    params = _config.BatchingParameters(
        max_batch_size=8,
        batch_timeout_micros=100_000,
        allowed_batch_sizes=(2, 4, 8),
        num_batch_threads=2,
    )
    models = [
        _config.ModelConfig("training", bn_models["training"]),
        _config.ModelConfig("frozen", bn_models["frozen"]),
    ]
    x = examples(8)[INPUT]
    with DevServer(models, port=0, rest_api_port=None, batching=params) as srv:
        for name in ("training", "frozen"):
            client = GrpcClient(srv.grpc_target, name, timeout=10)
            alone = [client.predict({INPUT: x[i : i + 1]})[OUTPUT] for i in range(8)]
            barrier = threading.Barrier(8)

            def one(i, client=client, barrier=barrier):
                barrier.wait()
                return client.predict({INPUT: x[i : i + 1]})[OUTPUT]

            with __import__("concurrent.futures").futures.ThreadPoolExecutor(8) as pool:
                together = list(pool.map(one, range(8)))
            client.close()
            same = all(np.allclose(a, b, atol=1e-5) for a, b in zip(alone, together, strict=True))
            assert same == (name == "frozen"), name
        sizes = srv.manager.get("training").batcher.batch_sizes
        assert sizes[2] >= 8 and sum(v for k, v in sizes.items() if k > 2) >= 1


# --- lifecycle ---------------------------------------------------------------------------


def test_binds_localhost_and_shuts_down_cleanly():
    before = {t.name for t in threading.enumerate()}
    srv = DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0.05,
    ).start()
    assert srv.host == "127.0.0.1"
    rest_port, grpc_port = srv.rest_port, srv.grpc_port
    with requests.Session() as s:  # an idle keep-alive connection must not block stop()
        assert s.get(srv.rest_url + "/v1/models/default", timeout=5).status_code == 200
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 5
    for port in (rest_port, grpc_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    time.sleep(0.2)
    leftover = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not {n for n in leftover if n.startswith(("tfbn-rest", "tfbn-poll", "tfbn-batch"))}


def test_cli_serve_runs_and_stops_on_sigterm():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfbn.cli",
            "serve",
            "--port=0",
            "--model_name=hp",
            f"--model_base_path={HALF_PLUS_TWO}",
            "--file_system_poll_wait_seconds=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        target, lines = None, []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and target is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready" in line and "gRPC on " in line:
                target = line.split("gRPC on ")[1].split(",")[0].strip()
        assert target and target.startswith("127.0.0.1:"), lines
        assert any("model hp: 123:AVAILABLE" in ln for ln in lines), lines
        from tfbn.serving.client import GrpcClient

        with GrpcClient(target, "hp", timeout=10) as client:
            assert client.predict({"x": np.array([2.0], np.float32)})["y"].tolist() == [3.0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_example_runs(tmp_path):
    """examples/bench_serving.py, scaled down (the numbers are not asserted: not a test of speed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "bench_serving.py"),
            "--requests",
            "50",
            "--examples",
            "64",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {(r["backend"], r["batch"]) for r in result["throughput"]} == {
        (b, n) for b in ("in-process", "rest", "grpc") for n in (1, 64)
    }
    assert [m["transport"] for m in result["memory"]] == ["rest", "grpc"]
    assert "| grpc | 64 |" in proc.stdout


def test_wrong_shape_is_invalid_argument_and_the_server_keeps_serving(bn_models):
    with DevServer([_config.ModelConfig("m", bn_models["frozen"])], port=0, rest_api_port=0) as srv:
        r = post(srv, "/v1/models/m:predict", {"instances": [[1.0, 2.0, 3.0]]})  # 3 features, not 4
        assert r.status_code == 400 and r.json()["error"]
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.inputs[INPUT].CopyFrom(_tensor.to_tensor_proto(np.zeros((2, 5), np.float32)))
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(req, timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            req.inputs[INPUT].CopyFrom(_tensor.to_tensor_proto(np.zeros((2, 4), np.float32)))
            assert stub.Predict(req, timeout=5).outputs[OUTPUT].tensor_shape.dim[0].size == 2
        r = post(srv, "/v1/models/m:predict", {"instances": [[1.0, 2.0, 3.0, 4.0]]})
        assert r.status_code == 200 and len(r.json()["predictions"][0]) == 2
