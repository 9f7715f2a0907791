"""A development server that speaks TF Serving's protocol over SavedModels and TF Lite models.

For machines without `tensorflow_model_server` (no binary, no Docker): local checks,
tests and CI. It is NOT a production replacement for TF Serving: it runs models
through TensorFlow's Python runtime, has no TLS and no request logging, and is built
for correctness of the protocol and for surviving any client, not for throughput.

This module is the facade (`DevServer`, `serve()`); the parts live apart, one concern
each, as TF Serving splits its own server:

- `_status`: canonical status codes, ServingError, the HTTP mapping;
- `_tensor` / `_json_tensor`: TensorProto and REST JSON tensor codecs;
- `_servable`: one loaded version (load, validate against the SignatureDef, call);
- `_batcher`: server-side batching emulation (TF Serving's batching parameters);
- `_manager`: model management (polling base paths, version policies, labels, load
  retries, unloading);
- `_rest`: the REST route table on aiohttp's HTTP/1.1 server, with size and time limits;
- `_grpc`: the PredictionService and ModelService servicers;
- `_inference`: Classify, Regress and MultiInference over tf.Example inputs;
- `_loading` / `_warmup` / `_tflite`: load options, warm-up replay, TF Lite models;
- `_metrics`: Prometheus metrics with TF Serving's names; `_profiler`: the profiler service;
- `_flags`: every tensorflow_model_server flag, in one table.

What it implements, with TF Serving's names and behaviour:

- gRPC `tensorflow.serving.PredictionService` (Predict, GetModelMetadata, Classify,
  Regress, MultiInference) and `ModelService.GetModelStatus`, on TCP and/or a Unix
  domain socket, with `--grpc_channel_arguments`.
- REST `/v1/models/{name}[/versions/{v}|/labels/{l}][/metadata|:predict|:classify|:regress]`
  with the row ("instances") and columnar ("inputs") JSON formats, tf.Example
  `examples`/`context`, `{"error": ...}` bodies and TF Serving's mapping of status
  codes to HTTP statuses; a Prometheus page with `--monitoring_config_file`.
- Integer version directories under each base path, the latest / all / specific
  version policies, version labels (validated as ServerCore does), polling for new
  versions and for a changed `--model_config_file`, warm-up replay of
  `assets.extra/tf_serving_warmup_requests` before a version serves (a load or
  warm-up that fails leaves the previous version serving; in-flight requests finish on
  the version they started on).
- Server-side batching emulation configured by TF Serving's batching parameters file:
  requests are queued, concatenated along dimension 0 up to `max_batch_size` or until
  `batch_timeout_micros` passes, padded to the next `allowed_batch_sizes` entry with
  copies of a real row, run once, and split back.
- Binds 127.0.0.1 by default, caps request sizes, answers malformed requests with an
  error and keeps serving, and shuts down cleanly.

Every flag of tensorflow_model_server is in `tfbn.serving._flags` (one table).
TF1 signature inputs are fed without checking their static shapes against the
SignatureDef, as TF Serving's session-based runtime does (the half_plus_two fixtures
declare x as [-1, 1] and are queried with a flat list); see `_servable` for the checks
made before TensorFlow sees a tensor.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time

import grpc
from tfbn.serving import _grpc, _profiler, _rest
from tfbn.serving._batcher import Batcher
from tfbn.serving._config import BatchingParameters, ModelConfig
from tfbn.serving._loading import LoadOptions
from tfbn.serving._manager import (
    DEFAULT_LOAD_RETRY_INTERVAL_MICROS,
    DEFAULT_MAX_NUM_LOAD_RETRIES,
    ModelManager,
)
from tfbn.serving._metrics import Metrics, MonitoringConfig
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
log = logging.getLogger("tfbn.serving.server")
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
      grpc_workers: gRPC handler threads (--grpc_max_threads).
      grpc_socket_path: also serve gRPC on this Unix domain socket (--grpc_socket_path).
      grpc_channel_arguments: extra gRPC server options, (key, value) pairs
        (--grpc_channel_arguments, see `_flags.parse_grpc_channel_arguments`).
      rest_api_num_threads: REST requests processed at once (--rest_api_num_threads).
      rest_api_timeout_in_ms: REST deadline in milliseconds, 0 for none
        (--rest_api_timeout_in_ms).
      monitoring: a `_metrics.MonitoringConfig`; when enabled, Prometheus text on its
        path on the REST port (--monitoring_config_file).
      load_options: a `_loading.LoadOptions` (tags, TF Lite, warm-up, method-name check).
      allow_version_labels_for_unavailable_models: as the flag; False (TF Serving's
        default) means a label must point at an AVAILABLE version, so labels in the
        first config are rejected.
      model_config_file, model_config_file_poll_wait_seconds: re-read this
        ModelServerConfig file every so many seconds and apply changes (0: never).
      enable_profiler: serve `tensorflow.ProfilerService/Profile` on the gRPC port
        (--enable_profiler, default true).

    Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        models: list[ModelConfig],
        port: int | None = 0,
        rest_api_port: int | None = 0,
        host: str = "127.0.0.1",
        batching: BatchingParameters | None = None,
        file_system_poll_wait_seconds: float = 1.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        grpc_workers: int = 16,
        rest_api_num_threads: int = 16,
        rest_idle_timeout: float = DEFAULT_REST_IDLE_TIMEOUT,
        rest_body_timeout: float = DEFAULT_REST_BODY_TIMEOUT,
        max_num_load_retries: int = DEFAULT_MAX_NUM_LOAD_RETRIES,
        load_retry_interval_micros: int = DEFAULT_LOAD_RETRY_INTERVAL_MICROS,
        grpc_socket_path: str | None = None,
        grpc_channel_arguments: list[tuple[str, int | str]] = (),
        rest_api_timeout_in_ms: int = 30000,
        monitoring: MonitoringConfig | None = None,
        load_options: LoadOptions | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
        model_config_file: str | None = None,
        model_config_file_poll_wait_seconds: float = 0,
        enable_profiler: bool = True,
    ):
        if port is None and rest_api_port is None and not grpc_socket_path:
            raise ValueError(
                "enable at least one of gRPC (port or grpc_socket_path) and REST (rest_api_port)"
            )
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive; Received: {max_request_bytes}")
        for name, value in (
            ("rest_api_num_threads", rest_api_num_threads),
            ("rest_idle_timeout", rest_idle_timeout),
            ("rest_body_timeout", rest_body_timeout),
            ("grpc_workers", grpc_workers),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive; Received: {value}")
        if rest_api_timeout_in_ms < 0:
            raise ValueError(
                f"rest_api_timeout_in_ms must be >= 0; Received: {rest_api_timeout_in_ms}"
            )
        self.metrics = Metrics(monitoring) if monitoring is not None and monitoring.enable else None
        self.manager = ModelManager(
            models,
            batching,
            max_num_load_retries=max_num_load_retries,
            load_retry_interval_micros=load_retry_interval_micros,
            load_options=load_options,
            metrics=self.metrics,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
        )
        self.rest_api_num_threads = int(rest_api_num_threads)
        self.rest_idle_timeout, self.rest_body_timeout = (
            float(rest_idle_timeout),
            float(rest_body_timeout),
        )
        self.grpc_socket_path = grpc_socket_path or None
        self.grpc_channel_arguments = list(grpc_channel_arguments)
        self.rest_timeout = rest_api_timeout_in_ms / 1000 if rest_api_timeout_in_ms else None
        self.enable_profiler = bool(enable_profiler)
        self.model_config_file = model_config_file
        self.config_poll_wait = model_config_file_poll_wait_seconds
        self._config_stop = threading.Event()
        self._config_thread: threading.Thread | None = None
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
            if self._grpc_port_req is not None or self.grpc_socket_path:
                opts = {
                    "grpc.max_receive_message_length": self.max_request_bytes,
                    "grpc.max_send_message_length": -1,
                    "grpc.so_reuseport": 0,
                }
                opts.update(self.grpc_channel_arguments)  # --grpc_channel_arguments win
                self._grpc_pool = concurrent.futures.ThreadPoolExecutor(
                    self.grpc_workers, thread_name_prefix="tfbn-grpc"
                )
                self._grpc = grpc.server(
                    self._grpc_pool, options=list(opts.items()), maximum_concurrent_rpcs=None
                )
                pred, add_pred, models, add_models = _grpc.servicers(self)
                add_pred(pred, self._grpc)
                add_models(models, self._grpc)
                if self.enable_profiler:
                    self._grpc.add_generic_rpc_handlers((_profiler.handler(),))
                if self._grpc_port_req is not None:
                    bound = self._grpc.add_insecure_port(
                        f"{self._bracket(self.host)}:{self._grpc_port_req}"
                    )
                    if not bound:
                        raise OSError(f"could not bind gRPC to {self.host}:{self._grpc_port_req}")
                    self.grpc_port = bound
                if self.grpc_socket_path:
                    _remove_stale_socket(self.grpc_socket_path)
                    if not self._grpc.add_insecure_port(f"unix:{self.grpc_socket_path}"):
                        raise OSError(
                            f"could not bind gRPC to the Unix socket {self.grpc_socket_path}"
                        )
                self._grpc.start()
            if self._rest_port_req is not None:
                self._rest = _rest.RestServer(
                    self,
                    self.host,
                    self._rest_port_req,
                    max_request_bytes=self.max_request_bytes,
                    num_threads=self.rest_api_num_threads,
                    idle_timeout=self.rest_idle_timeout,
                    body_timeout=self.rest_body_timeout,
                )
                self._rest.start()
                self.rest_port = self._rest.port
        except BaseException:
            self.stop()
            raise
        self.manager.start_polling(self.poll_wait)
        if self.model_config_file and self.config_poll_wait > 0:
            self._config_stop.clear()
            self._config_thread = threading.Thread(
                target=self._poll_config, name="tfbn-config-poll", daemon=True
            )
            self._config_thread.start()
        self._started = True
        return self

    def _poll_config(self) -> None:
        """TF Serving's PollFilesystemAndReloadConfig: re-read --model_config_file every
        --model_config_file_poll_wait_seconds; a file that does not parse, or a config the
        manager rejects, is logged and the served models stay as they are."""
        from tfbn.serving._config import load_model_config_file

        current = list(self.manager.configs.values())
        while not self._config_stop.wait(self.config_poll_wait):
            try:
                models = load_model_config_file(self.model_config_file)
            except (OSError, ValueError) as err:
                log.error("Failed to read ModelServerConfig file: %s", err)
                continue
            if models == current:
                continue
            try:
                self.manager.reload_config(models)
                current = models
                log.info(
                    "Reloaded the model config from %s: %s",
                    self.model_config_file,
                    ", ".join(m.name for m in models),
                )
            except (ServingError, ValueError) as err:
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", err)

    @staticmethod
    def _bracket(host: str) -> str:
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace` s), release everything."""
        self._config_stop.set()
        if self._config_thread is not None:
            self._config_thread.join(timeout=grace)
            self._config_thread = None
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
        if self._grpc is not None and self.grpc_socket_path:
            _remove_stale_socket(self.grpc_socket_path)
        self._grpc = self._rest = None
        self._started = False

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket file left by an earlier server (never a regular file)."""
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def serve(
    models: list[ModelConfig],
    port: int | None = 8500,
    rest_api_port: int | None = None,
    host: str = "127.0.0.1",
    batching: BatchingParameters | None = None,
    file_system_poll_wait_seconds: float = 1.0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ready=print,
    **options,
) -> int:
    """Run a DevServer until SIGINT/SIGTERM (the body of `tfbn serve`). Returns 0.

    `options` are further DevServer arguments (timeouts, load retries, thread counts)."""
    import signal

    server = DevServer(
        models,
        port=port,
        rest_api_port=rest_api_port,
        host=host,
        batching=batching,
        file_system_poll_wait_seconds=file_system_poll_wait_seconds,
        max_request_bytes=max_request_bytes,
        **options,
    )
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
                    f"{s.version}:{get_state_name(s.state)}" for s in st.model_version_status
                )
            except ServingError as err:
                states = err.message
            ready(f"model {name}: {states}")
        parts = []
        if server.grpc_port is not None:
            parts.append(f"gRPC on {server.grpc_target}")
        if server.grpc_socket_path:
            parts.append(f"gRPC on unix:{server.grpc_socket_path}")
        if server.metrics is not None and server.rest_port is not None:
            parts.append(f"Prometheus metrics on {server.rest_url}{server.metrics.path}")
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


def models_from_flags(
    model_name: str | None, model_base_path: str | None, model_config_file: str | None
) -> list[ModelConfig]:
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
