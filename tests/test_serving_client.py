"""serving.client against the development server (and, with TFS_REST_URL / TFS_GRPC_TARGET
set, against a real TF Serving: `pytest -m tfserving`)."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from _serving_helpers import HALF_PLUS_TWO, HALF_PLUS_TWO_TF2, TESTDATA, TWO_VERSIONS
from tfbn.serving import _config, _tensor
from tfbn.serving.client import GrpcClient, RestClient, TFServingError, connect
from tfbn.serving.server import DevServer

needs_fixtures = pytest.mark.skipif(
    not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing"
)


@pytest.fixture(scope="module")
def server():
    models = [
        _config.ModelConfig("default", HALF_PLUS_TWO),
        _config.ModelConfig("tf2", HALF_PLUS_TWO_TF2),
        _config.ModelConfig(
            "two", TWO_VERSIONS, policy="all", labels={"stable": 123, "canary": 124}
        ),
    ]
    # Labels in the first config need the flag, as in TF Serving.
    with DevServer(
        models, port=0, rest_api_port=0, allow_version_labels_for_unavailable_models=True
    ) as srv:
        yield srv


@pytest.fixture(params=["rest", "grpc"])
def client_for(request, server):
    made = []

    def make(model="default", **kw):
        c = (
            RestClient(server.rest_url, model, **kw)
            if request.param == "rest"
            else GrpcClient(server.grpc_target, model, **kw)
        )
        made.append(c)
        return c

    make.kind = request.param
    yield make
    for c in made:
        c.close()


@needs_fixtures
def test_predict_half_plus_two(client_for):
    c = client_for()
    out = c.predict({"x": np.array([[1.0], [2.0], [5.0]], np.float32)})
    assert list(out) == ["y"] and out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["y"], [[2.5], [3.0], [4.5]])
    # one-input signatures take a bare array; float64 data is cast to the signature's DT_FLOAT
    np.testing.assert_array_equal(c.predict(np.array([[2.0]]))["y"], [[3.0]])
    if client_for.kind == "rest":
        np.testing.assert_array_equal(
            c.predict({"x": [[1.0], [5.0]]}, format="row")["y"], [[2.5], [4.5]]
        )


@needs_fixtures
def test_metadata_discovers_the_signature(client_for):
    meta = client_for().metadata()
    assert meta.model_name == "default" and meta.version == 123
    sig = meta.signature()
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["x"].dtype == "DT_FLOAT" and sig.inputs["x"].shape == (-1, 1)
    assert sig.outputs["y"].numpy_dtype == np.float32
    assert meta.signatures["classify_x_to_y"].inputs["inputs"].shape is None  # unknown rank
    with pytest.raises(KeyError, match="nope"):
        meta.signature("nope")


@needs_fixtures
def test_status_and_version_selection(client_for):
    c = client_for("two")
    assert [(s.version, s.state) for s in c.status()] == [(124, "AVAILABLE"), (123, "AVAILABLE")]
    assert c.metadata().version == 124
    assert c.metadata(version=123).version == 123
    assert client_for("two", label="stable").metadata().version == 123
    assert client_for("two", version=124).status() == [c.status()[0]]
    x = {"x": np.array([[1.0]], np.float32)}
    assert client_for("two", label="canary").predict(x)["y"].tolist() == [[2.5]]
    with pytest.raises(ValueError, match="not both"):
        client_for("two", version=1, label="stable")


@needs_fixtures
def test_errors_carry_code_status_and_message(client_for):
    with pytest.raises(TFServingError) as err:
        client_for("nosuch").predict({"x": np.zeros((1, 1), np.float32)})
    e = err.value
    assert e.code == "NOT_FOUND"
    assert "Servable not found for request: Latest(nosuch)" in e.message
    if client_for.kind == "rest":
        assert e.http_status == 404 and e.grpc_code is None
    else:
        assert e.grpc_code is grpc.StatusCode.NOT_FOUND and e.http_status is None
    with pytest.raises(TFServingError) as err:
        client_for(version=999).status()
    assert (
        err.value.code == "NOT_FOUND"
        and "Could not find version 999 of model default" in err.value.message
    )
    with pytest.raises(TFServingError) as err:
        client_for().predict({"wrong": np.zeros((1, 1), np.float32)})
    assert err.value.code == "INVALID_ARGUMENT"
    assert (
        "input tensor alias not found in signature: wrong" in err.value.message  # gRPC
        or "Missing named input: x in 'inputs' object." in err.value.message
    )  # REST


@needs_fixtures
def test_float32_round_trip_is_exact(server):
    """Every float32 bit pattern class survives JSON (REST) and TensorProto (gRPC) exactly."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    x = np.concatenate(
        [x, np.float32([0.1, 1 / 3, 1e-45, 1.1754942e-38, 3.4028235e38, -0.0, 16777217])]
    )
    x = x[np.abs(x) < 1e37]  # keep 0.5 * x + 2 finite
    expected = (x.astype(np.float32) * np.float32(0.5) + np.float32(2.0)).astype(np.float32)
    # JSON encoding itself: shortest decimal, read back bit-exactly
    decoded = _tensor.json_to_array(__import__("json").loads(_tensor.array_to_json(x)), np.float32)
    assert decoded.tobytes() == x.tobytes()
    for c in (RestClient(server.rest_url, "tf2"), GrpcClient(server.grpc_target, "tf2")):
        with c:
            got = c.predict({"x": x})["y"]
        assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()


