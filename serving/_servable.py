"""One loaded version of one model: loading a SavedModel, validating requests against its
SignatureDefs (TF Serving's predict_util), and calling it."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np
from tfbn.serving import _tensor
from tfbn.serving._status import ServingError, error, tf_error

if TYPE_CHECKING:
    from tfbn.serving._batcher import Batcher

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHODS = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)


def _read_meta_graph(path: str, tags=("serve",)):
    from tfbn import layout

    if layout.is_saved_model_dir(path):
        proto = layout.read_saved_model(path)
    else:
        raise error(
            "NOT_FOUND",
            f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}",
        )
    for mg in proto.meta_graphs:
        if set(mg.meta_info_def.tags) == set(tags):
            return mg
    raise error(
        "NOT_FOUND",
        "Could not find meta graph def matching supplied tags: { "
        + " ".join(tags)
        + " }. To inspect available tag-sets in the "
        "SavedModel, please use the SavedModel CLI: `saved_model_cli`",
    )


def check_input_shapes(key: str, shapes: dict, inputs: dict[str, np.ndarray]) -> None:
    """Rank and known dimensions but the first of each input against `shapes`
    (`{alias: [dim or None, ...]}`; aliases without a known shape are not checked)."""
    for alias in sorted(inputs):
        want = shapes.get(alias)
        if want is None:
            continue
        got = inputs[alias].shape
        bad = len(got) != len(want) or any(
            w is not None and w != g for w, g in list(zip(want, got, strict=True))[1:]
        )
        if bad:
            shown = ",".join("-1" if d is None else str(d) for d in want)
            raise error(
                "INVALID_ARGUMENT",
                f"input tensor shape mismatch: {alias} has shape "
                f"[{','.join(map(str, got))}] but signature {key!r} expects [{shown}] "
                f"(rank {len(want)}; dimension 0 may be any size, -1 is any size)",
            )


class _SessionRunner:
    """TF1 SavedModels run the way TF Serving runs them: a Session over the MetaGraph, fed
    and fetched by the tensor names in the SignatureDef, with no static-shape check on
    the feeds (TF's Python loader cannot turn every TF1 signature into a function, e.g.
    half_plus_three's, and Session.run() rejects feeds TF Serving accepts)."""

    def __init__(self, path: str, tags=("serve",), threads: tuple[int, int] = (0, 0)):
        import tensorflow as tf

        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=threads[0], inter_op_parallelism_threads=threads[1]
        )
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        with self.graph.as_default():
            tf.compat.v1.saved_model.loader.load(self.session, list(tags), path)
        self._graph_def = self.graph.as_graph_def()
        self._shape_checks: dict[tuple, str] = {}  # (signature, fed shapes) -> error message or ""
        self._shape_lock = threading.Lock()

    def run(self, sig, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        g = self.graph
        feeds = {}
        for alias, arr in inputs.items():
            t = g.get_tensor_by_name(sig.inputs[alias].name)
            feeds[t._as_tf_output()] = arr  # noqa: SLF001 - see the class docstring
        fetches = [g.get_tensor_by_name(sig.outputs[a].name)._as_tf_output() for a in outputs]
        results = self.session._call_tf_sessionrun(None, feeds, fetches, [], None)  # noqa: SLF001
        return {a: np.asarray(r) for a, r in zip(outputs, results, strict=True)}

    def check_shapes(self, key: str, sig, inputs: dict[str, np.ndarray]) -> None:
        """Run TensorFlow's shape inference over the graph with the fed shapes (dimension 0
        left unknown) before anything executes: an op that cannot take them (a convolution
        fed a rank-3 image) is reported with TensorFlow's message instead of reaching a
        kernel that may abort the process. Feeds the graph can take keep working even
        where they contradict the SignatureDef (TF Serving's fixtures rely on that)."""
        import tensorflow as tf

        shapes = tuple(
            sorted(
                (alias, (None, *arr.shape[1:]) if arr.ndim else ()) for alias, arr in inputs.items()
            )
        )
        cache_key = (key, shapes)
        with self._shape_lock:
            if cache_key in self._shape_checks:
                message = self._shape_checks[cache_key]
                if message:
                    raise error("INVALID_ARGUMENT", message)
                return
        message = ""
        checked = tf.Graph()
        with checked.as_default():
            input_map = {}
            for alias, shape in shapes:
                name = sig.inputs[alias].name
                dtype = self.graph.get_tensor_by_name(name).dtype
                input_map[name] = tf.compat.v1.placeholder(dtype, list(shape), name=f"feed_{alias}")
            try:
                tf.graph_util.import_graph_def(self._graph_def, input_map=input_map, name="model")
            except ValueError as err:
                fed = ", ".join(
                    f"{a}: [{','.join('-1' if d is None else str(d) for d in shp)}]"
                    for a, shp in shapes
                )
                message = (
                    f"input tensor shape mismatch: the model cannot take inputs of shape "
                    f"{fed}: {str(err).splitlines()[0]}"
                )
        with self._shape_lock:
            if len(self._shape_checks) >= 256:
                self._shape_checks.clear()
            self._shape_checks[cache_key] = message
        if message:
            raise error("INVALID_ARGUMENT", message)

    def close(self):
        self.session.close()


class Servable:
    """One version of one model, loaded with `tf.saved_model.load`.

    `run(signature, inputs)` validates the request against the SignatureDef the way TF
    Serving's predict_util does, then calls the signature's function on the raw tensors.
    """

    def __init__(
        self,
        name: str,
        version: int,
        path: str,
        tags=("serve",),
        prefer_tflite: bool = False,
        session_threads: tuple[int, int] = (0, 0),
    ):
        import tensorflow as tf
        from tfbn.serving import _tflite

        self.name, self.version, self.path = name, int(version), path
        self._session = None  # a runner: TF1 Session or TF Lite interpreter
        self._functions, self._flat_names = {}, {}
        self._input_shapes: dict[str, dict[str, tuple[int | None, ...] | None]] = {}
        self.batcher: Batcher | None = None
        self._users = 0
        self._retired = False
        self._use_lock = threading.Lock()
        if prefer_tflite and _tflite.has_tflite_model(path):
            self.meta_graph = None
            try:
                self._session = _tflite.TfLiteRunner(path)
            except (OSError, ValueError) as err:
                raise error(
                    "INVALID_ARGUMENT",
                    f"Failed to load TF Lite model "
                    f"{os.path.join(path, _tflite.TFLITE_FILENAME)}: {err}",
                ) from None
            self.signature_defs = dict(self._session.signature_defs)
            return
        self.meta_graph = _read_meta_graph(path, tuple(tags))
        self.signature_defs = dict(self.meta_graph.signature_def)
        try:
            if not self.meta_graph.object_graph_def.nodes:  # a TF1 SavedModel
                self._session = _SessionRunner(path, tags, session_threads)
            else:
                self._loaded = tf.saved_model.load(path, tags=list(tags))
                self._functions = dict(self._loaded.signatures)
        except ServingError:
            raise
        except Exception as err:  # noqa: BLE001 - any load failure is reported, not raised through
            raise (
                tf_error(err)
                if isinstance(err, tf.errors.OpError)
                else error(
                    "INTERNAL", f"Failed to load SavedModel {path}: {type(err).__name__}: {err}"
                )
            ) from None
        for key, fn in self._functions.items():
            specs = tf.nest.flatten(fn.structured_input_signature)
            kwargs = fn.structured_input_signature[1]
            self._flat_names[key] = (
                [k for k in sorted(kwargs)] if len(specs) == len(kwargs) else None
            )
            self._input_shapes[key] = {
                alias: (tuple(spec.shape.as_list()) if spec.shape.rank is not None else None)
                for alias, spec in kwargs.items()
                if hasattr(spec, "shape")
            }

    def signature(self, name: str | None):
        key = name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(key)
        if sig is None:
            raise error(
                "INVALID_ARGUMENT", f'Serving signature name: "{key}" not found in signature def'
            )
        return key, sig

    def validate(
        self, signature_name: str | None, inputs: dict[str, np.ndarray], output_filter=()
    ) -> tuple[str, list[str]]:
        """TF Serving's PreProcessPrediction: signature, input aliases, dtypes, outputs."""
        key, sig = self.signature(signature_name)
        if sig.method_name not in PREDICT_METHODS:
            raise error(
                "INVALID_ARGUMENT",
                "Expected prediction signature method_name to be one of {"
                + ", ".join(PREDICT_METHODS)
                + "}. Was: "
                + sig.method_name,
            )
        expected = set(sig.inputs)
        sent = set(inputs)
        if sent != expected:
            if len(sent) != len(expected):
                raise error(
                    "INVALID_ARGUMENT",
                    f"input size does not match signature: {len(sent)}!={len(expected)} "
                    f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                    f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                    f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
                )
            alias = sorted(sent - expected)[0]
            raise error(
                "INVALID_ARGUMENT",
                f"input tensor alias not found in signature: {alias}. "
                f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.",
            )
        for i, alias in enumerate(sorted(sig.inputs)):
            want = sig.inputs[alias].dtype
            got = _tensor.datatype_of(inputs[alias])
            if want != got:
                raise error(
                    "INVALID_ARGUMENT",
                    f"Expects arg[{i}] to be {_tensor.dtype_name(want)} "
                    f"but {_tensor.dtype_name(got)} is provided",
                )
        self._check_shapes(key, inputs)
        outputs = list(output_filter) or sorted(sig.outputs)
        seen = set()
        for alias in outputs:
            if alias not in sig.outputs:
                raise error(
                    "INVALID_ARGUMENT",
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(sorted(sig.outputs))}}}.",
                )
            if alias in seen:
                raise error("INVALID_ARGUMENT", f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return key, outputs

    def _check_shapes(self, key: str, inputs: dict[str, np.ndarray]) -> None:
        """Rank and known dimensions (all but dimension 0, the batch) of every input against
        the signature function's input specs, before TensorFlow sees the tensors: a kernel
        given a tensor of the wrong rank may abort the whole process (oneDNN's CHECKs)
        instead of failing the request.

        TF1 SavedModels (run on a Session) are checked by shape inference over their graph
        instead (`_SessionRunner.check_shapes`): TF Serving's own fixtures declare x as
        [-1, 1] and are queried with a flat list, which their graph takes. TF Serving checks
        no shapes at all; dimension 0 is left free for the same reason (the half_plus_two TF2
        fixture declares x as [1] and is queried with three values)."""
        if self._session is not None:
            self._session.check_shapes(key, self.signature_defs[key], inputs)
            return
        check_input_shapes(key, self._input_shapes.get(key) or {}, inputs)

    def call(
        self, key: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """Run a validated request (no batching)."""
        import tensorflow as tf

        if self._session is not None:
            try:
                return self._session.run(self.signature_defs[key], inputs, outputs)
            except tf.errors.OpError as err:
                raise tf_error(err) from None
            except (ValueError, RuntimeError) as err:  # the TF Lite interpreter's errors
                raise error("INTERNAL", f"Failed to invoke TfLite interpreter: {err}") from None
        fn = self._functions.get(key)
        if fn is None:
            raise error("UNIMPLEMENTED", f"signature {key!r} has no function in this SavedModel")
        try:
            names = self._flat_names[key]
            tensors = []
            for alias in names or sorted(inputs):
                arr = inputs[alias]
                tensors.append(
                    tf.constant(arr, dtype=tf.string)
                    if arr.dtype.kind in "OSU"
                    else tf.constant(arr)
                )
            if names is not None and hasattr(fn, "_call_flat"):
                result = fn._call_flat(tensors, fn.captured_inputs)
            else:
                result = fn(**dict(zip(names or sorted(inputs), tensors, strict=True)))
        except tf.errors.OpError as err:
            raise tf_error(err) from None
        except (TypeError, ValueError) as err:
            raise error("INVALID_ARGUMENT", str(err)) from None
        return {alias: np.asarray(result[alias]) for alias in outputs}

    def run(
        self,
        signature_name: str | None,
        inputs: dict[str, np.ndarray],
        output_filter=(),
        timeout: float | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
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
