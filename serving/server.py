"""A development server that speaks TF Serving's protocol over SavedModels.

For machines without `tensorflow_model_server` (no binary, no Docker): local checks,
tests and CI. It is NOT a production replacement for TF Serving: it runs models
through TensorFlow's Python runtime, has no TLS, monitoring or model warm-up, and is
built for correctness of the protocol and for surviving any client, not for throughput.

This module is the facade (`DevServer`, `serve()`); the parts live apart, one concern
each, as TF Serving splits its own server:

- `_status`: canonical status codes, ServingError, the HTTP mapping;
- `_tensor` / `_json_tensor`: TensorProto and REST JSON tensor codecs;
- `_servable`: one loaded version (load, validate against the SignatureDef, call);
- `_batcher`: server-side batching emulation (TF Serving's batching parameters);
- `_manager`: model management (polling base paths, version policies, labels, load
  retries, unloading);
- `_rest`: the REST route table on aiohttp's HTTP/1.1 server, with size and time limits;
- `_grpc`: the PredictionService and ModelService servicers.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import grpc
from tfbn.serving import _grpc, _rest
from tfbn.serving._batcher import Batcher
from tfbn.serving._config import BatchingParameters, ModelConfig
from tfbn.serving._manager import (
    DEFAULT_LOAD_RETRY_INTERVAL_MICROS,
    DEFAULT_MAX_NUM_LOAD_RETRIES,
    ModelManager,
)
from tfbn.serving._servable import Servable
from tfbn.serving._status import ServingError, http_status

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DevServer",
    "ModelManager",
    "Servable",
    "ServingError",
    "http_status",
    "serve",
]

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_REST_IDLE_TIMEOUT = 30.0  # seconds to deliver a request's headers, and keep-alive idle time
DEFAULT_REST_BODY_TIMEOUT = 60.0  # seconds to deliver a request body once its headers are in
_Batcher = Batcher  # the name tfbn.serving.invariance and the tests import


class DevServer:
    """The development server: gRPC and/or REST over a ModelManager.

    Args:
      models: `ModelConfig`s to serve (see `tfbn.serving._config`).
      port: gRPC port (0 picks a free one; None disables gRPC).
      rest_api_port: REST port (0 picks a free one; None disables REST).
      host: address to bind; 127.0.0.1 by default (use 0.0.0.0 deliberately).
      batching: `BatchingParameters` to emulate server-side batching, or None.
      file_system_poll_wait_seconds: seconds between polls of the base paths
        (0: poll once at start, as tensorflow_model_server).
      max_request_bytes: largest accepted request (REST body / gRPC message).
      grpc_workers: gRPC handler threads.

    Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(self, models: list[ModelConfig], port: int | None = 0,
                 rest_api_port: int | None = 0, host: str = "127.0.0.1",
                 batching: BatchingParameters | None = None,
                 file_system_poll_wait_seconds: float = 1.0,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, grpc_workers: int = 16,
                 rest_api_num_threads: int = 16,
                 rest_idle_timeout: float = DEFAULT_REST_IDLE_TIMEOUT,
                 rest_body_timeout: float = DEFAULT_REST_BODY_TIMEOUT,
                 max_num_load_retries: int = DEFAULT_MAX_NUM_LOAD_RETRIES,
                 load_retry_interval_micros: int = DEFAULT_LOAD_RETRY_INTERVAL_MICROS):
        if port is None and rest_api_port is None:
            raise ValueError("enable at least one of gRPC (port) and REST (rest_api_port)")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive; Received: {max_request_bytes}")
        for name, value in (("rest_api_num_threads", rest_api_num_threads),
                            ("rest_idle_timeout", rest_idle_timeout),
                            ("rest_body_timeout", rest_body_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be positive; Received: {value}")
        self.manager = ModelManager(models, batching, max_num_load_retries=max_num_load_retries,
                                    load_retry_interval_micros=load_retry_interval_micros)
        self.rest_api_num_threads = int(rest_api_num_threads)
        self.rest_idle_timeout, self.rest_body_timeout = float(rest_idle_timeout), float(rest_body_timeout)
        self.host = host
        self._grpc_port_req, self._rest_port_req = port, rest_api_port
        self.poll_wait = file_system_poll_wait_seconds
        self.max_request_bytes = int(max_request_bytes)
        self.grpc_workers = grpc_workers
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc = None
        self._grpc_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._rest: _rest.RestServer | None = None
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._started = False

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    def _enter(self):
        with self._inflight_cv:
            self._inflight += 1

    def _exit(self):
        with self._inflight_cv:
            self._inflight -= 1
            self._inflight_cv.notify_all()

    def start(self) -> DevServer:
        if self._started:
            return self
        self.manager.poll_once()
        try:
            if self._grpc_port_req is not None:
                opts = [("grpc.max_receive_message_length", self.max_request_bytes),
                        ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
                self._grpc_pool = concurrent.futures.ThreadPoolExecutor(
                    self.grpc_workers, thread_name_prefix="tfbn-grpc")
                self._grpc = grpc.server(self._grpc_pool, options=opts, maximum_concurrent_rpcs=None)
                pred, add_pred, models, add_models = _grpc.servicers(self)
                add_pred(pred, self._grpc)
                add_models(models, self._grpc)
                bound = self._grpc.add_insecure_port(f"{self._bracket(self.host)}:{self._grpc_port_req}")
                if not bound:
                    raise OSError(f"could not bind gRPC to {self.host}:{self._grpc_port_req}")
                self.grpc_port = bound
                self._grpc.start()
            if self._rest_port_req is not None:
                self._rest = _rest.RestServer(
                    self, self.host, self._rest_port_req, max_request_bytes=self.max_request_bytes,
                    num_threads=self.rest_api_num_threads, idle_timeout=self.rest_idle_timeout,
                    body_timeout=self.rest_body_timeout)
                self._rest.start()
                self.rest_port = self._rest.port
        except BaseException:
            self.stop()
            raise
        self.manager.start_polling(self.poll_wait)
        self._started = True
        return self

    @staticmethod
    def _bracket(host: str) -> str:
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace` s), release everything."""
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            self._rest.stop(grace)  # stops accepting, then waits for its in-flight requests
        deadline = time.monotonic() + grace
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(max(0.0, deadline - time.monotonic()))
        if grpc_done is not None:
            grpc_done.wait(grace)
        if self._grpc_pool is not None:
            self._grpc_pool.shutdown(wait=True, cancel_futures=True)
            self._grpc_pool = None
        self.manager.close()
        self._grpc = self._rest = None
        self._started = False

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(models: list[ModelConfig], port: int | None = 8500, rest_api_port: int | None = None,
          host: str = "127.0.0.1", batching: BatchingParameters | None = None,
          file_system_poll_wait_seconds: float = 1.0,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, ready=print, **options) -> int:
    """Run a DevServer until SIGINT/SIGTERM (the body of `tfbn serve`). Returns 0.

    `options` are further DevServer arguments (timeouts, load retries, thread counts)."""
    import signal

    server = DevServer(models, port=port, rest_api_port=rest_api_port, host=host, batching=batching,
                       file_system_poll_wait_seconds=file_system_poll_wait_seconds,
                       max_request_bytes=max_request_bytes, **options)
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread
            pass
    try:
        server.start()
        for name in server.manager.configs:
            try:
                st = server.manager.status(name)
                states = ", ".join(
                    f"{s.version}:{get_state_name(s.state)}" for s in st.model_version_status)
            except ServingError as err:
                states = err.message
            ready(f"model {name}: {states}")
        parts = []
        if server.grpc_port is not None:
            parts.append(f"gRPC on {server.grpc_target}")
        if server.rest_port is not None:
            parts.append(f"REST on {server.rest_url}")
        ready("tfbn development server (not TF Serving) ready: " + ", ".join(parts))
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def get_state_name(state: int) -> str:
    from tensorflow_serving.apis import get_model_status_pb2

    return get_model_status_pb2.ModelVersionStatus.State.Name(state)


def models_from_flags(model_name: str | None, model_base_path: str | None,
                      model_config_file: str | None) -> list[ModelConfig]:
    """The served models from tensorflow_model_server's flags: either
    --model_config_file, or --model_name (default "default") with --model_base_path."""
    from tfbn.serving._config import load_model_config_file

    if model_config_file:
        if model_base_path:
            raise ValueError("pass --model_config_file or --model_base_path, not both")
        return load_model_config_file(model_config_file)
    if not model_base_path:
        raise ValueError("pass --model_base_path (with --model_name) or --model_config_file")
    base = os.path.abspath(model_base_path)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--model_base_path {model_base_path!r} is not a directory")
    return [ModelConfig(name=model_name or "default", base_path=base)]

