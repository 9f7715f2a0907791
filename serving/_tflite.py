"""TF Lite models (`model.tflite` in a version directory) served through tf.lite.Interpreter.

With `--prefer_tflite_model`, TF Serving loads `model.tflite` instead of
`saved_model.pb` when a version directory has one (tflite_session.cc). Its signature
handling, reproduced here:

- SignatureDefs come from the model's `signature_defs_metadata` metadata buffer (a
  FlexBuffer map of signature key -> serialised SignatureDef, as written by TF Lite's
  signature_def_util); tensor names there are matched to the interpreter's tensors,
  also by their legacy TF Lite spelling (without the `:0` suffix).
- Without that metadata, one `serving_default` predict signature is generated whose
  input and output aliases are the model's tensor names.
- Inputs are resized to the request's shape when it differs from the model's
  (so a [1] request runs on a [1, 1] model input), as TfLiteSession does.

One interpreter per version; calls are serialised on it (TF Serving keeps a pool).
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np

__all__ = ["TFLITE_FILENAME", "TfLiteRunner", "has_tflite_model"]

TFLITE_FILENAME = "model.tflite"
SIGNATURE_METADATA = b"signature_defs_metadata"


def has_tflite_model(version_dir: str) -> bool:
    return os.path.isfile(os.path.join(version_dir, TFLITE_FILENAME))


def _legacy_name(name: str) -> str:
    """TF Serving's TfToTfLiteLegacyTensorName: `x:0` -> `x`."""
    base, sep, index = name.rpartition(":")
    return base if sep and index.isdigit() else name


def _signature_metadata(buffer: bytes) -> dict:
    """The SignatureDefs stored in the model's metadata, or {} if it has none."""
    from flatbuffers import flexbuffers
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(buffer, 0)
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() != SIGNATURE_METADATA:
            continue
        data = model.Buffers(meta.Buffer()).DataAsNumpy().tobytes()
        root = flexbuffers.GetRoot(data).AsMap
        out = {}
        for key, value in zip(root.Keys, root.Values, strict=True):
            sig = meta_graph_pb2.SignatureDef()
            raw = value.AsBlob if value.IsBlob else value.AsString.encode("latin-1")
            sig.ParseFromString(bytes(raw))
            out[key.AsKey] = sig
        return out
    return {}


def _tensor_info(detail: dict):
    from tensorflow.core.protobuf import meta_graph_pb2
    from tfbn.serving import _tensor

    info = meta_graph_pb2.TensorInfo(name=detail["name"])
    info.dtype = _tensor.datatype_of(np.empty(0, dtype=detail["dtype"]))
    for d in detail["shape"]:
        info.tensor_shape.dim.add(size=int(d))
    return info


class TfLiteRunner:
    """A TF Lite model with TF Serving's signatures; `run(signature, inputs, outputs)`
    has the same contract as the SavedModel runners: aliases in, aliases out."""

    def __init__(self, version_dir: str, num_threads: int | None = None):
        import tensorflow as tf

        self.path = os.path.join(version_dir, TFLITE_FILENAME)
        with open(self.path, "rb") as f:
            buffer = f.read()
        try:
            with warnings.catch_warnings():  # its deprecation notice, once per load
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                self.interpreter = tf.lite.Interpreter(
                    model_content=buffer, num_threads=num_threads
                )
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"Cannot build Interpreter from {self.path}: {err}") from None
        self._lock = threading.Lock()
        self._inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
        self._outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        self._shapes = {n: tuple(int(x) for x in d["shape"]) for n, d in self._inputs.items()}
        try:
            sigs = _signature_metadata(buffer)
        except Exception as err:  # noqa: BLE001 - a corrupt metadata buffer is a load error
            raise ValueError(f"Invalid SignatureDefs found in TfLite model: {err}") from None
        if sigs:
            for key, sig in sigs.items():
                for kind, table, infos in (
                    ("input", self._inputs, sig.inputs),
                    ("output", self._outputs, sig.outputs),
                ):
                    for alias, info in infos.items():
                        name = info.name if info.name in table else _legacy_name(info.name)
                        if name not in table:
                            raise ValueError(
                                f"Signature {kind} {alias} references an unknown tensor: "
                                f"Unknown tensor '{info.name}'. (signature {key!r})"
                            )
                        info.name = name
        else:
            from tensorflow.core.protobuf import meta_graph_pb2

            sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
            for name, detail in self._inputs.items():
                sig.inputs[_legacy_name(name)].CopyFrom(_tensor_info(detail))
            for name, detail in self._outputs.items():
                sig.outputs[_legacy_name(name)].CopyFrom(_tensor_info(detail))
            sigs = {"serving_default": sig}
        self.signature_defs = sigs

    def check_shapes(self, key: str, sig, inputs: dict[str, np.ndarray]) -> None:
        """Nothing to check before the call: as TF Serving's TfLiteSession does, `run`
        resizes the interpreter's inputs to each request's shapes, and the interpreter
        reports a shape it cannot take as an error (answered INTERNAL, as TF Serving
        answers a failed invoke), never by aborting the process."""

    def run(self, sig, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        it = self.interpreter
        feeds = {}
        with self._lock:
            resized = False
            for alias, arr in inputs.items():
                detail = self._inputs[sig.inputs[alias].name]
                if arr.dtype == object:
                    arr = np.asarray(
                        [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)],
                        dtype=object,
                    ).reshape(arr.shape)
                else:
                    arr = arr.astype(detail["dtype"], copy=False)
                if self._shapes[detail["name"]] != arr.shape:
                    it.resize_tensor_input(detail["index"], list(arr.shape), strict=False)
                    self._shapes[detail["name"]] = arr.shape
                    resized = True
                feeds[alias] = arr
            if resized:
                it.allocate_tensors()
            for alias, arr in feeds.items():
                it.set_tensor(self._inputs[sig.inputs[alias].name]["index"], arr)
            it.invoke()
            return {
                a: np.array(it.get_tensor(self._outputs[sig.outputs[a].name]["index"]))
                for a in outputs
            }

    def close(self) -> None:
        self.interpreter = None
