"""tensorflow_model_server's flags on `tfbn serve`: every flag accepted, the implemented
ones tested for their effect, the rest logged once; config re-poll, Prometheus, gRPC on
a Unix socket, channel arguments, REST timeout and threads, saved_model_tags, thread
pools; TF Serving's own test command line and examples/tf_serving_docker.md run
unchanged (ports and paths aside).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from _serving_helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, TESTDATA, export_bn_models
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tfbn.serving import _config, _flags, _metrics, _tensor
from tfbn.serving._loading import LoadOptions, configure_threads
from tfbn.serving.server import DevServer

from tfbn import cli

pytestmark = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="TF Serving fixtures missing")

ROOT = Path(__file__).resolve().parent.parent

# The flags of tensorflow_model_server 2.21, as listed in
# tensorflow_serving/model_servers/main.cc (the specification of the table in _flags).
TF_SERVING_FLAGS = """
port grpc_socket_path rest_api_port rest_api_num_threads rest_api_timeout_in_ms
rest_api_enable_cors_support enable_batching allow_version_labels_for_unavailable_models
batching_parameters_file enable_per_model_batching_parameters model_config_file
model_config_file_poll_wait_seconds model_name model_base_path num_load_threads
num_unload_threads max_num_load_retries load_retry_interval_micros
file_system_poll_wait_seconds flush_filesystem_caches tensorflow_session_parallelism
tensorflow_session_config_file tensorflow_intra_op_parallelism tensorflow_inter_op_parallelism
use_alts_credentials ssl_config_file platform_config_file per_process_gpu_memory_fraction
saved_model_tags grpc_channel_arguments grpc_max_threads enable_model_warmup
num_request_iterations_for_warmup version monitoring_config_file
remove_unused_fields_from_bundle_metagraph prefer_tflite_model num_tflite_pools
num_tflite_interpreters_per_pool enable_signature_method_name_check
xla_cpu_compilation_enabled xla_gpu_compilation_enabled enable_profiler
thread_pool_factory_config_file mixed_precision skip_initialize_tpu
enable_grpc_healthcheck_service enable_serialization_as_tensor_content
""".split()


def _serve_args(argv):
    return cli.build_parser().parse_args(["serve", *argv])


def _predict(target, model="default", x=2.0, timeout=30):
    channel = grpc.insecure_channel(target)
    try:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        req.inputs["x"].CopyFrom(
            _tensor.to_tensor_proto(np.array([x], np.float32), typed_fields=True)
        )
        resp = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            req, timeout=timeout
        )
        return list(resp.outputs["y"].float_val), resp.model_spec.version.value
    finally:
        channel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the flag table -----------------------------------------------------------------------


def test_the_table_has_exactly_tensorflow_model_servers_flags():
    assert len(TF_SERVING_FLAGS) == 48
    assert sorted(f.name for f in _flags.FLAGS) == sorted(TF_SERVING_FLAGS)
    defaults = {f.name: f.default for f in _flags.FLAGS}
    # server.h's defaults for the ones deployments rely on.
    assert defaults["port"] == 8500 and defaults["rest_api_port"] == 0
    assert defaults["rest_api_timeout_in_ms"] == 30000
    assert defaults["enable_model_warmup"] is True and defaults["enable_batching"] is False
    assert defaults["max_num_load_retries"] == 5
    assert defaults["load_retry_interval_micros"] == 60_000_000
    assert defaults["file_system_poll_wait_seconds"] == 1
    assert defaults["model_config_file_poll_wait_seconds"] == 0
    assert defaults["saved_model_tags"] == "serve" and defaults["model_name"] == "default"
    assert defaults["enable_signature_method_name_check"] is False


def test_every_flag_is_accepted_with_its_default_value_and_its_spellings():
    args = _serve_args([f"--{f.name}={f.default}" for f in _flags.FLAGS])
    for flag in _flags.FLAGS:
        assert getattr(args, flag.name) == flag.default, flag.name
    # TensorFlow's flag spellings: bare boolean, true/false/1/0, and `--flag value`.
    args = _serve_args(
        [
            "--enable_batching",
            "--enable_model_warmup=false",
            "--prefer_tflite_model=1",
            "--flush_filesystem_caches",
            "0",
            "--port",
            "9000",
        ]
    )
    assert args.enable_batching is True and args.enable_model_warmup is False
    assert args.prefer_tflite_model is True and args.flush_filesystem_caches is False
    assert args.port == 9000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_flag=1"], "unrecognized arguments: --no_such_flag=1"),
        (["--enable_batching=maybe"], "expected true, false, 1 or 0; got 'maybe'"),
        (["--port=http"], "expected an integer; got 'http'"),
        (["--port=4294967296"], "expected a 32-bit integer"),
    ],
)
def test_bad_flags_are_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        _serve_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_without_effect_are_logged_once_each():
    args = _serve_args(
        [
            "--per_process_gpu_memory_fraction=0.5",
            "--ssl_config_file=/etc/ssl.conf",
            "--enable_grpc_healthcheck_service",
            "--xla_cpu_compilation_enabled",
            "--port=8500",
            "--enable_model_warmup=true",
        ]
    )
    lines = []
    names = _flags.log_ignored(args, emit=lines.append)
    assert names == [
        "ssl_config_file",
        "per_process_gpu_memory_fraction",
        "xla_cpu_compilation_enabled",
        "enable_grpc_healthcheck_service",
    ]
    assert len(lines) == 4
    assert all("accepted, has no effect in the development server" in ln for ln in lines)
    assert lines[0].startswith("--ssl_config_file=/etc/ssl.conf: accepted")
    assert _flags.log_ignored(_serve_args([]), emit=lines.append) == []  # defaults: silent


def test_grpc_channel_argument_parsing():
    assert _flags.parse_grpc_channel_arguments(
        "grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,grpc.so_reuseaddr=1"
    ) == [
        ("grpc.max_connection_age_ms", 2000),
        ("grpc.lb_policy_name", "grpclb"),
        ("grpc.so_reuseaddr", 1),
    ]
    assert _flags.parse_grpc_channel_arguments("") == []
    with pytest.raises(ValueError, match="expected key=value items"):
        _flags.parse_grpc_channel_arguments("grpc.max_connection_age_ms")
    assert _flags.parse_saved_model_tags("serve,gpu") == ("serve", "gpu")
    with pytest.raises(ValueError, match="at least one tag"):
        _flags.parse_saved_model_tags(",")


# --- TF Serving's own test command line, run against `tfbn serve` -------------------------


class _Proc:
    """`tfbn serve ARGS` in a subprocess; stops it with SIGTERM (SIGKILL after 30 s)."""

    def __init__(self, argv, ready_timeout=120):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tfbn.cli", "serve", *argv],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.lines = []
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "ready:" in line:
                return
        self.stop()
        raise AssertionError(f"tfbn serve did not start: {self.lines} {self.err()}")

    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


def test_tf_serving_test_command_line_runs_unchanged(tmp_path):
    # TensorflowModelServerTestBase.RunServer's flags (ports and paths are ours), with the
    # monitoring file and the channel arguments of testGoodGrpcChannelArgs.
    port, rest_port = _free_port(), _free_port()
    sock = str(tmp_path / "tf-serving.sock")
    argv = shlex.split(
        f"--port={port} --rest_api_port={rest_port} --rest_api_timeout_in_ms=5000 "
        f"--grpc_socket_path={sock} --model_name=default --model_base_path={HALF_PLUS_TWO} "
        f"--monitoring_config_file={TESTDATA}/monitoring_config.txt "
        "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
        "grpc.so_reuseaddr=1"
    )
    server = _Proc(argv)
    try:
        assert _predict(f"localhost:{port}") == ([3.0], 123)
        assert _predict(f"unix:{sock}") == ([3.0], 123)  # testPredictUDS
        rest = f"http://localhost:{rest_port}"
        r = requests.post(
            rest + "/v1/models/default:classify",
            timeout=30,
            json={"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
        )
        assert r.json() == {"results": [[["", 3.0]]]}
        page = requests.get(rest + "/monitoring/prometheus/metrics", timeout=30)
        assert page.status_code == 200 and "# TYPE" in page.text  # testPrometheusEndpoint
        assert page.headers["Content-Type"].startswith("text/plain")
        assert re.search(
            r':tensorflow:serving:request_count_total\{model_name="default",'
            r'status="OK"\} [1-9]',
            page.text,
        ), page.text
    finally:
        assert server.stop() == 0
    assert not os.path.exists(sock)


def test_bad_model_config_fails_with_tf_servings_message():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfbn.cli",
            "serve",
            f"--model_config_file={TESTDATA}/bad_model_config.txt",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in proc.stderr


def test_unknown_flag_and_ignored_flag_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfbn.cli",
            "serve",
            "--model_base_path=x",
            "--not_a_tf_serving_flag=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    assert (
        proc.returncode == 2 and "unrecognized arguments: --not_a_tf_serving_flag=1" in proc.stderr
    )
    server = _Proc(
        [
            f"--port={_free_port()}",
            f"--model_base_path={HALF_PLUS_TWO}",
            "--per_process_gpu_memory_fraction=0.4",
            "--skip_initialize_tpu",
            "--file_system_poll_wait_seconds=0",
        ]
    )
    try:
        assert server.stop() == 0
    finally:
        server.stop()
    err = server.err()
    assert (
        err.count(
            "--per_process_gpu_memory_fraction=0.4: accepted, has no effect in the "
            "development server"
        )
        == 1
    )
    assert err.count("--skip_initialize_tpu=True: accepted, has no effect") == 1


def test_version_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "tfbn.cli", "serve", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0
    assert "TensorFlow Library: 2." in proc.stdout and "not TF Serving" in proc.stdout


# --- examples/tf_serving_docker.md ----------------------------------------------------------


def _docker_doc():
    return (ROOT / "examples" / "tf_serving_docker.md").read_text()


def _tf_serving_argument_lists(text):
    """The argument lists the walkthrough gives tensorflow_model_server: the image's
    entry point plus what follows the image name in each `docker run`, and each
    `tensorflow_model_server ...` line."""
    lists = []
    entry = re.search(
        r"`tensorflow_model_server (--port=8500\s+--rest_api_port=8501[^`]*)`", text, re.S
    )
    assert entry, "the entry point's command line is documented"
    base = shlex.split(entry.group(1))
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line) if line.strip() else []
            if words[:2] == ["docker", "run"] and "tensorflow/serving" in words:
                lists.append(base + words[words.index("tensorflow/serving") + 1 :])
            elif words[:1] == ["tensorflow_model_server"]:
                lists.append(words[1:])
    return lists


def test_docker_walkthrough_argument_lists_run_against_tfbn_serve(tmp_path):
    text = _docker_doc()
    lists = _tf_serving_argument_lists(text)
    assert len(lists) == 2, lists
    # The files the walkthrough mounts: a tfbn export, its batching file, a monitoring file.
    models = export_bn_models(str(tmp_path / "exports"))
    model_dir = tmp_path / "models" / "digits"
    shutil.copytree(models["frozen"], model_dir)
    config = tmp_path / "config"
    config.mkdir()
    for name, start in (
        ("batching.config", "max_batch_size"),
        ("models.config", "model_config_list"),
        ("monitoring.config", "prometheus_config"),
    ):
        body = re.search(rf"```\n({start}.*?)```", text, re.S).group(1)
        (config / name).write_text(body.replace('"/models/digits"', json.dumps(str(model_dir))))
    for argv in lists:
        # The image's environment (MODEL_NAME=digits, MODEL_BASE_PATH=/models), then only
        # the container's paths and the two ports change: every flag and value stays.
        argv = [
            a.replace("${MODEL_NAME}", "digits")
            .replace("${MODEL_BASE_PATH}", "/models")
            .replace("=/models/digits", f"={model_dir}")
            .replace("=/config/", f"={config}/")
            for a in argv
        ]
        port, rest = _free_port(), _free_port()
        argv = [a.replace("=8500", f"={port}").replace("=8501", f"={rest}") for a in argv]
        _serve_args(argv)  # the real parser takes them as they are
        server = _Proc(argv)
        try:
            if any(a.startswith("--monitoring_config_file") for a in argv):
                page = requests.get(
                    f"http://127.0.0.1:{rest}/monitoring/prometheus/metrics", timeout=30
                )
                assert page.status_code == 200 and "# TYPE" in page.text
            r = requests.get(f"http://127.0.0.1:{rest}/v1/models/digits", timeout=30)
            assert r.json()["model_version_status"][0]["state"] == "AVAILABLE", r.text
            x = np.zeros((1, 4), np.float32).tolist()
            r = requests.post(
                f"http://127.0.0.1:{rest}/v1/models/digits:predict",
                json={"instances": x},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        finally:
            assert server.stop() == 0


# --- config re-poll -------------------------------------------------------------------------


def _write_config(path, entries):
    body = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" {extra} }}\n'
        for name, base, extra in entries
    )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("model_config_list {\n" + body + "}\n")
    os.replace(tmp, path)


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    return False


def _status(srv, name):
    r = requests.get(f"{srv.rest_url}/v1/models/{name}", timeout=30)
    return r.status_code, r.json()


def test_model_config_file_is_re_read_while_serving(tmp_path):
    path = str(tmp_path / "models.config")
    two_versions = os.path.join(TESTDATA, "saved_model_half_plus_two_2_versions")
    _write_config(path, [("half_plus_two", HALF_PLUS_TWO, "")])
    models = _config.load_model_config_file(path)
    with DevServer(
        models,
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
        model_config_file=path,
        model_config_file_poll_wait_seconds=0.2,
    ) as srv:
        assert _predict(srv.grpc_target, "half_plus_two") == ([3.0], 123)
        # Replace the model by another one (TF Serving's testModelConfigReload).
        _write_config(path, [("half_plus_three", HALF_PLUS_THREE, "")])
        assert _wait_for(lambda: _predict(srv.grpc_target, "half_plus_three") == ([4.0], 123))
        assert _wait_for(lambda: _status(srv, "half_plus_two")[0] == 404)
        # Add a model with a version policy and a label on a version it will load.
        _write_config(
            path,
            [
                ("half_plus_three", HALF_PLUS_THREE, ""),
                ("two", two_versions, "model_version_policy { all {} }"),
            ],
        )
        assert _wait_for(
            lambda: (
                len(_status(srv, "two")[1].get("model_version_status", [])) == 2
                and all(
                    s["state"] == "AVAILABLE"
                    for s in _status(srv, "two")[1]["model_version_status"]
                )
            )
        )
        _write_config(
            path,
            [
                ("half_plus_three", HALF_PLUS_THREE, ""),
                (
                    "two",
                    two_versions,
                    'model_version_policy { all {} } version_labels { key: "stable" value: 123 }',
                ),
            ],
        )
        assert _wait_for(
            lambda: (
                requests.post(
                    f"{srv.rest_url}/v1/models/two/labels/stable:predict",
                    json={"instances": [1.0]},
                    timeout=30,
                ).status_code
                == 200
            )
        )
        # Back to the latest version only: 123 is unloaded.
        _write_config(path, [("two", two_versions, "")])
        assert _wait_for(
            lambda: (
                [
                    s["version"]
                    for s in _status(srv, "two")[1]["model_version_status"]
                    if s["state"] == "AVAILABLE"
                ]
                == ["124"]
            )
        )
        # A file that does not parse leaves the served models alone.
        Path(path).write_text("model_config_list { nonsense")
        time.sleep(0.6)
        assert _predict(srv.grpc_target, "two") == ([3.0], 124)


def test_zero_poll_period_reads_the_config_once(tmp_path):
    path = str(tmp_path / "models.config")
    _write_config(path, [("half_plus_two", HALF_PLUS_TWO, "")])
    with DevServer(
        _config.load_model_config_file(path),
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0,
        model_config_file=path,
        model_config_file_poll_wait_seconds=0,
    ) as srv:
        _write_config(path, [("half_plus_three", HALF_PLUS_THREE, "")])
        time.sleep(1.0)  # TF Serving's testModelConfigReloadWithZeroPollPeriod waits poll + 1 s
        assert _predict(srv.grpc_target, "half_plus_two") == ([3.0], 123)
        assert srv._config_thread is None


# --- monitoring ---------------------------------------------------------------------------


def test_monitoring_config_parsing():
    cfg = _metrics.load_monitoring_config(os.path.join(TESTDATA, "monitoring_config.txt"))
    assert cfg == _metrics.MonitoringConfig(enable=True, path="/monitoring/prometheus/metrics")
    assert (
        _metrics.parse_monitoring_config("prometheus_config { enable: true }").path
        == _metrics.DEFAULT_PATH
    )
    assert _metrics.parse_monitoring_config("").enable is False
    with pytest.raises(
        ValueError, match="Error parsing text-format tensorflow.serving.MonitoringConfig"
    ):
        _metrics.parse_monitoring_config("prometheus_config { enabled: true }")


def test_prometheus_metrics_count_requests_per_model_api_and_entrypoint():
    mon = _metrics.MonitoringConfig(enable=True, path="/metrics/custom")
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=0,
        monitoring=mon,
        file_system_poll_wait_seconds=0,
    ) as srv:
        for _ in range(3):
            _predict(srv.grpc_target)
        requests.post(
            srv.rest_url + "/v1/models/default:predict", json={"instances": [1.0]}, timeout=30
        )
        requests.post(
            srv.rest_url + "/v1/models/default:predict", json={"instances": "bad"}, timeout=30
        )
        with pytest.raises(grpc.RpcError):
            _predict(srv.grpc_target, model="missing")
        page = requests.get(srv.rest_url + "/metrics/custom", timeout=30).text
        samples = {}
        for line in page.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        count = ":tensorflow:serving:request_count_total"
        assert samples[f'{count}{{model_name="default",status="OK"}}'] == 4
        assert samples[f'{count}{{model_name="default",status="INVALID_ARGUMENT"}}'] == 1
        assert samples[f'{count}{{model_name="missing",status="NOT_FOUND"}}'] == 1
        latency = ":tensorflow:serving:request_latency_count"
        assert samples[f'{latency}{{API="Predict",entrypoint="GRPC",model_name="default"}}'] == 3
        assert samples[f'{latency}{{API="predict",entrypoint="REST",model_name="default"}}'] == 1
        assert "# TYPE :tensorflow:serving:request_latency histogram" in page
        assert (
            requests.get(srv.rest_url + "/monitoring/prometheus/metrics", timeout=30).status_code
            == 404
        )
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    ) as srv:  # no monitoring file: no endpoint
        assert (
            requests.get(srv.rest_url + "/monitoring/prometheus/metrics", timeout=30).status_code
            == 404
        )


# --- gRPC: Unix socket and channel arguments ---------------------------------------------


def test_grpc_on_a_unix_socket_only(tmp_path):
    sock = str(tmp_path / "grpc.sock")
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=None,
        grpc_socket_path=sock,
        file_system_poll_wait_seconds=0,
    ) as srv:
        assert srv.grpc_port is None
        assert _predict(f"unix:{sock}") == ([3.0], 123)
    assert not os.path.exists(sock)


def test_grpc_channel_arguments_reach_the_server():
    # A receive limit given as a channel argument overrides the server's own.
    args = _flags.parse_grpc_channel_arguments("grpc.max_receive_message_length=512")
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=None,
        grpc_channel_arguments=args,
        file_system_poll_wait_seconds=0,
    ) as srv:
        assert _predict(srv.grpc_target) == ([3.0], 123)
        channel = grpc.insecure_channel(srv.grpc_target)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "default"
        req.inputs["x"].CopyFrom(_tensor.to_tensor_proto(np.ones(1000, np.float32)))
        with pytest.raises(grpc.RpcError) as info:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()


# --- REST timeout and threads ---------------------------------------------------------------


def test_rest_api_timeout_answers_504():
    slow = _config.BatchingParameters(max_batch_size=64, batch_timeout_micros=3_000_000)
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=0,
        batching=slow,
        rest_api_timeout_in_ms=200,
        file_system_poll_wait_seconds=0,
    ) as srv:
        t0 = time.monotonic()
        r = requests.post(
            srv.rest_url + "/v1/models/default:predict", json={"instances": [1.0]}, timeout=30
        )
        assert r.status_code == 504, r.text
        assert time.monotonic() - t0 < 2.5  # answered at the deadline, not after the batch
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=0,
        rest_api_timeout_in_ms=5000,
        file_system_poll_wait_seconds=0,
    ) as srv:
        r = requests.post(
            srv.rest_url + "/v1/models/default:predict", json={"instances": [1.0]}, timeout=30
        )
        assert r.status_code == 200


@pytest.mark.parametrize("threads, batch_sizes", [(1, {1: 2}), (2, {2: 1})])
def test_rest_api_num_threads_caps_concurrent_requests(threads, batch_sizes):
    # Two concurrent single-row requests within one 1.5 s batching window: with two REST
    # threads they meet in one batch of 2; with one thread the second waits its turn.
    window = _config.BatchingParameters(max_batch_size=2, batch_timeout_micros=1_500_000)
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=None,
        rest_api_port=0,
        batching=window,
        rest_api_num_threads=threads,
        file_system_poll_wait_seconds=0,
    ) as srv:
        codes = []

        def call():
            r = requests.post(
                srv.rest_url + "/v1/models/default:predict", json={"instances": [1.0]}, timeout=30
            )
            codes.append(r.status_code)

        workers = [threading.Thread(target=call) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert codes == [200, 200]
        servable = srv.manager.get("default")
        assert dict(servable.batcher.batch_sizes) == batch_sizes


# --- load options: tags, thread pools ---------------------------------------------------------


def test_saved_model_tags_select_the_meta_graph(tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    version = tmp_path / "tagged" / "123"
    shutil.copytree(os.path.join(HALF_PLUS_TWO, "00000123"), version)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version / "saved_model.pb").read_bytes())
    del proto.meta_graphs[0].meta_info_def.tags[:]
    proto.meta_graphs[0].meta_info_def.tags.extend(["serve", "custom"])
    (version / "saved_model.pb").write_bytes(proto.SerializeToString())
    cfg = [_config.ModelConfig("default", str(tmp_path / "tagged"))]
    with DevServer(cfg, port=None, rest_api_port=0, file_system_poll_wait_seconds=0) as srv:
        (st,) = _status(srv, "default")[1]["model_version_status"]
        assert st["state"] == "END"
        assert (
            "Could not find meta graph def matching supplied tags: { serve }"
            in st["status"]["error_message"]
        )
    tags = _flags.parse_saved_model_tags("serve,custom")
    with DevServer(
        cfg,
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0,
        load_options=LoadOptions(saved_model_tags=tags),
    ) as srv:
        assert _predict(srv.grpc_target) == ([3.0], 123)


def test_thread_pool_flags_configure_tensorflow():
    code = (
        "from tfbn.serving._loading import configure_threads; import tensorflow as tf; "
        "print(configure_threads(3, 2, 0), tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads()); "
        "print(configure_threads(0, 0, 0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(3, 2) 3 2", "(0, 0)"]
    with pytest.raises(ValueError, match="You cannot configure all"):
        configure_threads(1, 1, 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        configure_threads(-1, 0, 0)
    # session parallelism alone sizes both pools of the TF1 Sessions.
    code = "from tfbn.serving._loading import configure_threads; print(configure_threads(0, 0, 2))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.stdout.strip() == "(2, 2)", out.stderr


def test_session_threads_reach_tf1_sessions():
    from tfbn.serving._servable import Servable

    servable = Servable(
        "default", 123, os.path.join(HALF_PLUS_TWO, "00000123"), session_threads=(2, 1)
    )
    try:
        assert servable.call("serving_default", {"x": np.array([[2.0]], np.float32)}, ["y"])[
            "y"
        ].tolist() == [[3.0]]
        config = servable._session.session._config  # noqa: SLF001 - the Session's ConfigProto
        assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (2, 1)
    finally:
        servable.close()


def test_cli_maps_flags_onto_the_server(monkeypatch):
    seen = {}
    from tfbn.serving import server

    monkeypatch.setattr(server, "serve", lambda models, **kw: seen.update(models=models, **kw) or 0)
    argv = [
        "serve",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--grpc_socket_path=/tmp/x.sock",
        "--rest_api_num_threads=3",
        "--rest_api_timeout_in_ms=1234",
        "--prefer_tflite_model",
        "--enable_model_warmup=false",
        "--num_request_iterations_for_warmup=4",
        "--saved_model_tags=serve,gpu",
        "--enable_signature_method_name_check",
        "--allow_version_labels_for_unavailable_models",
        f"--monitoring_config_file={TESTDATA}/monitoring_config.txt",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=2000",
        "--grpc_max_threads=5",
    ]
    assert cli.main(argv) == 0
    opts = seen["load_options"]
    assert (
        opts.prefer_tflite_model,
        opts.enable_model_warmup,
        opts.num_request_iterations_for_warmup,
        opts.saved_model_tags,
        opts.enable_signature_method_name_check,
    ) == (True, False, 4, ("serve", "gpu"), True)
    assert seen["grpc_socket_path"] == "/tmp/x.sock" and seen["rest_api_num_threads"] == 3
    assert seen["rest_api_timeout_in_ms"] == 1234 and seen["grpc_workers"] == 5
    assert seen["allow_version_labels_for_unavailable_models"] is True
    assert seen["monitoring"].enable is True
    assert seen["grpc_channel_arguments"] == [("grpc.max_connection_age_ms", 2000)]
    assert [m.name for m in seen["models"]] == ["default"]
    assert json.dumps(seen["port"]) == "8500"


def test_readme_flag_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert _flags.markdown_table() in readme


def test_handle_reload_config_request_over_grpc():
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    with DevServer(
        [_config.ModelConfig("half_plus_two", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0,
    ) as srv:
        channel = grpc.insecure_channel(srv.grpc_target)
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        req = model_management_pb2.ReloadConfigRequest()
        cfg = req.config.model_config_list.config.add(
            name="half_plus_three", base_path=HALF_PLUS_THREE, model_platform="tensorflow"
        )
        assert cfg.name == "half_plus_three"
        resp = stub.HandleReloadConfigRequest(req, timeout=60)
        assert resp.status.error_code == 0
        assert _predict(srv.grpc_target, "half_plus_three") == (
            [4.0],
            123,
        )  # loaded before the answer
        with pytest.raises(grpc.RpcError) as info:
            _predict(srv.grpc_target, "half_plus_two")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(
                    config=model_server_config_pb2.ModelServerConfig()
                ),
                timeout=60,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Only ModelConfigList is currently supported" in info.value.details()
        channel.close()


def test_profiler_service_writes_a_trace(tmp_path):
    # TF Serving's test_profiler_service_with_valid_trace_request, with our own client calls.
    from tensorflow.python.profiler import profiler_client

    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    ) as srv:
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                requests.post(
                    srv.rest_url + "/v1/models/default:predict",
                    json={"instances": [2.0, 3.0, 4.0]},
                    timeout=30,
                )

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            profiler_client.trace(srv.grpc_target, str(tmp_path / "logs"), 500, "", 3)
        finally:
            stop.set()
            worker.join(timeout=30)
    traces = list((tmp_path / "logs").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # Off: the profiler service is not there.
    with DevServer(
        [_config.ModelConfig("default", HALF_PLUS_TWO)],
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0,
        enable_profiler=False,
    ) as srv:
        with pytest.raises(Exception, match="(?i)unimplemented|unavailable|no trace"):
            profiler_client.trace(srv.grpc_target, str(tmp_path / "off"), 100, "", 1)
