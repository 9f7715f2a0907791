"""Canonical status codes and errors, as TF Serving reports them on gRPC and REST."""

from __future__ import annotations

import grpc

__all__ = ["ServingError", "error", "http_status", "tf_error"]


class ServingError(Exception):
    """An error with a canonical (gRPC) status code, as TF Serving reports it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.code.name}: {self.message}"


def error(name: str, message: str) -> ServingError:
    """A ServingError with the canonical code called `name` (e.g. "INVALID_ARGUMENT")."""
    return ServingError(getattr(grpc.StatusCode, name), message)


_HTTP = {  # TF Serving's ToHTTPStatusCode (model_servers/http_server.cc)
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TF Serving answers for a canonical status code."""
    return _HTTP.get(code.name, 500)


def tf_error(err: Exception) -> ServingError:
    """A TensorFlow runtime error as a ServingError with its canonical code."""
    import tensorflow as tf

    if isinstance(err, tf.errors.OpError):
        code = grpc.StatusCode[_OP_CODES.get(err.error_code, "UNKNOWN")]
        return ServingError(code, err.message.strip())
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


_OP_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
