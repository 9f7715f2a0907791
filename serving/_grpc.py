"""gRPC servicers: tensorflow.serving.PredictionService and ModelService."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
from tfbn.serving import _tensor
from tfbn.serving._manager import metadata_response
from tfbn.serving._status import ServingError, error

if TYPE_CHECKING:
    from tfbn.serving.server import DevServer

log = logging.getLogger("tfbn.serving.server")


def servicers(dev: DevServer):
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
                    inputs[alias] = _tensor.from_tensor_proto(proto, max_bytes=dev.max_request_bytes)
                except ValueError as err:
                    raise error("INVALID_ARGUMENT", f"tensor parsing error: {alias}: {err}") from None
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
                raise error("INVALID_ARGUMENT", "Missing ModelSpec")
            name, version, label = spec_args(request.model_spec)
            return dev.manager.status(name, version, label)

        def HandleReloadConfigRequest(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "not implemented by the tfbn development server")

    return (Prediction(), prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            Models(), model_service_pb2_grpc.add_ModelServiceServicer_to_server)