def test_unreachable_server_fails_clearly_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    for c in (
        RestClient(f"http://127.0.0.1:{port}", "m", timeout=1.5, backoff=0.05),
        GrpcClient(f"127.0.0.1:{port}", "m", timeout=1.5, backoff=0.05),
    ):
        t0 = time.monotonic()
        with pytest.raises(TFServingError) as err:
            c.status()
        assert time.monotonic() - t0 < 3.0
        assert err.value.code == "UNAVAILABLE"
        assert f"127.0.0.1:{port}" in str(err.value) and "attempts" in str(err.value)
        c.close()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """503 for the first `fail` requests, then TF Serving's status answer; counts calls."""

    calls = 0
    fail = 2
    status = 503

    def do_GET(self):
        type(self).calls += 1
        if type(self).calls <= type(self).fail:
            body, code = b'{"error": "busy"}', type(self).status
        else:
            body, code = (
                (
                    b'{"model_version_status": [{"version": "1", "state": "AVAILABLE", '
                    b'"status": {"error_code": "OK", "error_message": ""}}]}'
                ),
                200,
            )
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Flaky.calls = 0
    yield srv, _Flaky
    srv.shutdown()
    srv.server_close()


def test_retries_with_backoff_only_on_unavailable(flaky):
    srv, handler = flaky
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    handler.fail, handler.status = 2, 503
    assert RestClient(url, "m", retries=3, backoff=0.01).status()[0].state == "AVAILABLE"
    assert handler.calls == 3
    handler.calls, handler.fail, handler.status = 0, 2, 500  # INTERNAL: not retried
    with pytest.raises(TFServingError) as err:
        RestClient(url, "m", retries=3, backoff=0.01).status()
    assert err.value.code == "INTERNAL" and err.value.http_status == 500 and handler.calls == 1
    handler.calls, handler.fail, handler.status = 0, 10, 503  # gives up after `retries`
    with pytest.raises(TFServingError) as err:
        RestClient(url, "m", retries=2, backoff=0.01).status()
    assert err.value.code == "UNAVAILABLE" and handler.calls == 3


