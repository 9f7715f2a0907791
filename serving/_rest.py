"""The REST API: TF Serving's URL space (one route table) on aiohttp's HTTP/1.1 server.

HTTP framing (request line, headers, Content-Length / chunked bodies, keep-alive,
pipelining, HEAD, protocol errors) is aiohttp's; this module adds TF Serving's routes
and the development server's limits:

- a request body larger than `max_request_bytes` is answered 413 once, unread, and
  the connection is closed;
- a connection that has not delivered a complete request line and headers within
  `idle_timeout` seconds of being opened (or of its previous response) is closed:
  the same clock covers idle keep-alive connections and slow headers;
- a body that has not fully arrived `body_timeout` seconds after its headers is
  answered 408 and the connection closed;
- decoding and model calls run on a bounded thread pool (`num_threads`), never on
  the event loop, so idle or slow connections cost no thread;
- at most `BODY_BUDGET_FACTOR` x `max_request_bytes` of request bodies are decoded at
  once (a body waits for room; one alone always fits), so decoding memory is bounded
  for the whole server, not only per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from tfbn.serving import _inference, _json_tensor
from tfbn.serving._manager import ModelManager, metadata_response
from tfbn.serving._status import ServingError, error, http_status

from tfbn import layout

if TYPE_CHECKING:
    from tfbn.serving.server import DevServer

log = logging.getLogger("tfbn.serving.server")

BODY_BUDGET_FACTOR = 4

# --- routes (TF Serving's http_rest_api_util regexes) ----------------------------------

_MODEL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"


@dataclasses.dataclass(frozen=True)
class Route:
    """One entry of the route table: an HTTP method, a full-match path pattern and the
    function answering it, called as `handler(manager, match, body) -> (status, json)`."""

    method: str
    pattern: re.Pattern
    handler: Callable[[ModelManager, re.Match, bytes], tuple[int, str]]


def _spec(m: re.Match) -> tuple[str, int | None, str | None]:
    """Model name, version and label of a matched URL (TF Serving's parsing)."""
    name = urllib.parse.unquote(m.group("name"))
    label = m.group("label")
    text = m.group("version")
    version = int(text) if text else None
    if version is not None and version > layout.MAX_VERSION:  # absl::SimpleAtoi into an int64 fails
        raise error("INVALID_ARGUMENT", f"Failed to convert version: {text} to numeric.")
    return name, version, urllib.parse.unquote(label) if label else None


def _predict(manager: ModelManager, m: re.Match, body: bytes) -> tuple[int, str]:
    name, version, label = _spec(m)
    with manager.use(name, version, label) as servable:

        def infos(sig):
            return servable.signature(sig)[1].inputs

        sig, inputs, fmt = _json_tensor.parse_predict_json(body, infos)
        _, outputs = servable.run(sig, inputs)
    return 200, _json_tensor.predict_json(outputs, fmt)


def _classify_or_regress(manager: ModelManager, m: re.Match, body: bytes) -> tuple[int, str]:
    name, version, label = _spec(m)
    return 200, _inference.rest_classify_regress(
        manager, m.group("verb"), name, version, label, body
    )


# The POST verbs after "model[/versions/N|/labels/L]:" (lower case only, as TF Serving
# dispatches them: `:PREDICT` matches its case-insensitive regex but no verb, so it is
# a malformed request).
POST_VERBS: dict[str, Callable[[ModelManager, re.Match, bytes], tuple[int, str]]] = {
    "predict": _predict,
    "classify": _classify_or_regress,
    "regress": _classify_or_regress,
}


def _post_verb(manager: ModelManager, m: re.Match, body: bytes) -> tuple[int, str]:
    fn = POST_VERBS.get(m.group("verb"))
    if fn is None:
        raise _malformed("POST", m.string)
    return fn(manager, m, body)


def _model_get(manager: ModelManager, m: re.Match, body: bytes) -> tuple[int, str]:
    if not m.group("name"):
        raise error("INVALID_ARGUMENT", "Missing model name in request.")
    name, version, label = _spec(m)
    if m.group("sub"):
        return 200, _json_tensor.metadata_json(metadata_response(manager, name, version, label))
    return 200, _json_tensor.status_json(manager.status(name, version, label))


ROUTES: list[Route] = [
    Route("POST", re.compile(_MODEL + r":(?P<verb>[a-zA-Z]+)", re.IGNORECASE), _post_verb),
    Route(
        "GET",
        re.compile(
            r"/v1/models(?:/(?P<name>[^/:]+))?(?:/versions/(?P<version>\d+)"
            r"|/labels/(?P<label>[^/:]+))?(?:/(?P<sub>metadata))?",
            re.IGNORECASE,
        ),
        _model_get,
    ),
]


def _malformed(method: str, path: str) -> ServingError:
    return error("INVALID_ARGUMENT", f"Malformed request: {method} {path}")


def handle(
    manager: ModelManager, method: str, path: str, body: bytes, routes: list[Route] | None = None
) -> tuple[int, str]:
    """Answer one REST request: (HTTP status, JSON text). Raises ServingError."""
    for route in routes if routes is not None else ROUTES:
        if route.method == method:
            m = route.pattern.fullmatch(path)
            if m:
                return route.handler(manager, m, body)
    if not re.fullmatch(r"/v1/.*", path, re.IGNORECASE):
        raise error("NOT_FOUND", f"Not found: {method} {path} (the REST API lives under /v1/)")
    raise _malformed(method, path)


def metric_labels(method: str, path: str, routes: list[Route] | None = None) -> tuple[str, str]:
    """(model name, API) of a request for the request metrics: the POST verb, or
    "metadata" / "status" for GETs; ("", "") when no route matches."""
    for route in routes if routes is not None else ROUTES:
        if route.method == method:
            m = route.pattern.fullmatch(path)
            if m:
                name = urllib.parse.unquote(m.group("name") or "")
                if method == "POST":
                    return name, m.group("verb")
                return name, "metadata" if m.group("sub") else "status"
    return "", ""


def error_json(err: ServingError) -> str:
    return json.dumps({"error": err.message})


# --- the HTTP server -------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class RestServer:
    """aiohttp's low-level HTTP/1.1 server on its own event-loop thread, dispatching to
    `handle` on a thread pool."""

    def __init__(
        self,
        dev: DevServer,
        host: str,
        port: int,
        *,
        max_request_bytes: int,
        num_threads: int,
        idle_timeout: float,
        body_timeout: float,
    ):
        self.dev = dev
        self.host, self.requested_port = host, port
        self.max_request_bytes = max_request_bytes
        self.idle_timeout, self.body_timeout = idle_timeout, body_timeout
        self.port: int | None = None
        self.routes = list(ROUTES)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            num_threads, thread_name_prefix="tfbn-rest"
        )
        self.body_budget = BODY_BUDGET_FACTOR * max_request_bytes
        self.bodies_in_flight = 0  # bytes of bodies being decoded or run (event-loop thread only)
        self.peak_bodies_in_flight = 0
        self._room: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> None:
        ready = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_loop, args=(ready,), name="tfbn-rest-loop", daemon=True
        )
        self._thread.start()
        ready.result(timeout=60)  # re-raises a bind error

    def _run_loop(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # noqa: BLE001 - reported to start()
            ready.set_exception(err)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        self._room = asyncio.Condition()
        server = web.Server(
            self._handle,
            keepalive_timeout=self.idle_timeout,
            auto_decompress=False,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=128,
            lingering_time=0,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.host,
            self.requested_port,
            backlog=1024,
            reuse_address=True,
            shutdown_timeout=5.0,
        )
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self, grace: float) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
            try:
                fut.result(timeout=grace + 5)
            except Exception:  # noqa: BLE001 - stopping anyway
                log.exception("stopping the REST server")
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=grace + 5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._loop = self._thread = None

    # one request
    async def _handle(self, request):
        from aiohttp import web

        def reply(
            status: int, text: str, close: bool = False, content_type: str = "application/json"
        ):
            resp = web.Response(
                status=status, body=text.encode("utf-8"), headers={"Content-Type": content_type}
            )
            if close:
                resp.force_close()
            return resp

        method, path = request.method, request.rel_url.raw_path
        if request.version < (1, 0):  # HTTP/0.9 has no status line or headers: not answered
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("HTTP/0.9 request")
        self.dev._enter()  # noqa: SLF001 - in-flight accounting for a graceful stop
        try:
            try:
                body = await asyncio.wait_for(self._read_body(request), self.body_timeout)
            except _TooLarge as err:
                return reply(413, error_json(error("RESOURCE_EXHAUSTED", str(err))), close=True)
            except TimeoutError:
                msg = f"Request body not received within {self.body_timeout:g} s"
                return reply(408, error_json(error("DEADLINE_EXCEEDED", msg)), close=True)
            metrics = self.dev.metrics
            if metrics is not None and method == "GET" and path == metrics.path:
                return reply(
                    200,
                    metrics.page().decode("utf-8"),
                    content_type="text/plain; version=0.0.4; charset=utf-8",
                )
            loop = asyncio.get_running_loop()
            n = len(body)
            async with self._room:
                await self._room.wait_for(
                    lambda: (
                        self.bodies_in_flight == 0 or self.bodies_in_flight + n <= self.body_budget
                    )
                )
                self.bodies_in_flight += n
                self.peak_bodies_in_flight = max(self.peak_bodies_in_flight, self.bodies_in_flight)
            start, code = loop.time(), "UNKNOWN"
            try:
                # --rest_api_timeout_in_ms: the answer is a 504 at the deadline; the model
                # call already running finishes on its thread and its result is dropped.
                status, text = await asyncio.wait_for(
                    loop.run_in_executor(
                        self._pool, handle, self.dev.manager, method, path, body, self.routes
                    ),
                    self.dev.rest_timeout,
                )
                code = "OK"
            except ServingError as err:
                code = err.code.name
                return reply(http_status(err.code), error_json(err))
            except TimeoutError:
                code = "DEADLINE_EXCEEDED"
                msg = (
                    f"Deadline exceeded: no answer within --rest_api_timeout_in_ms="
                    f"{round(self.dev.rest_timeout * 1000)}"
                )
                return reply(504, error_json(error(code, msg)))
            except Exception as err:  # noqa: BLE001 - the server keeps serving
                code = "INTERNAL"
                log.exception("REST %s %s failed", method, path)
                return reply(500, error_json(error("INTERNAL", f"{type(err).__name__}: {err}")))
            finally:
                async with self._room:
                    self.bodies_in_flight -= n
                    self._room.notify_all()
                if metrics is not None:
                    model, api = metric_labels(method, path, self.routes)
                    metrics.record_request(model, api, "REST", code, loop.time() - start)
            return reply(status, text)
        finally:
            self.dev._exit()  # noqa: SLF001

    async def _read_body(self, request) -> bytes:
        limit = self.max_request_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _TooLarge(
                f"Request body of {length} bytes exceeds the limit of {limit} bytes "
                "(--max-request-bytes)"
            )
        if not request.body_exists:
            return b""
        chunks, total = [], 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise _TooLarge(
                    f"Request body exceeds the limit of {limit} bytes (--max-request-bytes)"
                )
            chunks.append(chunk)
        return b"".join(chunks)
