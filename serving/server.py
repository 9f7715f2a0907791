"""A development server that speaks TF Serving's protocol over SavedModels.

For machines without `tensorflow_model_server` (no binary, no Docker): local checks,
tests and CI. It is NOT a production replacement for TF Serving: it runs models
through TensorFlow's Python runtime, has no request logging, monitoring, TLS,
model warm-up or resource accounting, and is built for correctness of the protocol,
not for throughput.

What it implements, with TF Serving's names and behaviour:

- gRPC `tensorflow.serving.PredictionService` (Predict, GetModelMetadata; Classify,
  Regress and MultiInference answer UNIMPLEMENTED) and `ModelService.GetModelStatus`.
- REST `/v1/models/{name}[/versions/{v}|/labels/{l}][/metadata|:predict]` with the row
  ("instances") and columnar ("inputs") JSON formats, `{"error": ...}` bodies and TF
  Serving's mapping of status codes to HTTP statuses.
- Integer version directories under each base path, the latest / all / specific
  version policies, version labels, polling for new versions (a load that fails
  leaves the previous version serving; in-flight requests finish on the version they
  started on).
- Server-side batching emulation configured by TF Serving's batching parameters file:
  requests are queued, concatenated along dimension 0 up to `max_batch_size` or until
  `batch_timeout_micros` passes, padded to the next `allowed_batch_sizes` entry with
  copies of a real row, run once, and split back.
- Binds 127.0.0.1 by default, caps request sizes, answers malformed requests with an
  error and keeps serving, and shuts down cleanly.

Signature inputs are fed without checking their static shapes against the
SignatureDef, as TF Serving's session-based runtime does (the half_plus_two fixtures
declare x as [-1, 1] and are queried with a flat list).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import http.server
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from typing import Any

import grpc
import numpy as np
from tfbn.serving import _tensor
from tfbn.serving._config import BatchingParameters, ModelConfig

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DevServer",
    "ModelManager",
    "Servable",
    "ServingError",
    "http_status",
]

log = logging.getLogger("tfbn.serving.server")

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHODS = ("tensorflow/serving/predict", "tensorflow/serving/classify",
                   "tensorflow/serving/regress")


class ServingError(Exception):
    """An error with a canonical (gRPC) status code, as TF Serving reports it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.code.name}: {self.message}"


def _err(name: str, message: str) -> ServingError:
    return ServingError(getattr(grpc.StatusCode, name), message)


