"""gRPC servicers: tensorflow.serving.PredictionService and ModelService."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

import grpc
from tfbn.serving import _inference, _tensor
from tfbn.serving._manager import metadata_response
from tfbn.serving._status import ServingError, error

if TYPE_CHECKING:
    from tfbn.serving.server import DevServer

log = logging.getLogger("tfbn.serving.server")


_METERED = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")


def _model_name(request) -> str:
    """The model a request addresses, for the metrics' model_name label."""
    if hasattr(request, "tasks"):
        return request.tasks[0].model_spec.name if request.tasks else ""
    return request.model_spec.name


def servicers(dev: DevServer):
    """`(PredictionService servicer, its add-to-server function, ModelService servicer, its
    add-to-server function)` for `dev`. The generated base classes (imported here, when a
    server starts) answer UNIMPLEMENTED for any RPC a newer API adds."""
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    class Prediction(_PredictionService, prediction_service_pb2_grpc.PredictionServiceServicer):
        pass

    class Models(_ModelService, model_service_pb2_grpc.ModelServiceServicer):
        pass

    return (
        Prediction(dev),
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
        Models(dev),
        model_service_pb2_grpc.add_ModelServiceServicer_to_server,
    )


def _rpc(method):
    """A servicer method as TF Serving answers it: errors become status codes (ServingError
    its own, ValueError INVALID_ARGUMENT, anything else INTERNAL, logged), the server counts
    it in flight, and the metered APIs record their status and latency."""

    @functools.wraps(method)
    def rpc(self, request, context):
        dev = self.dev
        dev._enter()
        start = time.monotonic()
        status = "UNKNOWN"
        try:
            result = method(self, request, context)
            status = "OK"
            return result
        except ServingError as err:
            status = err.code.name
            context.abort(err.code, err.message)
        except ValueError as err:
            status = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - the server keeps serving
            if isinstance(err, grpc.RpcError) or type(err).__name__ == "_AbortError":
                raise
            status = "INTERNAL"
            log.exception("gRPC %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            dev._exit()
            if dev.metrics is not None and method.__name__ in _METERED:
                dev.metrics.record_request(
                    _model_name(request), method.__name__, "GRPC", status, time.monotonic() - start
                )

    return rpc


def _spec_args(spec) -> tuple[str, int | None, str | None]:
    """`(name, version, label)` of a ModelSpec, as the model manager takes them."""
    version = spec.version.value if spec.HasField("version") else None
    return spec.name, version, spec.version_label or None


def _require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise error("INVALID_ARGUMENT", "Missing ModelSpec")


class _Servicer:
    def __init__(self, dev: DevServer):
        self.dev = dev


class _PredictionService(_Servicer):
    """tensorflow.serving.PredictionService: Predict, GetModelMetadata, Classify, Regress,
    MultiInference."""

    @_rpc
    def Predict(self, request, context):
        inputs = self._inputs(request)
        with self.dev.manager.use(*_spec_args(request.model_spec)) as servable:
            key, outputs = servable.run(
                request.model_spec.signature_name,
                inputs,
                list(request.output_filter),
                timeout=context.time_remaining(),
            )
        return _predict_response(servable, key, outputs)

    def _inputs(self, request) -> dict:
        """The request's input tensors as arrays (each within --max_request_bytes)."""
        inputs = {}
        for alias, proto in request.inputs.items():
            try:
                inputs[alias] = _tensor.from_tensor_proto(
                    proto, max_bytes=self.dev.max_request_bytes
                )
            except ValueError as err:
                raise error("INVALID_ARGUMENT", f"tensor parsing error: {alias}: {err}") from None
        return inputs

    @_rpc
    def GetModelMetadata(self, request, context):
        name, version, label = _spec_args(request.model_spec)
        return metadata_response(self.dev.manager, name, version, label, request.metadata_field)

    @_rpc
    def Classify(self, request, context):
        _require_model_spec(request)
        with self.dev.manager.use(*_spec_args(request.model_spec)) as servable:
            resp = _inference.classify(servable, request, self._method_check())
        self._record_examples(request.model_spec.name, request.input)
        return resp

    @_rpc
    def Regress(self, request, context):
        _require_model_spec(request)
        with self.dev.manager.use(*_spec_args(request.model_spec)) as servable:
            resp = _inference.regress(servable, request, self._method_check())
        self._record_examples(request.model_spec.name, request.input)
        return resp

    @_rpc
    def MultiInference(self, request, context):
        spec = _inference.multi_inference_model_spec(request)
        with self.dev.manager.use(*_spec_args(spec)) as servable:
            resp = _inference.multi_inference(servable, request, self._method_check())
        self._record_examples(spec.name, request.input)
        return resp

    def _method_check(self) -> bool:
        return self.dev.manager.load_options.enable_signature_method_name_check

    def _record_examples(self, model_name: str, input_proto) -> None:
        if self.dev.metrics is not None:
            kind = input_proto.WhichOneof("kind")
            count = len(getattr(input_proto, kind).examples) if kind else 0
            self.dev.metrics.record_examples(model_name, count)


def _predict_response(servable, signature_key: str, outputs: dict):
    from tensorflow_serving.apis import predict_pb2

    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = servable.name
    resp.model_spec.version.value = servable.version
    resp.model_spec.signature_name = signature_key
    for alias, arr in outputs.items():
        resp.outputs[alias].CopyFrom(_tensor.to_tensor_proto(arr, typed_fields=True))
    return resp


class _ModelService(_Servicer):
    """tensorflow.serving.ModelService: GetModelStatus, HandleReloadConfigRequest."""

    @_rpc
    def GetModelStatus(self, request, context):
        _require_model_spec(request)
        return self.dev.manager.status(*_spec_args(request.model_spec))

    @_rpc
    def HandleReloadConfigRequest(self, request, context):
        """TF Serving's ModelServiceImpl: a ModelConfigList replaces the served models
        (ServerCore::ReloadConfig; new models are loaded before it answers)."""
        from google.protobuf import text_format
        from tensorflow_serving.apis import model_management_pb2
        from tfbn.serving._config import parse_model_config

        if request.config.WhichOneof("config") != "model_config_list":
            raise error(
                "INVALID_ARGUMENT",
                "ServerModelConfig type not supported by "
                "HandleReloadConfigRequest. Only ModelConfigList is currently supported",
            )
        try:
            models = parse_model_config(
                text_format.MessageToString(request.config), source="ReloadConfigRequest"
            )
        except ValueError as err:
            raise error("INVALID_ARGUMENT", str(err)) from None
        self.dev.manager.reload_config(models)
        resp = model_management_pb2.ReloadConfigResponse()
        resp.status.error_code = 0
        return resp
