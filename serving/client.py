"""A client for TF Serving's REST and gRPC APIs (on the official tensorflow-serving-api stubs).

    client = RestClient("http://localhost:8501", "my_model", timeout=5.0)
    sig = client.metadata().signature()           # names, dtypes, shapes: never hard-coded
    out = client.predict({"x": np.ones((4, 3), np.float32)})   # dict of float32 arrays

`GrpcClient("localhost:8500", "my_model")` has the same methods. Both:

- predict with the columnar ("inputs") or row ("instances") JSON format over REST,
  TensorProtos over gRPC; outputs decoded to the signature's dtypes (float32 exact);
- `metadata()` (GetModelMetadata) and `status()` (GetModelStatus);
- select a version (`version=`) or a version label (`label=`), per client or per call;
- put an explicit deadline on every call (`timeout=`, seconds): connect, send and every
  read together, so a server trickling bytes cannot stretch it (REST: the connection is
  shut down at the deadline; gRPC: the call's deadline); retry, with exponential
  backoff and within that deadline, only when the server is UNAVAILABLE;
- speak bfloat16 (DT_BFLOAT16) as TF Serving does: JSON numbers over REST, TensorProto
  `half_val` (the upper 16 bits of the float32) or `tensor_content` over gRPC, NumPy
  arrays of `ml_dtypes.bfloat16` on the Python side;
- raise `TFServingError` carrying the canonical status code, the HTTP status (REST) or
  gRPC code, and TF Serving's error message.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from tfbn.serving import _tensor

__all__ = [
    "GrpcClient",
    "ModelMetadata",
    "RestClient",
    "SignatureInfo",
    "TFServingError",
    "TensorInfo",
    "VersionStatus",
    "connect",
]

_HTTP_TO_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    411: "INVALID_ARGUMENT",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


# --- REST deadlines ------------------------------------------------------------------------
# requests/urllib3 time out each socket operation, not the call: a server sending one byte
# every 0.2 s keeps a 3 s call alive forever. Each attempt records the connections it sends
# on (thread-local: requests run in the caller's thread), and a timer shuts them down at the
# deadline, which ends any blocked send or read at once.

_ATTEMPT = threading.local()
_ADAPTER = None


def _deadline_adapter():
    global _ADAPTER
    if _ADAPTER is None:
        import requests.adapters
        import urllib3
        from urllib3.connection import HTTPConnection, HTTPSConnection

        class Watched:
            def request(self, *args, **kwargs):
                connections = getattr(_ATTEMPT, "connections", None)
                if connections is not None:
                    connections.append(self)
                return super().request(*args, **kwargs)

        class Connection(Watched, HTTPConnection):
            pass

        class SecureConnection(Watched, HTTPSConnection):
            pass

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = Connection

        class SecurePool(urllib3.HTTPSConnectionPool):
            ConnectionCls = SecureConnection

        class DeadlineAdapter(requests.adapters.HTTPAdapter):
            def init_poolmanager(self, *args, **kwargs):
                super().init_poolmanager(*args, **kwargs)
                self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}

        _ADAPTER = DeadlineAdapter
    return _ADAPTER


class _Deadline:
    """Shuts down the connections of the current attempt when `seconds` have passed."""

    def __init__(self, seconds: float):
        self.connections: list = []
        self.fired = threading.Event()
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def _fire(self):
        self.fired.set()
        for connection in list(self.connections):
            sock = getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self):
        _ATTEMPT.connections = self.connections
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        _ATTEMPT.connections = None


class TFServingError(Exception):
    """A failed call. `code` is the canonical status name ("NOT_FOUND", "UNAVAILABLE", ...);
    `http_status` (REST) or `grpc_code` (gRPC) is what the transport said; `message` is
    TF Serving's error text; `target` the server address."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        grpc_code: Any = None,
        target: str = "",
    ):
        self.code, self.message = code, message
        self.http_status, self.grpc_code, self.target = http_status, grpc_code, target
        where = f" from {target}" if target else ""
        transport = (
            f"HTTP {http_status}"
            if http_status is not None
            else f"gRPC {grpc_code.name}"
            if grpc_code is not None
            else code
        )
        super().__init__(f"{code} ({transport}){where}: {message}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str  # the alias clients use
    dtype: str  # "DT_FLOAT", ...
    shape: tuple[int, ...] | None  # -1 for unknown dims; None for unknown rank
    tensor_name: str = ""

    @property
    def numpy_dtype(self) -> np.dtype:
        from tensorflow.core.framework import types_pb2

        return _tensor.numpy_dtype(types_pb2.DataType.Value(self.dtype))


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    name: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    model_name: str
    version: int
    signatures: dict[str, SignatureInfo]

    def signature(self, name: str | None = None) -> SignatureInfo:
        key = name or "serving_default"
        if key not in self.signatures:
            raise KeyError(f"signature {key!r} not found; the model has {sorted(self.signatures)}")
        return self.signatures[key]


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str = "OK"
    error_message: str = ""


def _metadata_from_json(model_spec: Mapping, sig_map: Mapping) -> ModelMetadata:
    def info(alias, d):
        shape = d.get("tensor_shape", {})
        dims = (
            None
            if shape.get("unknown_rank")
            else tuple(int(x.get("size", 0)) for x in shape.get("dim", []))
        )
        return TensorInfo(alias, d.get("dtype", "DT_INVALID"), dims, d.get("name", ""))

    sigs = {}
    for key, s in sig_map.get("signature_def", {}).items():
        sigs[key] = SignatureInfo(
            key,
            s.get("method_name", ""),
            {a: info(a, d) for a, d in s.get("inputs", {}).items()},
            {a: info(a, d) for a, d in s.get("outputs", {}).items()},
        )
    return ModelMetadata(model_spec.get("name", ""), int(model_spec.get("version", 0) or 0), sigs)


def _as_inputs(inputs, signature: SignatureInfo | None) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        if signature is None or len(signature.inputs) != 1:
            raise ValueError(
                "pass inputs as a dict of named arrays unless the signature has exactly one input"
            )
        arrays = {next(iter(signature.inputs)): np.asarray(inputs)}
    if signature is not None:  # cast to the signature's dtypes (e.g. float64 data to DT_FLOAT)
        for k, arr in arrays.items():
            info = signature.inputs.get(k)
            if (
                info is not None
                and info.dtype != "DT_STRING"
                and (arr.dtype.kind in "fiub" or arr.dtype == ml_dtypes.bfloat16)
            ):
                arrays[k] = arr.astype(info.numpy_dtype, copy=False)
    return arrays


class _Base:
    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        version: int | None,
        label: str | None,
        signature_name: str,
        timeout: float,
        retries: int,
        backoff: float,
    ):
        if not model_name:
            raise ValueError("model_name is required; Received: ''")
        if version is not None and label is not None:
            raise ValueError(
                f"pass version or label, not both; Received: version={version}, label={label!r}"
            )
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds; Received: {timeout}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0; Received: {retries}, {backoff}")
        self.target, self.model_name = target, model_name
        self.version, self.label, self.signature_name = version, label, signature_name
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._metadata: dict[tuple, ModelMetadata] = {}

    def _spec(self, version, label):
        version = self.version if version is None and label is None else version
        label = self.label if label is None and version is None else label
        return version, label

    def _call(self, attempt: Callable[[float], Any], timeout: float | None) -> Any:
        """Run `attempt(remaining_seconds)`; retry UNAVAILABLE with backoff within the deadline."""
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        tries = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TFServingError(
                    "DEADLINE_EXCEEDED", f"no answer within {budget:g} s", target=self.target
                )
            try:
                return attempt(remaining)
            except TFServingError as err:
                tries += 1
                if err.code != "UNAVAILABLE" or tries > self.retries:
                    if err.code == "UNAVAILABLE" and tries > 1:
                        err.message += f" (after {tries} attempts)"
                        err.args = (f"{err.args[0]} (after {tries} attempts)",)
                    raise
                pause = self.backoff * (2 ** (tries - 1)) * (0.5 + random.random() / 2)
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)

    def metadata(
        self, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        raise NotImplementedError

    def _signature(self, name: str | None, version, label) -> SignatureInfo:
        key = (version, label)
        if key not in self._metadata:
            self._metadata[key] = self.metadata(version=version, label=label)
        return self._metadata[key].signature(name or self.signature_name)

    def predict_fn(self, **kwargs) -> Callable[[dict], dict]:
        """A predict callable (dict of arrays -> dict of arrays) for `check_batch_invariance`."""
        return lambda inputs: self.predict(inputs, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass


class RestClient(_Base):
    """TF Serving's REST API (default port 8501).

    Args:
      url: base URL, e.g. "http://localhost:8501".
      model_name: the served model.
      version / label: pin a version or a version label (else the server's latest).
      signature_name: default signature ("serving_default").
      timeout: seconds allowed for each call: connect, send and the whole answer,
        retries included.
      retries: extra attempts when the server is UNAVAILABLE (connection refused, 503).
      backoff: first pause between attempts (doubles each time, with jitter).
      session / pool_size: a requests.Session to use, else one with `pool_size` connections.
        A session of your own keeps its adapters, so its deadline is per socket operation
        (requests' rule), not per call.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "serving_default",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        session=None,
        pool_size: int = 64,
    ):
        import requests
        import requests.adapters

        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        super().__init__(
            url,
            model_name,
            version=version,
            label=label,
            signature_name=signature_name,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
        )
        if session is None:  # one pool, big enough for the concurrent single-row mode
            session = requests.Session()
            adapter = _deadline_adapter()(pool_connections=4, pool_maxsize=pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._session = session
        self._requests = requests

    def _path(self, version, label, suffix: str) -> str:
        from urllib.parse import quote

        version, label = self._spec(version, label)
        path = f"{self.target}/v1/models/{quote(self.model_name, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif label is not None:
            path += f"/labels/{quote(label, safe='')}"
        return path + suffix

    def _http(self, method: str, url: str, body: bytes | None, timeout: float | None):
        requests = self._requests

        def attempt(remaining):
            with _Deadline(remaining) as deadline:
                try:
                    r = self._session.request(
                        method,
                        url,
                        data=body,
                        timeout=remaining,
                        headers={"Content-Type": "application/json"} if body else None,
                    )
                except requests.exceptions.RequestException as err:
                    if deadline.fired.is_set() or isinstance(err, requests.exceptions.Timeout):
                        raise TFServingError(
                            "DEADLINE_EXCEEDED",
                            f"no complete answer within {remaining:.3g} s",
                            target=self.target,
                        ) from None
                    if isinstance(err, requests.exceptions.ConnectionError):
                        raise TFServingError(
                            "UNAVAILABLE", f"cannot connect: {err}", target=self.target
                        ) from None
                    raise TFServingError(
                        "UNAVAILABLE", f"the connection failed: {err}", target=self.target
                    ) from None
            if r.status_code != 200:
                try:
                    message = r.json().get("error", r.text)
                except ValueError:
                    message = r.text or r.reason
                raise TFServingError(
                    _HTTP_TO_CODE.get(r.status_code, "UNKNOWN"),
                    message,
                    http_status=r.status_code,
                    target=self.target,
                )
            try:
                return r.json()
            except ValueError:
                raise TFServingError(
                    "INTERNAL",
                    f"the server answered invalid JSON: {r.text[:200]!r}",
                    http_status=r.status_code,
                    target=self.target,
                ) from None

        return self._call(attempt, timeout)

    def status(
        self, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> list[VersionStatus]:
        doc = self._http("GET", self._path(version, label, ""), None, timeout)
        return [
            VersionStatus(
                int(s.get("version", 0)),
                s.get("state", "UNKNOWN"),
                s.get("status", {}).get("error_code", "OK"),
                s.get("status", {}).get("error_message", ""),
            )
            for s in doc.get("model_version_status", [])
        ]

    def metadata(
        self, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        doc = self._http("GET", self._path(version, label, "/metadata"), None, timeout)
        return _metadata_from_json(
            doc.get("model_spec", {}), doc.get("metadata", {}).get("signature_def", {})
        )

    def predict(
        self,
        inputs,
        *,
        signature_name: str | None = None,
        version: int | None = None,
        label: str | None = None,
        format: str = "columnar",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Predict. `inputs`: dict of named arrays (or one array for a one-input signature).
        `format`: "columnar" ({"inputs": ...}) or "row" ({"instances": ...})."""
        if format not in ("columnar", "row"):
            raise ValueError(f"format must be 'columnar' or 'row'; Received: {format!r}")
        version, label = self._spec(version, label)
        sig = self._signature(signature_name, version, label)
        arrays = _as_inputs(inputs, sig)
        binary = {k for k, a in arrays.items() if a.dtype.kind in "OS"}
        name = json.dumps(sig.name)
        if format == "columnar":
            payload = (
                "{"
                + ",".join(
                    f"{json.dumps(k)}:{_tensor.array_to_json(a, k in binary)}"
                    for k, a in arrays.items()
                )
                + "}"
            )
            body = '{"signature_name":' + name + ',"inputs":' + payload + "}"
        else:
            rows = {len(a) if a.ndim else -1 for a in arrays.values()}
            if len(rows) != 1 or -1 in rows:
                raise ValueError(
                    "row format needs every input to have the same first dimension; "
                    f"Received shapes { {k: a.shape for k, a in arrays.items()} }"
                )
            body = (
                '{"signature_name":'
                + name
                + ',"instances":'
                + _tensor.rows_to_json(arrays, binary, named=True)
                + "}"
            )
        doc = self._http(
            "POST", self._path(version, label, ":predict"), body.encode("utf-8"), timeout
        )
        key = "outputs" if format == "columnar" else "predictions"
        if key not in doc:
            raise TFServingError(
                "INTERNAL", f"response has no {key!r} key: {str(doc)[:200]}", target=self.target
            )
        return self._decode(doc[key], sig, format)

    @staticmethod
    def _decode(value, sig: SignatureInfo, format: str) -> dict[str, np.ndarray]:
        def dtype(alias):
            info = sig.outputs.get(alias)
            return info.numpy_dtype if info is not None else np.float32

        decode = _tensor.json_to_array

        names = list(sig.outputs)
        if format == "columnar":
            if isinstance(value, dict) and len(names) > 1:
                return {k: decode(v, dtype(k)) for k, v in value.items()}
            return {names[0]: decode(value, dtype(names[0]))}
        if len(names) == 1 or not (value and isinstance(value[0], dict)):
            return {names[0]: decode(value, dtype(names[0]))}
        return {k: decode([row[k] for row in value], dtype(k)) for k in value[0]}

    def close(self):
        self._session.close()


class GrpcClient(_Base):
    """TF Serving's gRPC API (default port 8500), on the official stubs.

    Same arguments as `RestClient`, with `target` as "host:port"; `max_message_bytes`
    raises gRPC's 4 MiB default for large batches.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "serving_default",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel=None,
    ):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        super().__init__(
            target,
            model_name,
            version=version,
            label=label,
            signature_name=signature_name,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
        )
        self._grpc = grpc
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = channel or grpc.insecure_channel(target, options=opts)
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _fill_spec(self, spec, version, label, signature_name=""):
        version, label = self._spec(version, label)
        spec.name = self.model_name
        if version is not None:
            spec.version.value = int(version)
        elif label is not None:
            spec.version_label = label
        if signature_name:
            spec.signature_name = signature_name

    def _rpc(self, method, request, timeout: float | None):
        grpc = self._grpc

        def attempt(remaining):
            try:
                return method(request, timeout=remaining)
            except grpc.RpcError as err:
                code = err.code()
                details = err.details() or ""
                raise TFServingError(
                    code.name, details, grpc_code=code, target=self.target
                ) from None

        return self._call(attempt, timeout)

    def status(
        self, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> list[VersionStatus]:
        from tensorflow_serving.apis import get_model_status_pb2

        req = get_model_status_pb2.GetModelStatusRequest()
        self._fill_spec(req.model_spec, version, label)
        resp = self._rpc(self._model_stub.GetModelStatus, req, timeout)
        out = []
        for s in resp.model_version_status:
            out.append(
                VersionStatus(
                    int(s.version),
                    get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                    self._grpc.StatusCode(_code_tuple(s.status.error_code)).name
                    if s.status.error_code
                    else "OK",
                    s.status.error_message,
                )
            )
        return out

    def metadata(
        self, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        from tensorflow_serving.apis import get_model_metadata_pb2

        from tfbn._compat import message_to_dict

        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._fill_spec(req.model_spec, version, label)
        resp = self._rpc(self._predict_stub.GetModelMetadata, req, timeout)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sig_map)
        return _metadata_from_json(
            message_to_dict(resp.model_spec, preserving_proto_field_name=True),
            message_to_dict(sig_map, preserving_proto_field_name=True),
        )

    def predict(
        self,
        inputs,
        *,
        signature_name: str | None = None,
        version: int | None = None,
        label: str | None = None,
        output_filter=(),
        timeout: float | None = None,
        format: str = "columnar",
    ) -> dict[str, np.ndarray]:
        """Predict with TensorProtos. `format` is accepted for symmetry with RestClient."""
        from tensorflow_serving.apis import predict_pb2

        version, label = self._spec(version, label)
        sig = None
        if not isinstance(inputs, Mapping) or any(
            np.asarray(v).dtype.kind in "fiub" and np.asarray(v).dtype != np.float32
            for v in inputs.values()
        ):
            sig = self._signature(signature_name, version, label)
        arrays = _as_inputs(inputs, sig)
        req = predict_pb2.PredictRequest()
        self._fill_spec(req.model_spec, version, label, signature_name or self.signature_name)
        for k, a in arrays.items():
            req.inputs[k].CopyFrom(_tensor.to_tensor_proto(a))
        req.output_filter.extend(output_filter)
        resp = self._rpc(self._predict_stub.Predict, req, timeout)
        return {k: _tensor.from_tensor_proto(v) for k, v in resp.outputs.items()}

    def close(self):
        self._channel.close()


def _code_tuple(value: int):
    import grpc

    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def connect(address: str, model_name: str, **kwargs) -> RestClient | GrpcClient:
    """A RestClient for "http(s)://..." addresses, else a GrpcClient for "host:port"."""
    if address.startswith(("http://", "https://")):
        return RestClient(address, model_name, **kwargs)
    return GrpcClient(address, model_name, **kwargs)
