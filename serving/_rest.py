"""The REST API: TF Serving's URL space (one route table) over an HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING

from tfbn.serving import _inference, _json_tensor
from tfbn.serving._manager import ModelManager, metadata_response
from tfbn.serving._status import ServingError, error, http_status

if TYPE_CHECKING:
    from tfbn.serving.server import DevServer

log = logging.getLogger("tfbn.serving.server")


_PREDICT_RE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:"
                         r"(classify|regress|predict)", re.IGNORECASE)
_STATUS_RE = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
                        re.IGNORECASE)


def handle(manager: ModelManager, method: str, path: str, body: bytes,
           metrics=None, timeout: float | None = None) -> tuple[int, str]:
    """Dispatch one REST request; with `metrics`, count it and time it (TF Serving's
    request_count / request_latency with entrypoint REST). `timeout` (seconds,
    --rest_api_timeout_in_ms) bounds the wait for a batch, and a call that finishes
    after it is answered DEADLINE_EXCEEDED (TF Serving sets it as the Session's
    RunOptions timeout)."""
    if metrics is None:
        return _timed_route(manager, method, path, body, timeout)
    start = time.monotonic()
    m = _PREDICT_RE.fullmatch(path) if method == "POST" else _STATUS_RE.fullmatch(path)
    model = urllib.parse.unquote(m.group(1) or "") if m else ""
    api = m.group(4) if m and method == "POST" else ("metadata" if m and m.group(4) else "status")
    status = "UNKNOWN"
    try:
        result = _timed_route(manager, method, path, body, timeout)
        status = "OK"
        return result
    except ServingError as err:
        status = err.code.name
        raise
    finally:
        metrics.record_request(model, api, "REST", status, time.monotonic() - start)


def _timed_route(manager, method: str, path: str, body: bytes, timeout: float | None):
    if not timeout or method != "POST":
        return _route(manager, method, path, body)
    deadline = time.monotonic() + timeout
    result = _route(manager, method, path, body, timeout)
    if time.monotonic() > deadline:
        raise error("DEADLINE_EXCEEDED", f"Deadline Exceeded: the request took longer than "
                                         f"--rest_api_timeout_in_ms={int(timeout * 1000)}")
    return result


def _route(manager: ModelManager, method: str, path: str, body: bytes,
           timeout: float | None = None) -> tuple[int, str]:
    """Dispatch one REST request (the part of TF Serving's HttpRestApiHandler this server needs)."""
    if not re.fullmatch(r"/v1/.*", path, re.IGNORECASE):
        raise error("NOT_FOUND", f"Not found: {method} {path} (the REST API lives under /v1/)")
    malformed = error("INVALID_ARGUMENT", f"Malformed request: {method} {path}")
    if method == "POST":
        m = _PREDICT_RE.fullmatch(path)
        if not m:
            raise malformed
        name, version, label, verb = m.groups()
        name = urllib.parse.unquote(name)
        label = urllib.parse.unquote(label) if label else None
        version = int(version) if version else None
        if verb.lower() in ("classify", "regress"):
            return 200, _inference.rest_classify_regress(manager, verb.lower(), name, version,
                                                         label, body)
        with manager.use(name, version, label) as servable:

            def infos(sig):
                return servable.signature(sig)[1].inputs

            sig, inputs, fmt = _json_tensor.parse_predict_json(body, infos)
            _, outputs = servable.run(sig, inputs, timeout=timeout)
        return 200, _json_tensor.predict_json(outputs, fmt)
    if method == "GET":
        m = _STATUS_RE.fullmatch(path)
        if not m:
            raise malformed
        name, version, label, sub = m.groups()
        if not name:
            raise error("INVALID_ARGUMENT", "Missing model name in request.")
        name = urllib.parse.unquote(name)
        label = urllib.parse.unquote(label) if label else None
        version = int(version) if version else None
        if sub:
            return 200, _json_tensor.metadata_json(metadata_response(manager, name, version, label))
        return 200, _json_tensor.status_json(manager.status(name, version, label))
    raise malformed


class _RestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = "tfbn-devserver"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet by default
        log.debug("REST %s " + fmt, self.address_string(), *args)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, headers) as JSON, on HTTP/1.1."""
        if not getattr(self, "request_version", "").startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        text = message or http.server.BaseHTTPRequestHandler.responses.get(code, ("Error",))[0]
        try:
            self._reply(code, json.dumps({"error": text}))
        except OSError:
            pass

    def _reply(self, status: int, body: str, content_type: str = "application/json"):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ServingError, status: int | None = None):
        self._reply(status or http_status(err.code), json.dumps({"error": err.message}))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _other(self):
        self._read_body()
        self._error(error("INVALID_ARGUMENT", f"Malformed request: {self.command} {self.path}"))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _other

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                self._error(error("INVALID_ARGUMENT", "chunked request bodies are not supported; "
                                                     "send a Content-Length"), 411)
                return None
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(error("INVALID_ARGUMENT", f"Invalid Content-Length: {length!r}"))
            return None
        limit = self.server.dev.max_request_bytes
        if n > limit:
            self.close_connection = True  # do not read it
            self._error(error("RESOURCE_EXHAUSTED", f"Request body of {n} bytes exceeds the limit of "
                                                   f"{limit} bytes (--max_request_bytes)"), 413)
            return None
        return self.rfile.read(n)

    def _handle(self, method: str):
        dev: DevServer = self.server.dev
        dev._enter()
        try:
            body = self._read_body() if method == "POST" else b""
            if body is None:
                return
            if method == "GET" and self.headers.get("Content-Length"):
                self._read_body()
            path = urllib.parse.urlsplit(self.path).path
            if method == "GET" and dev.metrics is not None and path == dev.metrics.path:
                self._reply(200, dev.metrics.page().decode("utf-8"),
                            "text/plain; version=0.0.4; charset=utf-8")
                return
            try:
                with dev.rest_slots:
                    status, out = handle(dev.manager, method, path, body, dev.metrics,
                                         dev.rest_timeout)
            except ServingError as err:
                self._error(err)
                return
            except Exception as err:  # noqa: BLE001 - the server keeps serving
                log.exception("REST %s %s failed", method, path)
                self._error(error("INTERNAL", f"{type(err).__name__}: {err}"))
                return
            self._reply(status, out)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            dev._exit()


class RestServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, dev: DevServer):
        self.dev = dev
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _RestHandler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RestServer6(RestServer):
    address_family = socket.AF_INET6