_HTTP = {  # TF Serving's ToHTTPStatusCode (model_servers/http_server.cc)
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TF Serving answers for a canonical status code."""
    return _HTTP.get(code.name, 500)


def _tf_error(err: Exception) -> ServingError:
    """A TensorFlow runtime error as a ServingError with its canonical code."""
    import tensorflow as tf

    if isinstance(err, tf.errors.OpError):
        code = grpc.StatusCode[_OP_CODES.get(err.error_code, "UNKNOWN")]
        return ServingError(code, err.message.strip())
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


_OP_CODES = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
             5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
             9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
             13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


# --- one loaded SavedModel version ----------------------------------------------------

def _read_meta_graph(path: str, tags=("serve",)):
    from tensorflow.core.protobuf import saved_model_pb2

    pb, pbtxt = os.path.join(path, "saved_model.pb"), os.path.join(path, "saved_model.pbtxt")
    proto = saved_model_pb2.SavedModel()
    if os.path.isfile(pb):
        with open(pb, "rb") as f:
            proto.ParseFromString(f.read())
    elif os.path.isfile(pbtxt):
        from google.protobuf import text_format

        with open(pbtxt, encoding="utf-8") as f:
            text_format.Parse(f.read(), proto)
    else:
        raise _err("NOT_FOUND", "Could not find SavedModel .pb or .pbtxt at supplied export "
                                f"directory path: {path}")
    for mg in proto.meta_graphs:
        if set(mg.meta_info_def.tags) == set(tags):
            return mg
    raise _err("NOT_FOUND", "Could not find meta graph def matching supplied tags: { "
                            + " ".join(tags) + " }. To inspect available tag-sets in the "
                            "SavedModel, please use the SavedModel CLI: `saved_model_cli`")


class _SessionRunner:
    """TF1 SavedModels run the way TF Serving runs them: a Session over the MetaGraph, fed
    and fetched by the tensor names in the SignatureDef, with no static-shape check on
    the feeds (TF's Python loader cannot turn every TF1 signature into a function, e.g.
    half_plus_three's, and Session.run() rejects feeds TF Serving accepts)."""

    def __init__(self, path: str):
        import tensorflow as tf

        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)

    def run(self, sig, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        g = self.graph
        feeds = {}
        for alias, arr in inputs.items():
            t = g.get_tensor_by_name(sig.inputs[alias].name)
            feeds[t._as_tf_output()] = arr  # noqa: SLF001 - see the class docstring
        fetches = [g.get_tensor_by_name(sig.outputs[a].name)._as_tf_output() for a in outputs]
        results = self.session._call_tf_sessionrun(None, feeds, fetches, [], None)  # noqa: SLF001
        return {a: np.asarray(r) for a, r in zip(outputs, results, strict=True)}

    def close(self):
        self.session.close()


class Servable:
    """One version of one model, loaded with `tf.saved_model.load`.

    `run(signature, inputs)` validates the request against the SignatureDef the way TF
    Serving's predict_util does, then calls the signature's function on the raw tensors.
    """

    def __init__(self, name: str, version: int, path: str):
        import tensorflow as tf

        self.name, self.version, self.path = name, int(version), path
        self.meta_graph = _read_meta_graph(path)
        self.signature_defs = dict(self.meta_graph.signature_def)
        self._session: _SessionRunner | None = None
        self._functions, self._flat_names = {}, {}
        try:
            if not self.meta_graph.object_graph_def.nodes:  # a TF1 SavedModel
                self._session = _SessionRunner(path)
            else:
                self._loaded = tf.saved_model.load(path, tags=["serve"])
                self._functions = dict(self._loaded.signatures)
        except ServingError:
            raise
        except Exception as err:  # noqa: BLE001 - any load failure is reported, not raised through
            raise _tf_error(err) if isinstance(err, tf.errors.OpError) else _err(
                "INTERNAL", f"Failed to load SavedModel {path}: {type(err).__name__}: {err}") from None
        for key, fn in self._functions.items():
            specs = tf.nest.flatten(fn.structured_input_signature)
            kwargs = fn.structured_input_signature[1]
            self._flat_names[key] = [k for k in sorted(kwargs)] if len(specs) == len(kwargs) else None
        self.batcher: _Batcher | None = None
        self._users = 0
        self._retired = False
        self._use_lock = threading.Lock()

    def signature(self, name: str | None):
        key = name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(key)
        if sig is None:
            raise _err("INVALID_ARGUMENT", f'Serving signature name: "{key}" not found in signature def')
        return key, sig

    def validate(self, signature_name: str | None, inputs: dict[str, np.ndarray],
                 output_filter=()) -> tuple[str, list[str]]:
        """TF Serving's PreProcessPrediction: signature, input aliases, dtypes, outputs."""
        key, sig = self.signature(signature_name)
        if sig.method_name not in PREDICT_METHODS:
            raise _err("INVALID_ARGUMENT", "Expected prediction signature method_name to be one of {"
                       + ", ".join(PREDICT_METHODS) + "}. Was: " + sig.method_name)
        expected = set(sig.inputs)
        sent = set(inputs)
        if sent != expected:
            if len(sent) != len(expected):
                raise _err("INVALID_ARGUMENT",
                           f"input size does not match signature: {len(sent)}!={len(expected)} "
                           f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                           f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                           f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
            alias = sorted(sent - expected)[0]
            raise _err("INVALID_ARGUMENT", f"input tensor alias not found in signature: {alias}. "
                       f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.")
        for i, alias in enumerate(sorted(sig.inputs)):
            want = sig.inputs[alias].dtype
            got = _tensor.datatype_of(inputs[alias])
            if want != got:
                raise _err("INVALID_ARGUMENT", f"Expects arg[{i}] to be {_tensor.dtype_name(want)} "
                           f"but {_tensor.dtype_name(got)} is provided")
        outputs = list(output_filter) or sorted(sig.outputs)
        seen = set()
        for alias in outputs:
            if alias not in sig.outputs:
                raise _err("INVALID_ARGUMENT", f"output tensor alias not found in signature: {alias} "
                           f"Outputs expected to be in the set {{{','.join(sorted(sig.outputs))}}}.")
            if alias in seen:
                raise _err("INVALID_ARGUMENT", f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return key, outputs

    def call(self, key: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run a validated request (no batching)."""
        import tensorflow as tf

        if self._session is not None:
            try:
                return self._session.run(self.signature_defs[key], inputs, outputs)
            except tf.errors.OpError as err:
                raise _tf_error(err) from None
        fn = self._functions.get(key)
        if fn is None:
            raise _err("UNIMPLEMENTED", f"signature {key!r} has no function in this SavedModel")
        try:
            names = self._flat_names[key]
            tensors = []
            for alias in names or sorted(inputs):
                arr = inputs[alias]
                tensors.append(tf.constant(arr, dtype=tf.string) if arr.dtype.kind in "OSU"
                               else tf.constant(arr))
            if names is not None and hasattr(fn, "_call_flat"):
                result = fn._call_flat(tensors, fn.captured_inputs)
            else:
                result = fn(**dict(zip(names or sorted(inputs), tensors, strict=True)))
        except tf.errors.OpError as err:
            raise _tf_error(err) from None
        except (TypeError, ValueError) as err:
            raise _err("INVALID_ARGUMENT", str(err)) from None
        return {alias: np.asarray(result[alias]) for alias in outputs}

    def run(self, signature_name: str | None, inputs: dict[str, np.ndarray], output_filter=(),
            timeout: float | None = None) -> tuple[str, dict[str, np.ndarray]]:
        key, outputs = self.validate(signature_name, inputs, output_filter)
        if self.batcher is not None:
            return key, self.batcher.submit(self, key, inputs, outputs, timeout)
        return key, self.call(key, inputs, outputs)

    def acquire(self) -> Servable:
        with self._use_lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._use_lock:
            self._users -= 1
            last = self._retired and self._users == 0
        if last:
            self.close()

    def retire(self) -> None:
        """Unload once the last in-flight request lets go (TF Serving's handle refcount)."""
        with self._use_lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            threading.Thread(target=self.close, daemon=True).start()

    def close(self):
        if self.batcher is not None:
            self.batcher.close()
        if self._session is not None:
            self._session.close()


# --- batching emulation -------------------------------------------------------------

class _Task:
    __slots__ = ("key", "inputs", "outputs", "size", "enqueued", "event", "result", "error")

    def __init__(self, key, inputs, outputs, size):
        self.key, self.inputs, self.outputs, self.size = key, inputs, outputs, size
        self.enqueued = time.monotonic()
        self.event = threading.Event()
        self.result = None
        self.error = None


class _Batcher:
    """TF Serving's shared batch scheduler, emulated for one servable.

    Tasks with the same signature, input/output names and per-row shapes share a queue.
    A batch is closed when it reaches `max_batch_size` or when its oldest task has
    waited `batch_timeout_micros`; `num_batch_threads` workers run batches.
    """

    def __init__(self, params: BatchingParameters):
        self.params = params
        self._queues: dict[Any, collections.deque] = collections.OrderedDict()
        self._cv = threading.Condition()
        self._closing = False
        self.batches_run = 0
        self.batch_sizes: collections.Counter = collections.Counter()
        self._threads = [threading.Thread(target=self._loop, name=f"tfbn-batch-{i}", daemon=True)
                         for i in range(min(params.num_batch_threads, 8))]
        for t in self._threads:
            t.start()

    def submit(self, servable: Servable, key: str, inputs: dict[str, np.ndarray],
               outputs: list[str], timeout: float | None) -> dict[str, np.ndarray]:
        sizes = {a.shape[0] if a.ndim else None for a in inputs.values()}
        if len(sizes) != 1 or None in sizes:
            raise _err("INVALID_ARGUMENT",
                       "Batching Run() input tensors must have equal 0th-dimension size")
        size = sizes.pop()
        max_b = self.params.max_batch_size
        if size > max_b and not self.params.enable_large_batch_splitting:
            raise _err("INVALID_ARGUMENT",
                       f"Task size {size} is larger than maximum input batch size {max_b}")
        if size == 0:
            return servable.call(key, inputs, outputs)
        chunks = [(s, min(s + max_b, size)) for s in range(0, size, max_b)]
        qkey = (servable.version, key, tuple(sorted((n, a.dtype.str, a.shape[1:])
                                                    for n, a in inputs.items())), tuple(outputs))
        tasks = [_Task(qkey, {n: a[s:e] for n, a in inputs.items()}, outputs, e - s)
                 for s, e in chunks]
        with self._cv:
            if self._closing:
                raise _err("UNAVAILABLE", "the servable is being unloaded")
            queue = self._queues.setdefault(qkey, collections.deque())
            queued = sum(t.size for t in queue)
            if -(-(queued + size) // max_b) > self.params.max_enqueued_batches:
                raise _err("UNAVAILABLE",
                           "The batch scheduling queue to which this task was submitted is full")
            queue.extend(tasks)
            self._servable = servable
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for task in tasks:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not task.event.wait(remaining):
                raise _err("DEADLINE_EXCEEDED", "Deadline exceeded while waiting for the batch")
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].result
        return {n: np.concatenate([t.result[n] for t in tasks]) for n in outputs}

    def _take_batch(self):
        """Under the lock: the tasks of the next ready batch, or the seconds to wait."""
        max_b = self.params.max_batch_size
        timeout = self.params.batch_timeout_micros / 1e6
        now = time.monotonic()
        wait = None
        for qkey, queue in list(self._queues.items()):
            if not queue:
                del self._queues[qkey]
                continue
            total = sum(t.size for t in queue)
            ready_at = queue[0].enqueued + timeout
            if total >= max_b or now >= ready_at or self._closing:
                batch, n = [], 0
                while queue and n + queue[0].size <= max_b:
                    task = queue.popleft()
                    batch.append(task)
                    n += task.size
                return batch
            wait = ready_at - now if wait is None else min(wait, ready_at - now)
        return wait

    def _loop(self):
        while True:
            with self._cv:
                while True:
                    got = self._take_batch()
                    if isinstance(got, list):
                        break
                    if self._closing and not self._queues:
                        return
                    self._cv.wait(got)
                servable = self._servable
            self._run(servable, got)

    def _run(self, servable: Servable, batch: list[_Task]):
        first = batch[0]
        n = sum(t.size for t in batch)
        padded = self.params.padded_size(n)
        try:
            merged = {}
            for name in first.inputs:
                parts = [t.inputs[name] for t in batch]
                if padded > n:  # pad with copies of a real row (the first row of the batch)
                    parts.append(np.repeat(parts[0][:1], padded - n, axis=0))
                merged[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out = servable.call(first.key[1], merged, first.outputs)
            for name, arr in out.items():
                if arr.ndim == 0 or arr.shape[0] != padded:
                    raise _err("INTERNAL", "Batched output tensor's 0th dimension does not equal "
                               "the sum of the 0th dimension sizes of the input tensors "
                               f"(output {name!r} has shape {list(arr.shape)}, batch {padded})")
            start = 0
            for t in batch:
                t.result = {k: v[start:start + t.size] for k, v in out.items()}
                start += t.size
        except ServingError as err:
            for t in batch:
                t.error = err
        except Exception as err:  # noqa: BLE001 - reported to every waiting request
            for t in batch:
                t.error = _err("INTERNAL", f"{type(err).__name__}: {err}")
        with self._cv:
            self.batches_run += 1
            self.batch_sizes[padded] += 1
        for t in batch:
            t.event.set()

    def close(self):
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)


# --- models, versions, polling ------------------------------------------------------

@dataclasses.dataclass
class _VersionState:
    state: str = "LOADING"  # START, LOADING, AVAILABLE, UNLOADING, END (TF Serving's names)
    error: ServingError | None = None
    fingerprint: Any = None
    servable: Servable | None = None


def _version_dirs(base_path: str) -> dict[int, str]:
    try:
        names = os.listdir(base_path)
    except OSError:
        return {}
    out = {}
    for name in names:
        full = os.path.join(base_path, name)
        if name.isdigit() and os.path.isdir(full):
            out[int(name)] = full
    return out


def _fingerprint(path: str):
    stats = []
    for name in ("saved_model.pb", "saved_model.pbtxt", "variables"):
        try:
            st = os.stat(os.path.join(path, name))
            stats.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(stats)


class ModelManager:
    """Loads, serves and swaps model versions (TF Serving's ServerCore, in miniature)."""

    def __init__(self, models: list[ModelConfig], batching: BatchingParameters | None = None):
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; Received: {names}")
        self.configs = {m.name: m for m in models}
        self.batching = batching
        self._states: dict[str, dict[int, _VersionState]] = {m.name: {} for m in models}
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # polling
    def poll_once(self) -> None:
        """Look at every base path once; load new aspired versions, retire old ones."""
        with self._poll_lock:
            for name, cfg in self.configs.items():
                self._poll_model(name, cfg)

    def _poll_model(self, name: str, cfg: ModelConfig) -> None:
        on_disk = _version_dirs(cfg.base_path)
        aspired = [v for v in cfg.select(list(on_disk)) if v in on_disk]
        states = self._states[name]
        for v in sorted(aspired, reverse=True):
            st = states.get(v)
            fp = _fingerprint(on_disk[v])
            if st is not None and (st.state == "AVAILABLE" or (st.state == "END" and st.error
                                                               and st.fingerprint == fp)):
                continue
            with self._lock:
                states[v] = _VersionState("LOADING", fingerprint=fp)
            try:
                servable = Servable(name, v, on_disk[v])
                if self.batching is not None:
                    servable.batcher = _Batcher(self.batching)
            except ServingError as err:
                log.warning("Loading servable: {name: %s version: %d} failed: %s", name, v, err)
                with self._lock:
                    states[v] = _VersionState("END", error=err, fingerprint=fp)
                continue
            except Exception as err:  # noqa: BLE001 - a broken version must not stop the server
                log.warning("Loading servable: {name: %s version: %d} failed: %s", name, v, err)
                with self._lock:
                    states[v] = _VersionState("END", error=_err("INTERNAL", str(err)), fingerprint=fp)
                continue
            log.info("Successfully loaded servable version {name: %s version: %d}", name, v)
            with self._lock:
                states[v] = _VersionState("AVAILABLE", fingerprint=fp, servable=servable)
        # Retire versions no longer aspired, but never the last available one while no
        # aspired version is available (a broken new version leaves the old one serving).
        with self._lock:
            available_aspired = any(states.get(v) and states[v].state == "AVAILABLE" for v in aspired)
            retire = [v for v, st in states.items()
                      if st.state == "AVAILABLE" and v not in aspired and available_aspired]
            for v in retire:
                servable = states[v].servable
                states[v] = _VersionState("END", fingerprint=states[v].fingerprint)
                if servable is not None:
                    servable.retire()

    def start_polling(self, interval: float) -> None:
        if interval <= 0 or self._thread is not None:
            return

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001 - keep polling
                    log.exception("polling the model base paths failed")

        self._thread = threading.Thread(target=loop, name="tfbn-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            servables = [st.servable for s in self._states.values() for st in s.values() if st.servable]
        for s in servables:
            s.close()

    # lookups
    def _model(self, name: str):
        if name not in self.configs:
            return None
        return self._states[name]

    def _label_version(self, name: str, label: str) -> int:
        """The version a model's version label points at (TF Serving's error if none)."""
        cfg = self.configs.get(name)
        if cfg is None or label not in cfg.labels:
            raise _err("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
        return cfg.labels[label]

    def get(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request addresses (TF Serving's GetServableHandle)."""
        if version is not None and label:
            raise _err("INVALID_ARGUMENT", f"Both model version ({version}) and model version label "
                                           f"({label}) cannot be supplied.")
        with self._lock:
            states = self._model(name)
            if label:
                version = self._label_version(name, label)
            if version is not None:
                st = states.get(int(version)) if states is not None else None
                if st is None or st.state != "AVAILABLE":
                    raise _err("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
                return st.servable
            if states is None:
                raise _err("NOT_FOUND", f"Servable not found for request: Latest({name})")
            available = [v for v, st in states.items() if st.state == "AVAILABLE"]
            if available:
                return states[max(available)].servable
            failed = sorted((v, st) for v, st in states.items() if st.error is not None)
            if failed:
                v, st = failed[-1]
                raise _err("FAILED_PRECONDITION", f"Servable not available for request: Latest({name}): "
                           f"version {v} failed to load: {st.error.message}")
            raise _err("NOT_FOUND", f"Servable not found for request: Latest({name})")

    @contextlib.contextmanager
    def use(self, name: str, version: int | None = None, label: str | None = None):
        """`get`, holding the servable so a version swap cannot unload it mid-request."""
        with self._lock:
            servable = self.get(name, version, label).acquire()
        try:
            yield servable
        finally:
            servable.release()

    def status(self, name: str, version: int | None = None, label: str | None = None):
        """GetModelStatusResponse for a model (all versions it has seen) or one version."""
        from tensorflow_serving.apis import get_model_status_pb2

        with self._lock:
            states = self._model(name)
            if label:
                version = self._label_version(name, label)
            if version is not None:
                st = states.get(int(version)) if states is not None else None
                if st is None:
                    raise _err("NOT_FOUND", f"Could not find version {version} of model {name}")
                items = [(int(version), st)]
            else:
                if not states:
                    raise _err("NOT_FOUND", f"Could not find any versions of model {name}")
                items = sorted(states.items(), reverse=True)
            resp = get_model_status_pb2.GetModelStatusResponse()
            for v, st in items:
                mvs = resp.model_version_status.add(version=v)
                mvs.state = get_model_status_pb2.ModelVersionStatus.State.Value(st.state)
                mvs.status.SetInParent()
                if st.error is not None:
                    mvs.status.error_code = st.error.code.value[0]
                    mvs.status.error_message = st.error.message
            return resp

    def wait_until_loaded(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(s and all(st.state != "LOADING" for st in s.values())
                       for s in self._states.values()):
                    return
            time.sleep(0.05)


# --- the protocol, independent of transport -----------------------------------------

def _model_spec(spec_cls, servable: Servable, signature: str):
    spec = spec_cls(name=servable.name, signature_name=signature)
    spec.version.value = servable.version
    return spec


def metadata_response(manager: ModelManager, name: str, version: int | None, label: str | None,
                      fields=("signature_def",)):
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

    fields = list(fields)
    if not fields:
        raise _err("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != "signature_def":
            raise _err("INVALID_ARGUMENT", f"Metadata field {field} is not supported")
    servable = manager.get(name, version, label)
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.CopyFrom(_model_spec(model_pb2.ModelSpec, servable, ""))
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    resp.metadata["signature_def"].Pack(sig_map)
    return resp


def metadata_json(resp) -> str:
    """TF Serving's REST rendering of GetModelMetadataResponse (field names preserved)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    from tfbn._compat import message_to_dict

    opts = dict(preserving_proto_field_name=True, print_default_fields=True)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sig_map)
    return json.dumps({"model_spec": message_to_dict(resp.model_spec, **opts),
                       "metadata": {"signature_def": message_to_dict(sig_map, **opts)}},
                      indent=1)


def status_json(resp) -> str:
    from tfbn._compat import message_to_dict

    return json.dumps(message_to_dict(resp, print_default_fields=True), indent=1)


# --- REST JSON -> tensors (TF Serving's json_tensor rules) ---------------------------

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_JSON_TYPES = {type(None): "Null", bool: "Boolean", dict: "Object", list: "Array", str: "String",
               int: "Number", float: "Number"}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int16": (-(2**31), 2**31 - 1),
               "int8": (-(2**31), 2**31 - 1), "uint8": (-(2**31), 2**31 - 1),
               "uint16": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
               "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}


def _json_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, separators=(",", ":"))


def _type_name(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return _JSON_TYPES.get(type(v), "Unknown")


def _check_leaf(v, dt: int):
    from tensorflow.core.framework import types_pb2 as T

    def type_error():
        return _err("INVALID_ARGUMENT", f"JSON Value: {_json_text(v)} Type: {_type_name(v)} is not "
                                        f"of expected type: {_tensor.dtype_name(dt)}")

    if dt in (T.DT_FLOAT, T.DT_DOUBLE, T.DT_HALF):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise type_error()
        if dt == T.DT_FLOAT:
            if isinstance(v, int) and abs(v) > 2**24 - 1 or (
                    isinstance(v, float) and math.isfinite(v) and abs(v) > _FLOAT32_MAX):
                raise _err("INVALID_ARGUMENT", f"Cannot convert JSON value: {_json_text(v)} to float "
                                               "without loss of precision.")
        return v
    if dt == T.DT_STRING:
        if isinstance(v, str):
            return v.encode("utf-8")
        if isinstance(v, dict):
            if set(v) == {"b64"} and isinstance(v["b64"], str):
                import base64
                import binascii

                try:
                    return base64.b64decode(v["b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise _err("INVALID_ARGUMENT", "Unable to base64 decode") from None
            raise _err("INVALID_ARGUMENT", f"JSON Value: {_json_text(v)} not formatted correctly for "
                                           "base64 data")
        raise type_error()
    if dt == T.DT_BOOL:
        if not isinstance(v, bool):
            raise type_error()
        return v
    name = _tensor.dtype_name(dt)
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise type_error()
        return v
    raise _err("UNIMPLEMENTED", f"Conversion of JSON Value: {_json_text(v)} to type: {name}")


def _dense_shape(val) -> list[int]:
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _flatten(val, level: int, shape: list[int], dt: int, out: list):
    if not isinstance(val, list):
        if level != len(shape):
            raise _err("INVALID_ARGUMENT", f"JSON Value: {_json_text(val)} found at incorrect level: "
                                           f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
        out.append(_check_leaf(val, dt))
        return
    if level >= len(shape):
        raise _err("INVALID_ARGUMENT",
                   f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(val) != shape[level]:
        raise _err("INVALID_ARGUMENT", f"Encountered list at unexpected size: {len(val)} at level: "
                                       f"{level} expected size: {shape[level]}")
    for v in val:
        _flatten(v, level + 1, shape, dt, out)


def json_tensor(val, dt: int) -> np.ndarray:
    shape = _dense_shape(val)
    flat: list = []
    _flatten(val, 0, shape, dt, flat)
    np_type = _tensor.numpy_dtype(dt)
    if np_type == np.object_:
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=np_type).reshape(shape)


def _is_element_object(v) -> bool:
    return isinstance(v, dict) and not (set(v) == {"b64"} and isinstance(v.get("b64"), str))


def parse_predict_json(body: bytes, sig_inputs_of) -> tuple[str, dict[str, np.ndarray], str]:
    """Parse a REST predict body into (signature_name, named arrays, "row"|"columnar").

    `sig_inputs_of(signature_name)` returns the SignatureDef's inputs map (name -> TensorInfo).
    """
    if not body.strip():
        raise _err("INVALID_ARGUMENT", "JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError as err:
        raise _err("INVALID_ARGUMENT", f"JSON Parse error: Invalid encoding in string. at offset: "
                                       f"{err.start}") from None
    except json.JSONDecodeError as err:
        raise _err("INVALID_ARGUMENT", f"JSON Parse error: {err.msg} at offset: {err.pos}") from None
    except RecursionError:
        raise _err("INVALID_ARGUMENT", "JSON Parse error: nesting too deep") from None
    if not isinstance(doc, dict):
        raise _err("INVALID_ARGUMENT", f"JSON Value: {_json_text(doc)[:200]} Is not object")
    sig = doc.get("signature_name", "")
    if not isinstance(sig, str):
        raise _err("INVALID_ARGUMENT", f"JSON Value: {_json_text(doc)[:200]} not formatted correctly. "
                                       "'signature_name' key must be a string value.")
    infos = sig_inputs_of(sig)
    if not infos:
        raise _err("INVALID_ARGUMENT", f"Failed to get input map for signature: {sig or 'DEFAULT'}")
    names = sorted(infos)
    if "instances" in doc and "inputs" in doc:
        raise _err("INVALID_ARGUMENT", "JSON Value: {...} Not formatted correctly expecting only one "
                                       "of 'inputs' or 'instances' keys to exist ")
    if "instances" in doc:
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise _err("INVALID_ARGUMENT", "JSON Value: {...} Excepting 'instances' to be an list/array")
        if not inst:
            raise _err("INVALID_ARGUMENT", "JSON Value: {...} No values in 'instances' array")
        objects = _is_element_object(inst[0])
        if not isinstance(inst[0], dict) and len(names) > 1:
            raise _err("INVALID_ARGUMENT", "instances is a plain list, but expecting list of objects "
                                           "as multiple input tensors required as per tensorinfo_map")
        columns: dict[str, list] = {n: [] for n in names}
        for i, elem in enumerate(inst):
            if objects:
                if not _is_element_object(elem):
                    raise _err("INVALID_ARGUMENT", f"Expecting object but got list at item {i} of input list")
                for key in elem:
                    if key not in infos:
                        raise _err("INVALID_ARGUMENT", f"Failed to process element: {i} key: {key} of "
                                   f"'instances' list. Error: INVALID_ARGUMENT: JSON object: does not "
                                   f"have named input: {key}")
                if set(elem) != set(names):
                    raise _err("INVALID_ARGUMENT", f"Failed to process element: {i} of 'instances' list. "
                               f"JSON object: {_json_text(elem)[:200]} keys must be equal to: "
                               f"{','.join(names)}")
                for key in names:
                    columns[key].append(elem[key])
            else:
                if _is_element_object(elem):
                    raise _err("INVALID_ARGUMENT",
                               f"Expecting value/list but got object at item {i} of input list")
                columns[names[0]].append(elem)
        arrays = {}
        for key, items in columns.items():
            dt = infos[key].dtype
            rows = []
            for i, item in enumerate(items):
                try:
                    rows.append(json_tensor(item, dt))
                except ServingError as err:
                    where = f"{i} key: {key}" if objects else f"{i}"
                    raise _err("INVALID_ARGUMENT", f"Failed to process element: {where} of "
                               f"'instances' list. Error: {err}") from None
            shapes = {r.shape for r in rows}
            if len(shapes) > 1:
                first = rows[0].shape
                bad = next(r.shape for r in rows if r.shape != first)
                raise _err("INVALID_ARGUMENT", f"Failed to process element: 1 of 'instances' list. "
                           f"Error: INVALID_ARGUMENT: Expecting shape [{','.join(map(str, first))}] but "
                           f"got: [{','.join(map(str, bad))}]")
            arrays[key] = np.stack(rows) if rows else np.zeros((0,))
        return sig, arrays, "row"
    if "inputs" in doc:
        val = doc["inputs"]
        if not isinstance(val, dict) or not _is_element_object(val):
            if len(names) > 1:
                raise _err("INVALID_ARGUMENT", "inputs is a plain value/list, but expecting an object as "
                                               "multiple input tensors required as per tensorinfo_map")
            return sig, {names[0]: json_tensor(val, infos[names[0]].dtype)}, "columnar"
        arrays = {}
        for key in names:
            if key not in val:
                raise _err("INVALID_ARGUMENT", f"Missing named input: {key} in 'inputs' object.")
            arrays[key] = json_tensor(val[key], infos[key].dtype)
        for key in val:
            if key not in infos:
                raise _err("INVALID_ARGUMENT", f"input tensor alias not found in signature: {key}. "
                           f"Inputs expected to be in the set {{{','.join(names)}}}.")
        return sig, arrays, "columnar"
    raise _err("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")


def predict_json(outputs: dict[str, np.ndarray], fmt: str) -> str:
    binary = {n for n in outputs if n.endswith("_bytes")}
    if fmt == "row":
        batch = None
        for name, arr in outputs.items():
            if arr.ndim == 0:
                raise _err("INVALID_ARGUMENT", f"Tensor name: {name} has no shape information ")
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise _err("INVALID_ARGUMENT", f"Tensor name: {name} has inconsistent batch size: "
                                               f"{arr.shape[0]} expecting: {batch}")
        return '{"predictions": ' + _tensor.rows_to_json(outputs, binary) + "}"
    if len(outputs) == 1:
        (name, arr), = outputs.items()
        return '{"outputs": ' + _tensor.array_to_json(arr, name in binary) + "}"
    parts = [f"{json.dumps(n)}: {_tensor.array_to_json(a, n in binary)}" for n, a in outputs.items()]
    return '{"outputs": {' + ", ".join(parts) + "}}"


# --- REST transport -----------------------------------------------------------------

_PREDICT_RE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:"
                         r"(classify|regress|predict)", re.IGNORECASE)
_STATUS_RE = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
                        re.IGNORECASE)


class _RestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = "tfbn-devserver"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet by default
        log.debug("REST %s " + fmt, self.address_string(), *args)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, headers) as JSON, on HTTP/1.1."""
        if not getattr(self, "request_version", "").startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        text = message or http.server.BaseHTTPRequestHandler.responses.get(code, ("Error",))[0]
        try:
            self._reply(code, json.dumps({"error": text}))
        except OSError:
            pass

    def _reply(self, status: int, body: str):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ServingError, status: int | None = None):
        self._reply(status or http_status(err.code), json.dumps({"error": err.message}))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _other(self):
        self._read_body()
        self._error(_err("INVALID_ARGUMENT", f"Malformed request: {self.command} {self.path}"))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _other

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                self._error(_err("INVALID_ARGUMENT", "chunked request bodies are not supported; "
                                                     "send a Content-Length"), 411)
                return None
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(_err("INVALID_ARGUMENT", f"Invalid Content-Length: {length!r}"))
            return None
        limit = self.server.dev.max_request_bytes
        if n > limit:
            self.close_connection = True  # do not read it
            self._error(_err("RESOURCE_EXHAUSTED", f"Request body of {n} bytes exceeds the limit of "
                                                   f"{limit} bytes (--max_request_bytes)"), 413)
            return None
        return self.rfile.read(n)

    def _handle(self, method: str):
        dev: DevServer = self.server.dev
        dev._enter()
        try:
            body = self._read_body() if method == "POST" else b""
            if body is None:
                return
            if method == "GET" and self.headers.get("Content-Length"):
                self._read_body()
            path = urllib.parse.urlsplit(self.path).path
            try:
                status, out = dev.handle_rest(method, path, body)
            except ServingError as err:
                self._error(err)
                return
            except Exception as err:  # noqa: BLE001 - the server keeps serving
                log.exception("REST %s %s failed", method, path)
                self._error(_err("INTERNAL", f"{type(err).__name__}: {err}"))
                return
            self._reply(status, out)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            dev._exit()


class _RestServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, dev: DevServer):
        self.dev = dev
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _RestHandler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _RestServer6(_RestServer):
    address_family = socket.AF_INET6


# --- gRPC transport -----------------------------------------------------------------

def _grpc_servicers(dev: DevServer):
    from tensorflow_serving.apis import (
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    def guard(fn):
        def wrapper(self, request, context):
            dev._enter()
            try:
                return fn(self, request, context)
            except ServingError as err:
                context.abort(err.code, err.message)
            except ValueError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            except Exception as err:  # noqa: BLE001 - the server keeps serving
                if isinstance(err, grpc.RpcError) or type(err).__name__ == "_AbortError":
                    raise
                log.exception("gRPC %s failed", fn.__name__)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
            finally:
                dev._exit()
        wrapper.__name__ = fn.__name__
        return wrapper

    def spec_args(spec):
        version = spec.version.value if spec.HasField("version") else None
        return spec.name, version, spec.version_label or None

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guard
        def Predict(self, request, context):
            name, version, label = spec_args(request.model_spec)
            inputs = {}
            for alias, proto in request.inputs.items():
                try:
                    inputs[alias] = _tensor.from_tensor_proto(proto)
                except ValueError as err:
                    raise _err("INVALID_ARGUMENT", f"tensor parsing error: {alias}: {err}") from None
            with dev.manager.use(name, version, label) as servable:
                key, outputs = servable.run(request.model_spec.signature_name, inputs,
                                            list(request.output_filter),
                                            timeout=context.time_remaining())
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = servable.name
            resp.model_spec.version.value = servable.version
            resp.model_spec.signature_name = key
            for alias, arr in outputs.items():
                resp.outputs[alias].CopyFrom(_tensor.to_tensor_proto(arr, typed_fields=True))
            return resp

        @guard
        def GetModelMetadata(self, request, context):
            name, version, label = spec_args(request.model_spec)
            return metadata_response(dev.manager, name, version, label, request.metadata_field)

        def _unimplemented(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "not implemented by the tfbn development server (use Predict)")

        Classify = Regress = MultiInference = _unimplemented

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        @guard
        def GetModelStatus(self, request, context):
            if not request.HasField("model_spec"):
                raise _err("INVALID_ARGUMENT", "Missing ModelSpec")
            name, version, label = spec_args(request.model_spec)
            return dev.manager.status(name, version, label)

        def HandleReloadConfigRequest(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "not implemented by the tfbn development server")

    return (Prediction(), prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            Models(), model_service_pb2_grpc.add_ModelServiceServicer_to_server)


# --- the server -----------------------------------------------------------------------

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
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, grpc_workers: int = 16):
        if port is None and rest_api_port is None:
            raise ValueError("enable at least one of gRPC (port) and REST (rest_api_port)")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive; Received: {max_request_bytes}")
        self.manager = ModelManager(models, batching)
        self.host = host
        self._grpc_port_req, self._rest_port_req = port, rest_api_port
        self.poll_wait = file_system_poll_wait_seconds
        self.max_request_bytes = int(max_request_bytes)
        self.grpc_workers = grpc_workers
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc = None
        self._rest: _RestServer | None = None
        self._rest_thread: threading.Thread | None = None
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
                self._grpc = grpc.server(
                    concurrent.futures.ThreadPoolExecutor(self.grpc_workers,
                                                          thread_name_prefix="tfbn-grpc"),
                    options=opts, maximum_concurrent_rpcs=None)
                pred, add_pred, models, add_models = _grpc_servicers(self)
                add_pred(pred, self._grpc)
                add_models(models, self._grpc)
                bound = self._grpc.add_insecure_port(f"{self._bracket(self.host)}:{self._grpc_port_req}")
                if not bound:
                    raise OSError(f"could not bind gRPC to {self.host}:{self._grpc_port_req}")
                self.grpc_port = bound
                self._grpc.start()
            if self._rest_port_req is not None:
                cls = _RestServer6 if ":" in self.host else _RestServer
                self._rest = cls((self.host, self._rest_port_req), self)
                self.rest_port = self._rest.server_address[1]
                self._rest_thread = threading.Thread(target=self._rest.serve_forever,
                                                     kwargs={"poll_interval": 0.2},
                                                     name="tfbn-rest", daemon=True)
                self._rest_thread.start()
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
        if self._rest is not None:
            self._rest.shutdown()
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        deadline = time.monotonic() + grace
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(max(0.0, deadline - time.monotonic()))
        if grpc_done is not None:
            grpc_done.wait(grace)
        if self._rest is not None:
            self._rest.close_connections()
            self._rest.server_close()
            if self._rest_thread is not None:
                self._rest_thread.join(timeout=grace)
        self.manager.close()
        self._grpc = self._rest = None
        self._started = False

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # REST dispatch (the part of TF Serving's HttpRestApiHandler this server needs)
    def handle_rest(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        if not re.fullmatch(r"/v1/.*", path, re.IGNORECASE):
            raise _err("NOT_FOUND", f"Not found: {method} {path} (the REST API lives under /v1/)")
        malformed = _err("INVALID_ARGUMENT", f"Malformed request: {method} {path}")
        if method == "POST":
            m = _PREDICT_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label, verb = m.groups()
            name = urllib.parse.unquote(name)
            label = urllib.parse.unquote(label) if label else None
            version = int(version) if version else None
            if verb.lower() != "predict":
                raise _err("UNIMPLEMENTED", f"{verb} is not implemented by the tfbn development "
                                            "server (use :predict)")
            with self.manager.use(name, version, label) as servable:

                def infos(sig):
                    return servable.signature(sig)[1].inputs

                sig, inputs, fmt = parse_predict_json(body, infos)
                _, outputs = servable.run(sig, inputs)
            return 200, predict_json(outputs, fmt)
        if method == "GET":
            m = _STATUS_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label, sub = m.groups()
            if not name:
                raise _err("INVALID_ARGUMENT", "Missing model name in request.")
            name = urllib.parse.unquote(name)
            label = urllib.parse.unquote(label) if label else None
            version = int(version) if version else None
            if sub:
                return 200, metadata_json(metadata_response(self.manager, name, version, label))
            return 200, status_json(self.manager.status(name, version, label))
        raise malformed


def serve(models: list[ModelConfig], port: int | None = 8500, rest_api_port: int | None = None,
          host: str = "127.0.0.1", batching: BatchingParameters | None = None,
          file_system_poll_wait_seconds: float = 1.0,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, ready=print) -> int:
    """Run a DevServer until SIGINT/SIGTERM (the body of `tfbn serve`). Returns 0."""
    import signal

    server = DevServer(models, port=port, rest_api_port=rest_api_port, host=host, batching=batching,
                       file_system_poll_wait_seconds=file_system_poll_wait_seconds,
                       max_request_bytes=max_request_bytes)
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
