"""The gRPC profiler service (`tensorflow.ProfilerService/Profile`), on by default as in
tensorflow_model_server (`--enable_profiler`, default true).

A client such as `tf.profiler.experimental.client.trace` (or TensorBoard's capture
button) sends a ProfileRequest; the server profiles itself for `duration_ms` with
TensorFlow's profiler and writes the XSpace to
`<repository_root>/<session_id>/<host_name>.xplane.pb`, as TensorFlow's own profiler
service does, answering `empty_trace = false`. Only `Profile` is served; the other
methods of the service answer UNIMPLEMENTED.

The messages are declared here with the field numbers of
tsl/profiler/protobuf/profiler_service.proto (the TensorFlow wheel ships no Python
module for them); fields this server does not use are skipped when parsing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE", "handler"]

log = logging.getLogger("tfbn.serving.server")

SERVICE = "tensorflow.ProfilerService"
_MAX_DURATION_MS = 10 * 60 * 1000
_lock = threading.Lock()  # one profiling session per process


def _messages():
    pool = descriptor_pool.Default()
    names = ("tfbn.serving.ProfileRequest", "tfbn.serving.ProfileResponse")
    try:
        return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(n)) for n in names)
    except KeyError:
        pass
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(
        name="tfbn/serving/profiler_service.proto", package="tfbn.serving", syntax="proto3"
    )
    req = fd.message_type.add(name="ProfileRequest")
    for name, number, kind in (
        ("duration_ms", 1, F.TYPE_UINT64),
        ("repository_root", 5, F.TYPE_STRING),
        ("session_id", 6, F.TYPE_STRING),
        ("host_name", 7, F.TYPE_STRING),
    ):
        req.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
    resp = fd.message_type.add(name="ProfileResponse")
    resp.field.add(name="empty_trace", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool.Add(fd)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(n)) for n in names)


def _safe_part(text: str, what: str) -> str:
    if not text or os.sep in text or text in (".", ".."):
        raise ValueError(f"ProfileRequest.{what} must be a plain name; Received: {text!r}")
    return text


def profile(request, context):
    """Profile this process for `duration_ms` and write the XSpace where asked."""
    from tensorflow.python.profiler.internal import _pywrap_profiler

    _, response_cls = _messages()
    duration = int(request.duration_ms)
    if not 0 < duration <= _MAX_DURATION_MS:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"duration_ms must be in (0, {_MAX_DURATION_MS}]; Received: {duration}",
        )
    if not request.repository_root:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ProfileRequest.repository_root is empty")
    try:
        session_id = _safe_part(request.session_id, "session_id")
        host = _safe_part(request.host_name or socket.gethostname(), "host_name").replace(":", "_")
    except ValueError as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if not _lock.acquire(blocking=False):
        context.abort(grpc.StatusCode.ALREADY_EXISTS, "Another profiling session is running")
    try:
        session = _pywrap_profiler.ProfilerSession()
        session.start("", {})
        threading.Event().wait(duration / 1000)
        xspace = session.stop()
    finally:
        _lock.release()
    out_dir = os.path.join(request.repository_root, session_id)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{host}.xplane.pb"), "wb") as f:
        f.write(xspace)
    log.info("Profiled for %d ms into %s", duration, out_dir)
    return response_cls(empty_trace=not xspace)


def handler() -> grpc.GenericRpcHandler:
    request_cls, _ = _messages()
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Profile": grpc.unary_unary_rpc_method_handler(
                profile,
                request_deserializer=request_cls.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            ),
        },
    )
