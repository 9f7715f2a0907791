"""Fuzzing the development server: random and mutated requests on REST (raw HTTP and JSON)
and gRPC, bounded in count and time, loopback only, with a fixed seed. After each batch the
server must still answer a valid request correctly; at the end every thread it started is
gone."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from _serving_helpers import HALF_PLUS_TWO, TESTDATA
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tfbn.serving import _config
from tfbn.serving.server import DevServer

pytestmark = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing")

SEED = int(os.environ.get("TFBN_FUZZ_SEED", "11"))
BUDGET_S = 60.0  # wall-clock cap for each fuzz test; the counts below normally finish first

VALID = [
    {"instances": [1.0, 2.0, 5.0]},
    {"inputs": {"x": [[1.0], [2.0]]}},
    {"signature_name": "serving_default", "instances": [{"x": [1.0]}, {"x": [5.0]}]},
    {"inputs": [0.5]},
]
ATOMS = [
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    2**80,
    1e39,
    -0.0,
    1.5,
    "",
    "x",
    "\u00b2",
    {"b64": "AA=="},
    {"b64": "!!"},
    [],
    [[]],
    {},
    [None],
    [1, [2]],
    "NaN",
]
PATHS = [
    "/v1/models/default:predict",
    "/v1/models/default/versions/123:predict",
    "/v1/models/default/labels/x:predict",
    "/v1/models/default:PREDICT",
    "/v1/models/default",
    "/v1/models/default/metadata",
    "/v1/models/%ff:predict",
    "/v1/models/default/versions/1" + "9" * 30 + ":predict",
    "/v1/models//:predict",
    "/",
    "/v1",
    "/v1/models/default:regress",
]


def _mutate_doc(rng: random.Random, doc):
    """A random structural mutation of a JSON document (Python objects)."""
    if isinstance(doc, dict) and doc and rng.random() < 0.5:
        key = rng.choice(list(doc))
        out = dict(doc)
        choice = rng.random()
        if choice < 0.3:
            del out[key]
        elif choice < 0.6:
            out[rng.choice(["instances", "inputs", "signature_name", "x", "y", ""])] = rng.choice(
                ATOMS
            )
        else:
            out[key] = _mutate_doc(rng, out[key])
        return out
    if isinstance(doc, list) and doc and rng.random() < 0.6:
        out = list(doc)
        i = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.3:
            out[i] = rng.choice(ATOMS)
        elif choice < 0.5:
            out.insert(i, [out[i]] * rng.randint(0, 3))
        elif choice < 0.7:
            del out[i]
        else:
            out[i] = _mutate_doc(rng, out[i])
        return out
    return rng.choice(ATOMS + [[doc], {"instances": doc}, {"inputs": doc}])


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op < 0.7:
            data[i:i] = rng.choice(
                [
                    b"[",
                    b"]",
                    b"{",
                    b"}",
                    b",",
                    b'"',
                    b"\\",
                    b"NaN",
                    b"\x00",
                    b"-",
                    b"1e999",
                    b"[" * 70,
                ]
            )
        else:
            del data[i : i + rng.randint(1, 5)]
    return bytes(data)


@pytest.fixture
def server():
    threads_before = set(threading.enumerate())
    srv = DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=0,
        max_request_bytes=256 * 1024,
        rest_idle_timeout=1.0,
        rest_body_timeout=1.0,
        file_system_poll_wait_seconds=0,
    ).start()
    try:
        yield srv
    finally:
        srv.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftover = [
            t
            for t in set(threading.enumerate()) - threads_before
            if t.is_alive() and t.name.startswith("tfbn-")
        ]
        if not leftover:
            break
        time.sleep(0.1)
    assert not leftover, f"threads left running: {[t.name for t in leftover]}"


def _assert_healthy(srv):
    r = requests.post(
        srv.rest_url + "/v1/models/default:predict", json={"instances": [1.0, 2.0]}, timeout=10
    )
    assert r.status_code == 200 and r.json() == {"predictions": [2.5, 3.0]}
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "default"
    req.inputs["x"].dtype = types_pb2.DT_FLOAT
    req.inputs["x"].float_val.extend([1.0, 2.0])
    req.inputs["x"].tensor_shape.dim.add().size = 2
    with grpc.insecure_channel(srv.grpc_target) as channel:
        out = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=10)
    assert list(out.outputs["y"].float_val) == [2.5, 3.0]


def test_fuzz_rest_json_bodies_and_paths(server):
    rng = random.Random(SEED)
    t0 = time.monotonic()
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        for i in range(400):
            if time.monotonic() - t0 > BUDGET_S:
                break
            base = rng.choice(VALID)
            if rng.random() < 0.5:
                body = json.dumps(_mutate_doc(rng, base)).encode()
            else:
                body = _mutate_bytes(rng, json.dumps(base).encode())
            path = rng.choice(PATHS) if rng.random() < 0.3 else PATHS[0]
            method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE"])
            r = session.request(method, server.rest_url + path, data=body, timeout=10)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code != 500, (body[:300], r.text)  # no unexplained server error
            assert r.headers["Content-Type"] == "application/json"
            doc = json.loads(r.text)
            assert set(doc) <= {
                "error",
                "predictions",
                "outputs",
                "model_version_status",
                "model_spec",
                "metadata",
            }, doc
            if r.status_code >= 400:
                assert isinstance(doc["error"], str) and doc["error"]
            if i % 50 == 0:
                _assert_healthy(server)
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
    _assert_healthy(server)


def test_fuzz_raw_http(server):
    rng = random.Random(SEED + 1)
    valid = (
        b"POST /v1/models/default:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 20\r\n\r\n{"instances": [1.0]}'
    )
    t0 = time.monotonic()
    for i in range(200):
        if time.monotonic() - t0 > BUDGET_S:
            break
        raw = (
            _mutate_bytes(rng, valid) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 300))
        )
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as s:
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while len(reply) < 1 << 20:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
            except TimeoutError:
                pytest.fail(f"no answer and no close within 5 s for {raw[:200]!r}")
        if reply:
            assert reply.startswith(b"HTTP/1."), reply[:200]
            assert b" 500 " not in reply.split(b"\r\n", 1)[0], (raw[:200], reply[:300])
        if i % 50 == 0:
            _assert_healthy(server)
    _assert_healthy(server)


def test_fuzz_grpc_tensors(server):
    rng = random.Random(SEED + 2)
    dtypes = [
        types_pb2.DT_FLOAT,
        types_pb2.DT_DOUBLE,
        types_pb2.DT_INT32,
        types_pb2.DT_STRING,
        types_pb2.DT_BOOL,
        types_pb2.DT_HALF,
        types_pb2.DT_INVALID,
        999,
    ]
    t0 = time.monotonic()
    codes: dict[str, int] = {}
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(300):
            if time.monotonic() - t0 > BUDGET_S:
                break
            req = predict_pb2.PredictRequest()
            req.model_spec.name = rng.choice(["default", "default", "nosuch", ""])
            if rng.random() < 0.2:
                req.model_spec.version.value = rng.choice([0, 123, -1, 2**62])
            alias = rng.choice(["x", "x", "x", "y", ""])
            t = req.inputs[alias]
            t.dtype = rng.choice(dtypes)
            for _ in range(rng.randint(0, 5)):
                t.tensor_shape.dim.add().size = rng.choice([0, 1, 2, 3, -1, 7, 2**40])
            n = rng.randint(0, 8)
            if rng.random() < 0.3:
                t.tensor_content = rng.randbytes(rng.randint(0, 64))
            elif t.dtype == types_pb2.DT_STRING:
                t.string_val.extend(rng.randbytes(3) for _ in range(n))
            else:
                t.float_val.extend(rng.uniform(-1e6, 1e6) for _ in range(n))
            try:
                stub.Predict(req, timeout=10)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                assert err.code() not in (
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ), (req, err.details())
                if err.code() is grpc.StatusCode.INTERNAL:  # only TensorFlow's own runtime errors
                    assert "Error" not in err.details().split(":")[0], (req, err.details())
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
    assert codes.get("INVALID_ARGUMENT", 0) > 0, codes
    _assert_healthy(server)


def test_fuzz_numeric_payloads_round_trip(server):
    """Random valid float payloads of random shapes come back exactly as x / 2 + 2."""
    rng = np.random.default_rng(SEED)
    t0 = time.monotonic()
    with requests.Session() as session:
        for _ in range(100):
            if time.monotonic() - t0 > BUDGET_S:
                break
            n = int(rng.integers(1, 50))
            x = (rng.standard_normal((n, 1)) * 10.0 ** rng.integers(-3, 6)).astype(np.float32)
            body = (
                {"instances": x.tolist()} if rng.random() < 0.5 else {"inputs": {"x": x.tolist()}}
            )
            r = session.post(server.rest_url + "/v1/models/default:predict", json=body, timeout=10)
            assert r.status_code == 200, r.text
            got = np.asarray(next(iter(r.json().values())), np.float32)
            np.testing.assert_array_equal(got, x * np.float32(0.5) + np.float32(2))


# --- the benchmark scripts run (scaled down; their numbers are not asserted) ---------------


def test_load_benchmark_example_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "bench_serving_load.py"),
            "--concurrent",
            "40",
            "--soak",
            "200",
            "--soak_concurrency",
            "10",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [b["transport"] for b in result["bursts"]] == ["rest", "grpc"]
    assert all(b["p99_ms"] >= b["p50_ms"] > 0 for b in result["bursts"])
    assert [len(s["rss_mib"]) for s in result["soak_rss"]] == [1, 1]
    assert "| grpc |" in proc.stdout


def test_json_decode_benchmark_example_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "bench_json_decode.py"),
            "--mb",
            "0.2",
            "--repeat",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["decoder"] for r in rows} >= {"stdlib+numpy (server)", "per-element walk"}
    assert len({r["layout"] for r in rows}) == 3
