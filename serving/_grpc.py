"""gRPC servicers: tensorflow.serving.PredictionService and ModelService."""

from __future__ import annotations

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


def servicers(dev: DevServer):  # noqa: C901 - over the complexity limit, to be split into named steps
    from tensorflow_serving.apis import (
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    def guard(fn):
        def wrapper(self, request, context):
            dev._enter()
            start = time.monotonic()
            status = "UNKNOWN"
            try:
                result = fn(self, request, context)
                status = "OK"
                return result
            except ServingError as err:
                status = err.code.name
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
                if dev.metrics is not None and fn.__name__ in _METERED:
                    dev.metrics.record_request(
                        _model_name(request), fn.__name__, "GRPC", status, time.monotonic() - start
                    )

        wrapper.__name__ = fn.__name__
        return wrapper

    def method_check() -> bool:
        return dev.manager.load_options.enable_signature_method_name_check

    def record_examples(model_name: str, input_proto) -> None:
        if dev.metrics is not None:
            kind = input_proto.WhichOneof("kind")
            count = len(getattr(input_proto, kind).examples) if kind else 0
            dev.metrics.record_examples(model_name, count)

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
                    inputs[alias] = _tensor.from_tensor_proto(
                        proto, max_bytes=dev.max_request_bytes
                    )
                except ValueError as err:
                    raise error(
                        "INVALID_ARGUMENT", f"tensor parsing error: {alias}: {err}"
                    ) from None
            with dev.manager.use(name, version, label) as servable:
                key, outputs = servable.run(
                    request.model_spec.signature_name,
                    inputs,
                    list(request.output_filter),
                    timeout=context.time_remaining(),
                )
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

        @guard
        def Classify(self, request, context):
            if not request.HasField("model_spec"):
                raise error("INVALID_ARGUMENT", "Missing ModelSpec")
            with dev.manager.use(*spec_args(request.model_spec)) as servable:
                resp = _inference.classify(servable, request, method_check())
            record_examples(request.model_spec.name, request.input)
            return resp

        @guard
        def Regress(self, request, context):
            if not request.HasField("model_spec"):
                raise error("INVALID_ARGUMENT", "Missing ModelSpec")
            with dev.manager.use(*spec_args(request.model_spec)) as servable:
                resp = _inference.regress(servable, request, method_check())
            record_examples(request.model_spec.name, request.input)
            return resp

        @guard
        def MultiInference(self, request, context):
            spec = _inference.multi_inference_model_spec(request)
            with dev.manager.use(*spec_args(spec)) as servable:
                resp = _inference.multi_inference(servable, request, method_check())
            record_examples(spec.name, request.input)
            return resp

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        @guard
        def GetModelStatus(self, request, context):
            if not request.HasField("model_spec"):
                raise error("INVALID_ARGUMENT", "Missing ModelSpec")
            name, version, label = spec_args(request.model_spec)
            return dev.manager.status(name, version, label)

        @guard
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
            dev.manager.reload_config(models)
            resp = model_management_pb2.ReloadConfigResponse()
            resp.status.error_code = 0
            return resp

    return (
        Prediction(),
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
        Models(),
        model_service_pb2_grpc.add_ModelServiceServicer_to_server,
    )