def test_timeouts_are_enforced():
    """A server that accepts but never answers: the call fails at its deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        c = RestClient(f"http://127.0.0.1:{port}", "m", timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(TFServingError) as err:
            c.status()
        assert err.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 2.0
        c.close()
    with pytest.raises(ValueError, match="timeout"):
        RestClient("http://x", "m", timeout=0)


def test_connect_picks_the_transport(server):
    with connect(server.rest_url, "default") as c:
        assert isinstance(c, RestClient)
    with connect(server.grpc_target, "default") as c:
        assert isinstance(c, GrpcClient)


# --- against a real TF Serving (skipped unless pointed at one) ---------------------------

TFS_REST, TFS_GRPC = os.environ.get("TFS_REST_URL"), os.environ.get("TFS_GRPC_TARGET")
TFS_MODEL = os.environ.get("TFS_MODEL_NAME", "half_plus_two")
real = [
    pytest.param("rest", marks=pytest.mark.skipif(not TFS_REST, reason="TFS_REST_URL not set")),
    pytest.param("grpc", marks=pytest.mark.skipif(not TFS_GRPC, reason="TFS_GRPC_TARGET not set")),
]


def _real(kind, **kw):
    return (
        RestClient(TFS_REST, TFS_MODEL, **kw)
        if kind == "rest"
        else GrpcClient(TFS_GRPC, TFS_MODEL, **kw)
    )


@pytest.mark.tfserving
@pytest.mark.parametrize("kind", real)
def test_real_tf_serving_half_plus_two(kind):
    """Serve /work/shared/tfs_testdata/saved_model_half_plus_two_cpu as TFS_MODEL_NAME."""
    with _real(kind) as c:
        assert any(s.state == "AVAILABLE" for s in c.status())
        sig = c.metadata().signature()
        assert set(sig.inputs) == {"x"} and sig.inputs["x"].dtype == "DT_FLOAT"
        np.testing.assert_array_equal(
            c.predict({"x": np.float32([[1.0], [2.0], [5.0]])})["y"], [[2.5], [3.0], [4.5]]
        )
    with pytest.raises(TFServingError) as err:
        (
            RestClient(TFS_REST, "no_such_model")
            if kind == "rest"
            else GrpcClient(TFS_GRPC, "no_such_model")
        ).predict({"x": np.float32([[1.0]])})
    assert err.value.code == "NOT_FOUND"


@pytest.mark.tfserving
@pytest.mark.parametrize("kind", real)
def test_real_tf_serving_batch_invariance(kind):
    from tfbn.serving.invariance import check_batch_invariance

    with _real(kind) as c:
        x = {"x": np.random.default_rng(0).standard_normal((20, 1)).astype(np.float32)}
        report = check_batch_invariance(c.predict_fn(), x, concurrent=True)
    assert report.passed, report.table()


# --- whole-call deadlines (issue 13.7) and bfloat16 (issue 19.5) ---------------------------


class _Trickler:
    """A TCP server on 127.0.0.1 that reads the request, then sends a valid HTTP answer one
    byte every `pause` seconds (a complete answer after ~len(answer) * pause seconds)."""

    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n"
        b'{"model_version_status":[]}'
    )

    def __init__(self, pause=0.2):
        self.pause = pause
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            conn.recv(65536)
            for i in range(len(self.ANSWER)):
                if self.stop.is_set():
                    return
                try:
                    conn.sendall(self.ANSWER[i : i + 1])
                except OSError:
                    return  # the client hung up: what a deadline does
                time.sleep(self.pause)

    def close(self):
        self.stop.set()
        self.sock.close()


def test_rest_timeout_is_a_deadline_for_the_whole_call():
    """Issue 13.7: timeout=3 against a server trickling a byte every 0.2 s returned after 13 s."""
    trickler = _Trickler(pause=0.2)  # the whole answer would take ~20 s
    try:
        client = RestClient(trickler.url, "m", timeout=1.0, retries=0)
        t0 = time.monotonic()
        with pytest.raises(TFServingError) as err:
            client.status()
        elapsed = time.monotonic() - t0
        assert err.value.code == "DEADLINE_EXCEEDED" and elapsed < 2.5, elapsed
        # the same client still works for the next call (the broken connection is dropped)
        with pytest.raises(TFServingError, match="DEADLINE_EXCEEDED"):
            client.status(timeout=0.5)
        client.close()
    finally:
        trickler.close()


def test_cli_check_timeout_bounds_a_trickling_server(capsys):
    from tfbn import cli

    trickler = _Trickler(pause=0.2)
    try:
        t0 = time.monotonic()
        assert (
            cli.main(["check", "--rest", trickler.url, "--model_name", "m", "--timeout", "1"]) == 1
        )
        assert time.monotonic() - t0 < 6.0  # one call and its retries, all within 1 s
        assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
    finally:
        trickler.close()


def test_grpc_timeout_is_a_deadline_for_the_whole_call():
    """gRPC had it already (the call's deadline); kept so it stays that way."""
    from concurrent import futures

    def slow(request, context):
        time.sleep(5)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.ModelService",
        {"GetModelStatus": grpc.unary_unary_rpc_method_handler(slow)},
    )
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        client = GrpcClient(f"127.0.0.1:{port}", "m", timeout=1.0, retries=3)
        t0 = time.monotonic()
        with pytest.raises(TFServingError) as err:
            client.status()
        assert err.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 2.5
        client.close()
    finally:
        srv.stop(0)


