"""How a version directory becomes a servable: the load-time options of
tensorflow_model_server (`--saved_model_tags`, `--prefer_tflite_model`,
`--enable_model_warmup`, `--num_request_iterations_for_warmup`,
`--enable_signature_method_name_check`, the TensorFlow thread-pool flags) in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from tfbn.serving._status import ServingError, error

__all__ = ["LoadOptions", "configure_threads", "load_servable"]

log = logging.getLogger("tfbn.serving.server")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Options applied to every version the model manager loads (TF Serving's defaults)."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    prefer_tflite_model: bool = False
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 0
    enable_signature_method_name_check: bool = False
    session_intra_op_threads: int = 0
    session_inter_op_threads: int = 0

    def __post_init__(self):
        if not self.saved_model_tags or not all(self.saved_model_tags):
            raise ValueError(
                f"saved_model_tags needs at least one non-empty tag; Received: "
                f"{self.saved_model_tags!r}"
            )
        if self.num_request_iterations_for_warmup < 0:
            raise ValueError(
                "num_request_iterations_for_warmup must be >= 0; Received: "
                f"{self.num_request_iterations_for_warmup}"
            )


def configure_threads(intra_op: int = 0, inter_op: int = 0, session: int = 0) -> tuple[int, int]:
    """TF Serving's thread-pool flags: --tensorflow_intra_op_parallelism and
    --tensorflow_inter_op_parallelism, or --tensorflow_session_parallelism for both;
    all three at once is an error. 0 leaves TensorFlow's automatic choice. Applies to
    the TensorFlow runtime of this process (call before it runs its first op) and
    returns the (intra, inter) pair for TF1 Sessions."""
    import tensorflow as tf

    for name, value in (
        ("tensorflow_intra_op_parallelism", intra_op),
        ("tensorflow_inter_op_parallelism", inter_op),
        ("tensorflow_session_parallelism", session),
    ):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0; Received: {value}")
    if intra_op > 0 and inter_op > 0 and session > 0:
        raise ValueError(
            "Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, "
            "server_options.tensorflow_inter_op_parallelism) separately. You cannot "
            "configure all."
        )
    if intra_op > 0 or inter_op > 0:
        intra, inter = intra_op, inter_op
    else:
        intra = inter = session
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as err:
        raise RuntimeError(
            f"the TensorFlow thread pools are already initialised in this process, "
            f"so intra={intra}, inter={inter} cannot apply: {err}"
        ) from None
    return intra, inter


def load_servable(
    name: str,
    version: int,
    path: str,
    options: LoadOptions | None = None,
    metrics=None,
    factory=None,
):
    """Load one version (SavedModel, or TF Lite with `prefer_tflite_model`) and warm it up.
    A failing warm-up fails the load: the version never becomes AVAILABLE. `factory`
    builds the servable (default: `Servable`)."""
    from tfbn.serving import _warmup
    from tfbn.serving._servable import Servable

    options = options or LoadOptions()
    servable = (factory or Servable)(
        name,
        version,
        path,
        tags=options.saved_model_tags,
        prefer_tflite=options.prefer_tflite_model,
        session_threads=(options.session_intra_op_threads, options.session_inter_op_threads),
    )
    if not options.enable_model_warmup:
        return servable
    start = time.monotonic()
    status = "OK"
    try:
        _warmup.run_warmup(
            servable,
            path,
            options.num_request_iterations_for_warmup,
            options.enable_signature_method_name_check,
        )
    except ServingError as err:
        status = err.code.name
        servable.close()
        raise error(err.code.name, f"Model warm-up failed for {path}: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - any replay failure fails the load
        status = "INTERNAL"
        servable.close()
        raise error(
            "INTERNAL", f"Model warm-up failed for {path}: {type(err).__name__}: {err}"
        ) from None
    finally:
        if metrics is not None and _warmup.os.path.isfile(_warmup.warmup_path(path)):
            metrics.record_warmup(path, status, time.monotonic() - start)
    return servable
