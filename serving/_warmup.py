"""Model warm-up: replay `assets.extra/tf_serving_warmup_requests` before a version serves.

TF Serving's saved_model_warmup(_util).cc: with `--enable_model_warmup` (default true)
the PredictionLog records in the version's warm-up file (a TFRecord file; `tfbn
export` writes one) are replayed against the freshly loaded version, each
`--num_request_iterations_for_warmup` times (default 1), before it becomes AVAILABLE.
Any failure (unparsable record, a request the model rejects, more than 1000 records)
fails the load, so the version never serves. A missing file is fine.

Predict, Classify, Regress and MultiInference logs are replayed; other log types are
UNIMPLEMENTED, as in TF Serving.
"""

from __future__ import annotations

import logging
import os
import time

from tfbn.serving import _inference, _tensor
from tfbn.serving._status import ServingError, error

__all__ = ["MAX_RECORDS", "run_warmup", "warmup_path"]

log = logging.getLogger("tfbn.serving.server")

MAX_RECORDS = 1000  # WarmupConsts::kMaxNumRecords


def warmup_path(version_dir: str) -> str:
    from tfbn import layout

    return layout.warmup_path(version_dir)


def _records(path: str):
    import tensorflow as tf

    try:
        yield from tf.compat.v1.io.tf_record_iterator(path)
    except tf.errors.OpError as err:
        raise error(
            "DATA_LOSS",
            f"{err.message.strip()}. Please verify your warmup data is in TFRecord format.",
        ) from None


def _replay(servable, record, method_check: bool) -> None:
    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        req = record.predict_log.request
        inputs = {alias: _tensor.from_tensor_proto(t) for alias, t in req.inputs.items()}
        key, outputs = servable.validate(
            req.model_spec.signature_name, inputs, list(req.output_filter)
        )
        servable.call(key, inputs, outputs)
    elif kind == "classify_log":
        _inference.classify(servable, record.classify_log.request, method_check)
    elif kind == "regress_log":
        _inference.regress(servable, record.regress_log.request, method_check)
    elif kind == "multi_inference_log":
        _inference.multi_inference(servable, record.multi_inference_log.request, method_check)
    else:
        raise error("UNIMPLEMENTED", f"Unsupported log_type for warmup: {kind}")


def run_warmup(servable, version_dir: str, iterations: int = 1, method_check: bool = False) -> int:
    """Replay the warm-up records of `version_dir` on `servable`. Returns how many
    records were read; raises ServingError (the load fails) on any error."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_path(version_dir)
    if not os.path.isfile(path):
        log.info("No warmup data file found at %s", path)
        return 0
    iterations = iterations if iterations > 0 else 1
    start = time.monotonic()
    count = 0
    for raw in _records(path):
        record = prediction_log_pb2.PredictionLog()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise error(
                "INVALID_ARGUMENT", f"Failed to parse warmup record: {raw[:64]!r} from {path}"
            ) from None
        for _ in range(iterations):
            try:
                _replay(servable, record, method_check)
            except ServingError:
                raise
            except ValueError as err:
                raise error("INVALID_ARGUMENT", str(err)) from None
        count += 1
        if count > MAX_RECORDS:
            raise error(
                "INVALID_ARGUMENT",
                f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}",
            )
    log.info(
        "Finished reading warmup data for model at %s. Number of warmup records read: %d. "
        "Elapsed time (microseconds): %d.",
        path,
        count,
        int((time.monotonic() - start) * 1e6),
    )
    return count