def test_bfloat16_over_grpc_matches_tensorflows_codec():
    """Issue 19.5: DT_BFLOAT16 tensors (TensorProto half_val or tensor_content), in the
    codec the client and the development server share."""
    import ml_dtypes
    import tensorflow as tf

    x = np.array([[1.5, -2.25, 3e-3], [100.0, 0.0, -0.0]], dtype=ml_dtypes.bfloat16)
    typed = tf.make_tensor_proto(tf.constant(x))  # TensorFlow's own encoding
    assert typed.dtype == tf.bfloat16.as_datatype_enum
    got = _tensor.from_tensor_proto(typed)
    assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == x.tobytes()
    ours = _tensor.to_tensor_proto(x)
    back = tf.make_ndarray(ours)
    assert back.dtype == tf.bfloat16.as_numpy_dtype and back.tobytes() == x.tobytes()
    half = type(typed)(dtype=typed.dtype, tensor_shape=typed.tensor_shape)
    half.half_val.extend(x.view(np.uint16).ravel().tolist())  # the typed-field form
    assert _tensor.from_tensor_proto(half).tobytes() == x.tobytes()
    typed_fields = _tensor.to_tensor_proto(x, typed_fields=True)  # as a server answers
    assert tf.make_ndarray(typed_fields).tobytes() == x.tobytes()


def test_dev_server_serves_bfloat16_over_rest_and_grpc(tmp_path):
    """Issue 19.5: `tfbn serve` answered a DT_BFLOAT16 model with HTTP 500 (REST) and
    INVALID_ARGUMENT (gRPC); TF Serving serves it (JSON numbers, TensorProto half_val)."""
    import ml_dtypes
    import tensorflow as tf

    class Twice(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.bfloat16, name="x")])
        def serve(self, x):
            return {"y": x * tf.constant(2.0, tf.bfloat16)}

    module = Twice()
    tf.saved_model.save(
        module,
        str(tmp_path / "1"),
        signatures={"serving_default": module.serve.get_concrete_function()},
    )
    x = np.array([[1.5, -2.25, 3e-3], [100.0, 0.0, 7.0]], dtype=ml_dtypes.bfloat16)
    want = (x.astype(np.float32) * 2).astype(ml_dtypes.bfloat16)
    with DevServer([_config.ModelConfig("bf16", str(tmp_path))], port=0, rest_api_port=0) as srv:
        for client in (
            RestClient(srv.rest_url, "bf16", timeout=10),
            GrpcClient(srv.grpc_target, "bf16", timeout=10),
        ):
            got = client.predict({"x": x})["y"]
            assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == want.tobytes()
            client.close()


class _Bf16Server(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST answers for a model with a DT_BFLOAT16 input and output (y = 2x)."""

    seen: list = []

    def _reply(self, doc):
        body = __import__("json").dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        info = {"dtype": "DT_BFLOAT16", "tensor_shape": {"dim": [{"size": "-1"}, {"size": "3"}]}}
        self._reply(
            {
                "model_spec": {"name": "m", "version": "1"},
                "metadata": {
                    "signature_def": {
                        "signature_def": {
                            "serving_default": {
                                "method_name": "tensorflow/serving/predict",
                                "inputs": {"x": info},
                                "outputs": {"y": info},
                            }
                        }
                    }
                },
            }
        )

    def do_POST(self):
        doc = __import__("json").loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(doc)
        self._reply({"outputs": (np.asarray(doc["inputs"]["x"]) * 2).tolist()})

    def log_message(self, *args):
        pass


def test_bfloat16_over_rest_as_json_numbers():
    import ml_dtypes

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bf16Server)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = RestClient(f"http://127.0.0.1:{srv.server_address[1]}", "m")
        sig = client.metadata().signature()
        assert sig.inputs["x"].numpy_dtype == ml_dtypes.bfloat16
        x = np.array([[1.5, -2.25, 0.0078125]], dtype=ml_dtypes.bfloat16)
        y = client.predict({"x": x})["y"]
        assert y.dtype == ml_dtypes.bfloat16 and y.tobytes() == (x * 2).tobytes()
        assert _Bf16Server.seen[-1]["inputs"]["x"] == [[1.5, -2.25, 0.0078125]]  # numbers
        y32 = client.predict({"x": x.astype(np.float32)})["y"]  # float32 data cast to the signature
        assert y32.dtype == ml_dtypes.bfloat16
        client.close()
    finally:
        srv.shutdown()
        srv.server_close()
