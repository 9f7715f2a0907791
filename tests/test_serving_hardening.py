"""Regression tests for the development server's defects found by hostile clients (issue 11).

Each test fails on the server before the fix. Servers bind 127.0.0.1 on free ports and are
stopped by their fixtures; the crash test runs `tfbn serve` in a subprocess, so an abort
cannot take the test process with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest
import requests
from _serving_helpers import HALF_PLUS_TWO, TESTDATA
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tfbn.serving import _config, _json_tensor, _tensor
from tfbn.serving.server import DevServer

pytestmark = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HP2_VERSION = os.path.join(HALF_PLUS_TWO, "00000123")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


@pytest.fixture(scope="module")
def hp2():
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=0,
        max_request_bytes=1 << 20,
        rest_idle_timeout=2.0,
        rest_body_timeout=2.0,
    ) as srv:
        yield srv


def post(srv, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(srv.rest_url + path, data=data, timeout=10, **kw)


# --- 1. a wrong-rank input must not kill the process ------------------------------------


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    base = tmp_path_factory.mktemp("conv") / "conv"
    model.export(str(base / "1"), verbose=False)
    return str(base)


def _start_cli(args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's default: oneDNN on
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfbn.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    grpc_target = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "ready" in line and "gRPC on " in line:
            grpc_target = line.split("gRPC on ")[1].split(",")[0].strip()
            break
    if grpc_target is None:
        proc.kill()
        proc.wait()
        pytest.fail("tfbn serve did not start")
    return proc, grpc_target


def test_wrong_rank_input_is_invalid_argument_and_the_process_survives(conv_model):
    rest_port = _free_port()
    proc, target = _start_cli(
        [
            "--port=0",
            f"--rest_api_port={rest_port}",
            "--model_name=conv",
            f"--model_base_path={conv_model}",
            "--file_system_poll_wait_seconds=0",
        ]
    )
    url = f"http://127.0.0.1:{rest_port}/v1/models/conv:predict"
    try:
        for body in (
            {"inputs": {"image": [[[0, 0, 0]]]}},
            {"inputs": {"image": []}},
            {"inputs": {"image": np.zeros((8, 8, 3)).tolist()}},
            {"instances": np.zeros((2, 8, 3)).tolist()},
            {"inputs": {"image": np.zeros((1, 8, 8, 5)).tolist()}},
        ):
            r = requests.post(url, json=body, timeout=30)
            assert r.status_code == 400, r.text
            assert "input tensor shape mismatch: image" in r.json()["error"]
            assert "[-1,8,8,3]" in r.json()["error"]
            assert proc.poll() is None
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "conv"
        req.inputs["image"].CopyFrom(_tensor.to_tensor_proto(np.zeros((8, 8, 3), np.float32)))
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(req, timeout=30)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "shape mismatch" in err.value.details()
            req.inputs["image"].CopyFrom(
                _tensor.to_tensor_proto(np.zeros((3, 8, 8, 3), np.float32))
            )
            assert stub.Predict(req, timeout=30).outputs["output_0"].tensor_shape.dim[0].size == 3
        r = requests.post(url, json={"instances": np.zeros((2, 8, 8, 3)).tolist()}, timeout=30)
        assert r.status_code == 200 and np.asarray(r.json()["predictions"]).shape == (2, 2)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def tf1_conv_model(tmp_path_factory):
    """A TF1 (Session, no object graph) SavedModel with a [None, 8, 8, 3] conv input."""
    import tensorflow as tf

    path = str(tmp_path_factory.mktemp("tf1conv") / "conv" / "1")
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="image")
        w = tf.compat.v1.get_variable(
            "w", [3, 3, 3, 4], initializer=tf.compat.v1.ones_initializer()
        )
        y = tf.reduce_mean(tf.nn.conv2d(x, w, 1, "SAME"), axis=[1, 2], name="y")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            sig = tf.compat.v1.saved_model.predict_signature_def({"image": x}, {"y": y})
            builder.add_meta_graph_and_variables(
                sess, ["serve"], signature_def_map={"serving_default": sig}
            )
            builder.save()
    return os.path.dirname(path)


def test_wrong_rank_input_to_a_tf1_model_is_invalid_argument_and_the_process_survives(
    tf1_conv_model,
):
    rest_port = _free_port()
    proc, _ = _start_cli(
        [
            "--port=0",
            f"--rest_api_port={rest_port}",
            "--model_name=conv",
            f"--model_base_path={tf1_conv_model}",
            "--file_system_poll_wait_seconds=0",
        ]
    )
    url = f"http://127.0.0.1:{rest_port}/v1/models/conv:predict"
    try:
        for body in (
            {"inputs": {"image": np.zeros((8, 8, 3)).tolist()}},
            {"inputs": {"image": [[[0, 0, 0]]]}},
            {"instances": np.zeros((2, 8, 3)).tolist()},
        ):
            r = requests.post(url, json=body, timeout=30)
            assert r.status_code == 400, r.text
            assert "input tensor shape mismatch" in r.json()["error"]
            assert "Shape must be rank 4 but is rank 3" in r.json()["error"]
            assert proc.poll() is None
        r = requests.post(url, json={"instances": np.ones((2, 8, 8, 3)).tolist()}, timeout=30)
        # ones through a 3x3x3 all-ones SAME conv, averaged over 8x8: (4*12 + 24*18 + 36*27) / 64
        assert r.status_code == 200 and r.json()["predictions"] == [[22.6875] * 4] * 2, r.text
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- 2. decoding memory is bounded by a small multiple of the body -------------------------


def _float_infos(name="x"):
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    return {name: meta_graph_pb2.TensorInfo(dtype=types_pb2.DT_FLOAT)}


@pytest.mark.parametrize(
    "layout,shape", [("columnar", (20000, 32)), ("row", (20000, 32)), ("row", (1_000_000,))]
)
def test_json_decoding_peak_memory_is_a_small_multiple_of_the_body(layout, shape):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(shape).round(3).astype(np.float32)
    key = "inputs" if layout == "columnar" else "instances"
    body = json.dumps({key: values.tolist()}).encode()
    assert len(body) > 5_000_000 if len(shape) > 1 else len(body) > 4_000_000
    tracemalloc.start()
    try:
        _, arrays, fmt = _json_tensor.parse_predict_json(body, lambda sig: _float_infos())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fmt == layout
    np.testing.assert_array_equal(arrays["x"], values)
    assert arrays["x"].dtype == np.float32
    assert peak < 10 * len(body), f"peak {peak / len(body):.1f}x the body"


def test_bodies_decoded_at_once_stay_within_the_server_budget():
    """Many large bodies at once: all answered, never more than 4 x --max-request-bytes of
    them decoded together (the per-request bound would otherwise multiply by the threads)."""
    from concurrent.futures import ThreadPoolExecutor

    limit = 8192
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=0,
        max_request_bytes=limit,
        rest_api_num_threads=16,
    ) as srv:
        values = [float(i) for i in range(1000)]
        body = json.dumps({"instances": values}).encode()
        assert limit / 2 < len(body) <= limit

        def one(_):
            return post(srv, "/v1/models/default:predict", body)

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(48)))
        assert all(r.status_code == 200 for r in answers)
        assert all(r.json()["predictions"][:3] == [2.0, 2.5, 3.0] for r in answers)
        rest = srv._rest  # noqa: SLF001 - the accounting is what is under test
        assert rest.bodies_in_flight == 0
        assert len(body) <= rest.peak_bodies_in_flight <= rest.body_budget == 4 * limit


# --- 3. a version seen half-copied is retried, and loads are retried --------------------


def test_half_copied_version_is_loaded_once_complete(tmp_path):
    base = tmp_path / "m"
    version = base / "1"
    shutil.copytree(HP2_VERSION, version)
    data = next((version / "variables").glob("variables.data-*"))
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])  # the copy is still being written
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0.1,
        load_retry_interval_micros=60_000_000,
    ) as srv:
        status = requests.get(srv.rest_url + "/v1/models/m", timeout=10).json()
        assert status["model_version_status"][0]["state"] == "END"
        time.sleep(0.01)
        data.write_bytes(full)  # the copy completes: only a file inside variables/ changed
        r = _wait(
            lambda: (
                (post(srv, "/v1/models/m:predict", {"instances": [1.0]}).status_code == 200) or None
            ),
            timeout=30,
        )
        assert r, requests.get(srv.rest_url + "/v1/models/m", timeout=10).text
        assert post(srv, "/v1/models/m:predict", {"instances": [1.0]}).json() == {
            "predictions": [2.5]
        }


def test_failed_loads_are_retried_max_num_load_retries_times(tmp_path, caplog):
    base = tmp_path / "m"
    (base / "1").mkdir(parents=True)  # no saved_model.pb: every attempt fails
    caplog.set_level(logging.WARNING, logger="tfbn.serving.server")
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
        max_num_load_retries=2,
        load_retry_interval_micros=50_000,
    ):
        assert _wait(lambda: "attempt 3 of 3" in caplog.text, timeout=20)
        time.sleep(0.5)
    attempts = [
        r for r in caplog.records if "Loading servable: {name: m version: 1}" in r.getMessage()
    ]
    assert len(attempts) == 3


def test_a_transient_load_failure_is_retried_without_a_file_change(tmp_path, monkeypatch):
    from tfbn.serving import _manager

    real = _manager.Servable
    calls = []

    def flaky(*args, **kw):
        calls.append(args)
        if len(calls) < 3:
            raise OSError("transient: storage not ready")
        return real(*args, **kw)

    monkeypatch.setattr(_manager, "Servable", flaky)
    base = tmp_path / "m"
    shutil.copytree(HP2_VERSION, base / "7")
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
        load_retry_interval_micros=100_000,
    ) as srv:
        assert _wait(
            lambda: post(srv, "/v1/models/m:predict", {"instances": [2.0]}).status_code == 200,
            timeout=30,
        )
    assert len(calls) == 3


# --- 4. directory names that are not int64 versions are ignored --------------------------


def test_odd_version_directory_names_are_ignored(tmp_path, caplog):
    base = tmp_path / "m"
    for name in ("²", str(2**63), "99999999999999999999999", "abc", "-1"):
        shutil.copytree(HP2_VERSION, base / name)
    shutil.copytree(HP2_VERSION, base / "3")
    caplog.set_level(logging.WARNING, logger="tfbn.serving.server")
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0.05,
    ) as srv:
        r = requests.get(srv.rest_url + "/v1/models/m", timeout=10)
        assert r.status_code == 200
        assert [s["version"] for s in r.json()["model_version_status"]] == ["3"]
        shutil.copytree(HP2_VERSION, base / "4")  # polling goes on
        assert _wait(
            lambda: (
                [
                    s["version"]
                    for s in requests.get(srv.rest_url + "/v1/models/m", timeout=10).json()[
                        "model_version_status"
                    ]
                    if s["state"] == "AVAILABLE"
                ]
                == ["4"]
            ),
            timeout=30,
        )
        time.sleep(0.3)
    ignored = [r.getMessage() for r in caplog.records if "Ignoring" in r.getMessage()]
    assert len(ignored) == 5  # each name logged once, however many polls saw it


# --- 5. every version deleted: the model is unloaded ---------------------------------------


def test_all_versions_deleted_unloads_the_model(tmp_path):
    base = tmp_path / "m"
    shutil.copytree(HP2_VERSION, base / "1")
    with DevServer(
        [_config.ModelConfig("m", str(base))],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0.05,
    ) as srv:
        assert post(srv, "/v1/models/m:predict", {"instances": [1.0]}).status_code == 200
        shutil.rmtree(base / "1")
        assert _wait(
            lambda: post(srv, "/v1/models/m:predict", {"instances": [1.0]}).status_code == 404,
            timeout=30,
        )
        st = requests.get(srv.rest_url + "/v1/models/m", timeout=10).json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in st] == [("1", "END")]
        shutil.copytree(HP2_VERSION, base / "2")  # and a new version is served again
        assert _wait(
            lambda: post(srv, "/v1/models/m:predict", {"instances": [1.0]}).status_code == 200,
            timeout=30,
        )


# --- 6. HTTP framing ----------------------------------------------------------------------


def _exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _status_lines(reply: bytes) -> list[bytes]:
    return [ln for ln in reply.split(b"\r\n") if ln.startswith(b"HTTP/")]


def test_oversize_content_length_gets_one_413_and_the_connection_closes(hp2):
    body = b'{"instances": [1.0]}'
    raw = (
        b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % (hp2.max_request_bytes + 1)
    ) + body
    reply = _exchange(hp2.rest_port, raw)
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"413"]
    assert b"exceeds the limit" in reply
    raw = (
        b"GET /v1/models/default HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % (hp2.max_request_bytes + 1)
    ) + body
    reply = _exchange(hp2.rest_port, raw)  # was answered 413, then 200
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"413"]


def test_chunked_bodies_get_one_answer(hp2):
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    reply = _exchange(
        hp2.rest_port,
        b"PUT /v1/models/default HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
    )
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"400"]
    assert b"Malformed request: PUT" in reply
    body = json.dumps({"instances": [1.0, 2.0]}).encode()
    raw = (
        b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    )
    reply = _exchange(hp2.rest_port, raw)
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"200"]
    assert reply.endswith(b'{"predictions": [2.5,3.0]}')


def test_chunked_body_over_the_limit_is_413(hp2):
    chunk = b"x" * 65536
    raw = (
        b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20
        + b"0\r\n\r\n"
    )
    reply = _exchange(hp2.rest_port, raw)
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"413"]


def test_conflicting_content_length_headers_are_rejected(hp2):
    raw = (
        b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"
        b"Content-Length: 5\r\n\r\n" + b'{"instances": [1.0]}'
    )
    reply = _exchange(hp2.rest_port, raw)
    assert [ln.split(b" ")[1] for ln in _status_lines(reply)] == [b"400"]
    assert b"predictions" not in reply


def test_head_is_answered_without_a_body(hp2):
    reply = _exchange(
        hp2.rest_port, b"HEAD /v1/models/default HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and rest == b""


def test_http_0_9_is_not_answered_as_http_0_9(hp2):
    reply = _exchange(hp2.rest_port, b"GET /v1/models/default\r\n\r\n")
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    assert b"model_version_status" not in reply


def test_slow_headers_and_idle_connections_are_closed_without_a_thread_each(hp2):
    threads_before = threading.active_count()
    conns = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", hp2.rest_port), timeout=10)
            if i % 2:
                s.sendall(
                    b"GET /v1/models/default HTTP/1.1\r\nHost: x\r\nX-Slow: "
                )  # never finished
            conns.append(s)
        t0 = time.monotonic()
        # The server's thread count does not grow with its connections (this process holds
        # the server, so its threads are counted here).
        assert threading.active_count() - threads_before < 20
        for s in conns:
            s.settimeout(max(0.1, 15 - (time.monotonic() - t0)))
            try:
                while s.recv(4096):
                    pass
            except (TimeoutError, ConnectionResetError):
                pytest.fail("a slow or idle connection was not closed by the server")
        assert time.monotonic() - t0 < 2.0 + 10
    finally:
        for s in conns:
            s.close()
    assert post(hp2, "/v1/models/default:predict", {"instances": [1.0]}).json() == {
        "predictions": [2.5]
    }


def test_slow_body_gets_408(hp2):
    with socket.create_connection(("127.0.0.1", hp2.rest_port), timeout=15) as s:
        s.sendall(
            b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        t0 = time.monotonic()
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 10


# --- 7. NaN/Inf and string outputs in row format ------------------------------------------


@pytest.fixture(scope="module")
def strings_model(tmp_path_factory):
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {
                "y": x * 2.0,
                "text": tf.strings.as_string(x, precision=1),
                "raw_bytes": tf.strings.as_string(x, precision=1),
            }

    base = tmp_path_factory.mktemp("strings") / "s"
    m = M()
    tf.saved_model.save(m, str(base / "1"), signatures={"serving_default": m.serve})
    return str(base)


def test_row_format_nan_infinity_and_string_outputs(strings_model):
    with DevServer([_config.ModelConfig("s", strings_model)], port=None, rest_api_port=0) as srv:
        r = post(srv, "/v1/models/s:predict", b'{"instances": [NaN, Infinity, -Infinity, 1.5]}')
        assert r.status_code == 200, r.text
        rows = json.loads(r.text)["predictions"]
        assert [row["text"] for row in rows] == ["nan", "inf", "-inf", "1.5"]
        assert rows[3]["raw_bytes"] == {"b64": "MS41"}
        ys = [row["y"] for row in rows]
        assert np.isnan(ys[0]) and ys[1:] == [float("inf"), float("-inf"), 3.0]
        assert '"y":NaN' in r.text.replace(" ", "")
        r = post(srv, "/v1/models/s:predict", b'{"inputs": [NaN, 2.0]}')
        assert r.status_code == 200 and json.loads(r.text)["outputs"]["text"] == ["nan", "2.0"]
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)], port=None, rest_api_port=0
    ) as srv:
        r = post(srv, "/v1/models/default:predict", b'{"instances": [NaN, Infinity]}')
        assert r.status_code == 200 and r.text.replace(" ", "") == '{"predictions":[NaN,Infinity]}'


# --- 8. integers above 2^24 and values beyond float32 are cast, as TF Serving >= 2.5 ------------


def test_big_ints_and_out_of_range_floats_are_cast(hp2):
    r = post(hp2, "/v1/models/default:predict", {"instances": [16777217, 1e39, -1e39, 2**70]})
    assert r.status_code == 200, r.text
    sent = np.array([16777217, np.inf, -np.inf, 2**70], np.float32)  # float32 casts of the values
    np.testing.assert_array_equal(
        np.asarray(json.loads(r.text)["predictions"], np.float32),
        sent * np.float32(0.5) + np.float32(2),
    )
    r = post(hp2, "/v1/models/default:predict", {"inputs": [[16777217.0], [3]]})
    assert r.status_code == 200 and r.json()["outputs"] == [
        [8388610.0],
        [3.5],
    ]  # float32(16777217) = 2**24


# --- 9. TF Serving's messages for malformed JSON and URLs ---------------------------------


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "JSON Parse error: Missing a name for object member. at offset: 1"),
        (b'{"instances": [1.0,', "JSON Parse error: Invalid value. at offset: 19"),
        (
            b'{"instances": [1.0 2.0]}',
            "JSON Parse error: Missing a comma or ']' after an array element.",
        ),
        (
            b'{"instances": [1.0] "x": 1}',
            "JSON Parse error: Missing a comma or '}' after an object member.",
        ),
        (
            b'{"instances" [1.0]}',
            "JSON Parse error: Missing a colon after a name of object member.",
        ),
        (b'{"instances": ["abc', "JSON Parse error: Missing a closing quotation mark in string."),
        (b'{"instances": ["\\q"]}', "JSON Parse error: Invalid escape character in string."),
        (
            b'{"instances": [1.0]} trailing',
            None,
        ),  # text after the document is ignored, as rapidjson does
        (b"\xff\xfe", "JSON Parse error: Invalid encoding in string."),
        (
            b'{"instances": ' + b"[" * 300 + b"1.0" + b"]" * 300 + b"}",
            "dimensions a tensor can have",
        ),
        (b'{"inputs": ' + b"[" * 100 + b"1.0" + b"]" * 100 + b"}", "JSON array nested 100 deep"),
        (b'{"instances": ' + b"[" * 200000 + b"]" * 200000 + b"}", "JSON Parse error"),
    ],
)
def test_malformed_json_gets_tf_serving_messages(hp2, body, message):
    r = post(hp2, "/v1/models/default:predict", body)
    if message is None:
        assert r.status_code == 200 and r.json() == {"predictions": [2.5]}, r.text
        return
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()["error"]
    assert "Expecting" not in r.json()["error"]


@pytest.mark.parametrize(
    "method,path,status,message",
    [
        (
            "POST",
            "/v1/models/default/versions/99999999999999999999:predict",
            400,
            "Failed to convert version: 99999999999999999999 to numeric.",
        ),
        (
            "GET",
            "/v1/models/default/versions/99999999999999999999",
            400,
            "Failed to convert version: 99999999999999999999 to numeric.",
        ),
        (
            "POST",
            "/v1/models/default:PREDICT",
            400,
            "Malformed request: POST /v1/models/default:PREDICT",
        ),
        (
            "POST",
            "/v1/models/default:explain",
            400,
            "Malformed request: POST /v1/models/default:explain",
        ),
        (
            "POST",
            "/v1/models/default/versions/9223372036854775807:predict",
            404,
            "Servable not found for request: Specific(default, 9223372036854775807)",
        ),
    ],
)
def test_url_errors(hp2, method, path, status, message):
    r = requests.request(method, hp2.rest_url + path, data=b'{"instances": [1.0]}', timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["error"] == message
