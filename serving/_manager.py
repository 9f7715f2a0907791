"""Model management: polling base paths for version directories, loading and retiring
versions under the version policy, version labels, status and metadata lookups
(TF Serving's ServerCore with its file-system storage path source, in miniature)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from tfbn.serving._batcher import Batcher
from tfbn.serving._config import BatchingParameters, ModelConfig
from tfbn.serving._loading import LoadOptions, load_servable
from tfbn.serving._servable import Servable
from tfbn.serving._status import ServingError, error

from tfbn import layout

log = logging.getLogger("tfbn.serving.server")


DEFAULT_MAX_NUM_LOAD_RETRIES = 5  # tensorflow_model_server's --max_num_load_retries
DEFAULT_LOAD_RETRY_INTERVAL_MICROS = 60_000_000  # --load_retry_interval_micros (60 s)


@dataclasses.dataclass
class _VersionState:
    state: str = "LOADING"  # START, LOADING, AVAILABLE, UNLOADING, END (TF Serving's names)
    error: ServingError | None = None
    fingerprint: Any = None
    servable: Servable | None = None
    attempts: int = 0  # failed load attempts of this fingerprint
    retry_at: float | None = None  # monotonic time of the next retry, if one is due


class _Ignored:
    """Directory names already reported as not being version numbers (logged once each)."""

    def __init__(self):
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def report(self, base_path: str, name: str) -> None:
        with self._lock:
            if (base_path, name) in self._seen:
                return
            self._seen.add((base_path, name))
        log.warning(
            "Ignoring %r under base path %s: a version directory name must be an int64 "
            "version number",
            name,
            base_path,
        )


def _version_dirs(base_path: str, ignored: _Ignored | None = None) -> dict[int, str] | None:
    """Version number -> directory under `base_path`; None if the base path cannot be read."""
    try:
        names = os.listdir(base_path)
    except OSError as err:
        log.warning("Cannot list base path %s: %s", base_path, err)
        return None
    out = {}
    for name in names:
        full = os.path.join(base_path, name)
        if not os.path.isdir(full):
            continue
        version = layout.parse_version(name)
        if version is None:
            if ignored is not None and not name.startswith("."):
                ignored.report(base_path, name)
            continue
        out[version] = full
    return out


def fingerprint(path: str) -> tuple:
    """(relative path, size, mtime) of every file in a version directory, so a version
    whose files are still being written is seen to change until the copy is complete."""
    stats = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            stats.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(stats)


class ModelManager:
    """Loads, serves and swaps model versions (TF Serving's ServerCore, in miniature).

    A version whose load fails is retried up to `max_num_load_retries` times,
    `load_retry_interval_micros` apart (tensorflow_model_server's flags and defaults),
    and loaded afresh whenever any file in its directory changes. Directory names that
    are not int64 version numbers are ignored (logged once). When a base path holds no
    version directory at all, its model's versions are unloaded, as TF Serving does by
    default (`servable_versions_always_present` false); a base path that cannot be read
    leaves the served versions alone.
    """

    def __init__(
        self,
        models: list[ModelConfig],
        batching: BatchingParameters | None = None,
        *,
        max_num_load_retries: int = DEFAULT_MAX_NUM_LOAD_RETRIES,
        load_retry_interval_micros: int = DEFAULT_LOAD_RETRY_INTERVAL_MICROS,
        load_options: LoadOptions | None = None,
        metrics=None,
        allow_version_labels_for_unavailable_models: bool = False,
    ):
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; Received: {names}")
        if max_num_load_retries < 0:
            raise ValueError(f"max_num_load_retries must be >= 0; Received: {max_num_load_retries}")
        if load_retry_interval_micros < 0:
            raise ValueError(
                f"load_retry_interval_micros must be >= 0; Received: {load_retry_interval_micros}"
            )
        self.configs = {m.name: m for m in models}
        self.batching = batching
        self.load_options = load_options or LoadOptions()
        self.metrics = metrics
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self.max_num_load_retries = int(max_num_load_retries)
        self.load_retry_interval = load_retry_interval_micros / 1e6
        self._states: dict[str, dict[int, _VersionState]] = {m.name: {} for m in models}
        self._ignored = _Ignored()
        self._lock = threading.RLock()
        self._labels: dict[str, dict[str, int]] = {}
        self._update_labels(self.configs)
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # polling
    def poll_once(self) -> None:
        """Look at every base path once; load new aspired versions (and failed ones whose
        retry is due or whose files changed), retire old ones."""
        with self._poll_lock:
            for name, cfg in self.configs.items():
                try:
                    self._poll_model(name, cfg)
                except Exception:  # noqa: BLE001 - one model's trouble must not stop the others
                    log.exception("polling model %s failed", name)

    def _should_load(self, st: _VersionState | None, fp: tuple, now: float) -> bool:
        """A new version loads; a loaded one stays as it is (as in TF Serving, changing a
        served version's files does not reload it); a failed one is retried when its
        retry is due or any of its files changed."""
        if st is None:
            return True
        if st.state != "END" or st.error is None:
            return st.state == "END"  # END without error: unloaded earlier, aspired again
        return st.fingerprint != fp or (st.retry_at is not None and now >= st.retry_at)

    def _poll_model(self, name: str, cfg: ModelConfig) -> None:
        on_disk = _version_dirs(cfg.base_path, self._ignored)
        if on_disk is None:
            return
        aspired = [v for v in cfg.select(list(on_disk)) if v in on_disk]
        states = self._states[name]
        for v in sorted(aspired, reverse=True):
            st = states.get(v)
            fp = fingerprint(on_disk[v])
            if not self._should_load(st, fp, time.monotonic()):
                continue
            attempts = st.attempts if st is not None and st.fingerprint == fp else 0
            with self._lock:
                states[v] = _VersionState("LOADING", fingerprint=fp, attempts=attempts)
            try:
                servable = load_servable(
                    name, v, on_disk[v], self.load_options, self.metrics, factory=Servable
                )
                if self.batching is not None:
                    servable.batcher = Batcher(self.batching)
            except Exception as err:  # noqa: BLE001 - a broken version must not stop the server
                if not isinstance(err, ServingError):
                    err = error("INTERNAL", f"{type(err).__name__}: {err}")
                attempts += 1
                retry = attempts <= self.max_num_load_retries
                log.warning(
                    "Loading servable: {name: %s version: %d} failed (attempt %d of %d): %s",
                    name,
                    v,
                    attempts,
                    self.max_num_load_retries + 1,
                    err,
                )
                with self._lock:
                    states[v] = _VersionState(
                        "END",
                        error=err,
                        fingerprint=fp,
                        attempts=attempts,
                        retry_at=time.monotonic() + self.load_retry_interval if retry else None,
                    )
                continue
            log.info("Successfully loaded servable version {name: %s version: %d}", name, v)
            with self._lock:
                states[v] = _VersionState("AVAILABLE", fingerprint=fp, servable=servable)
        with self._lock:
            if not on_disk:
                # No version directory left: unload everything, as TF Serving's default
                # (servable_versions_always_present = false).
                retire = [v for v, st in states.items() if st.state == "AVAILABLE"]
                if retire:
                    log.warning(
                        "No versions of servable %s found under base path %s: unloading "
                        "versions %s",
                        name,
                        cfg.base_path,
                        retire,
                    )
            else:
                # Retire versions no longer aspired, but never the last available one while
                # no aspired version is available (a broken new version leaves the old one
                # serving: TF Serving's availability-preserving policy).
                available_aspired = any(
                    states.get(v) and states[v].state == "AVAILABLE" for v in aspired
                )
                retire = [
                    v
                    for v, st in states.items()
                    if st.state == "AVAILABLE" and v not in aspired and available_aspired
                ]
            for v in retire:
                servable = states[v].servable
                states[v] = _VersionState("END", fingerprint=states[v].fingerprint)
                if servable is not None:
                    servable.retire()
            for v in [
                v for v, st in states.items() if v not in on_disk and st.retry_at is not None
            ]:
                states[v].retry_at = None  # its directory is gone: nothing to retry

    def _next_retry(self) -> float | None:
        with self._lock:
            due = [
                st.retry_at
                for s in self._states.values()
                for st in s.values()
                if st.retry_at is not None
            ]
        return min(due) if due else None

    def start_polling(self, interval: float) -> None:
        """Poll every `interval` seconds (0: never, as tensorflow_model_server with
        --file_system_poll_wait_seconds=0); load retries are run when due either way."""
        if self._thread is not None:
            return

        def loop():
            next_poll = time.monotonic() + interval if interval > 0 else None
            while True:
                retry = self._next_retry()
                wake = min(t for t in (next_poll, retry, time.monotonic() + 1.0) if t is not None)
                if self._stop.wait(max(0.0, wake - time.monotonic())):
                    return
                now = time.monotonic()
                if (next_poll is not None and now >= next_poll) or (
                    retry is not None and now >= retry
                ):
                    self.poll_once()
                    if next_poll is not None and now >= next_poll:
                        next_poll = time.monotonic() + interval

        self._thread = threading.Thread(target=loop, name="tfbn-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            servables = [
                st.servable for s in self._states.values() for st in s.values() if st.servable
            ]
        for s in servables:
            s.close()

    # lookups
    def _model(self, name: str):
        if name not in self.configs:
            return None
        return self._states[name]

    def _label_version(self, name: str, label: str) -> int:
        """The version a model's version label points at (TF Serving's error if none)."""
        with self._lock:
            version = self._labels.get(name, {}).get(label)
        if version is None:
            raise error("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
        return version

    def _update_labels(self, configs: dict[str, ModelConfig]) -> None:
        """TF Serving's ServerCore::UpdateModelVersionLabelMap: every label must point at
        an AVAILABLE version, unless --allow_version_labels_for_unavailable_models, which
        allows a new label (not moving an existing one) to point at any version."""
        new: dict[str, dict[str, int]] = {}
        with self._lock:
            for name, cfg in configs.items():
                states = self._states.get(name, {})
                for label, version in cfg.labels.items():
                    existing = self._labels.get(name, {}).get(label)
                    allow = self.allow_unavailable_labels and existing in (None, version)
                    st = states.get(version)
                    if not allow and (st is None or st.state != "AVAILABLE"):
                        raise error(
                            "FAILED_PRECONDITION",
                            f"Request to assign label to version "
                            f"{version} of model {name}, which is not currently available "
                            "for inference",
                        )
                    new.setdefault(name, {})[label] = version
            self._labels = new

    def get(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request addresses (TF Serving's GetServableHandle)."""
        if not name:
            raise error("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        if version is not None and label:
            raise error(
                "INVALID_ARGUMENT",
                f"Both model version ({version}) and model version label "
                f"({label}) cannot be supplied.",
            )
        with self._lock:
            states = self._model(name)
            if label:
                version = self._label_version(name, label)
            if version is not None:
                st = states.get(int(version)) if states is not None else None
                if st is None or st.state != "AVAILABLE":
                    raise error(
                        "NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
                    )
                return st.servable
            if states is None:
                raise error("NOT_FOUND", f"Servable not found for request: Latest({name})")
            available = [v for v, st in states.items() if st.state == "AVAILABLE"]
            if available:
                return states[max(available)].servable
            failed = sorted((v, st) for v, st in states.items() if st.error is not None)
            if failed:
                v, st = failed[-1]
                raise error(
                    "FAILED_PRECONDITION",
                    f"Servable not available for request: Latest({name}): "
                    f"version {v} failed to load: {st.error.message}",
                )
            raise error("NOT_FOUND", f"Servable not found for request: Latest({name})")

    @contextlib.contextmanager
    def use(self, name: str, version: int | None = None, label: str | None = None):
        """`get`, holding the servable so a version swap cannot unload it mid-request."""
        with self._lock:
            servable = self.get(name, version, label).acquire()
        try:
            yield servable
        finally:
            servable.release()

    def status(self, name: str, version: int | None = None, label: str | None = None):
        """GetModelStatusResponse for a model (all versions it has seen) or one version."""
        from tensorflow_serving.apis import get_model_status_pb2

        with self._lock:
            states = self._model(name)
            # A version label is ignored: TF Serving answers every version of the model.
            if version is not None:
                st = states.get(int(version)) if states is not None else None
                if st is None:
                    raise error("NOT_FOUND", f"Could not find version {version} of model {name}")
                items = [(int(version), st)]
            else:
                if not states:
                    raise error("NOT_FOUND", f"Could not find any versions of model {name}")
                items = sorted(states.items(), reverse=True)
            resp = get_model_status_pb2.GetModelStatusResponse()
            for v, st in items:
                mvs = resp.model_version_status.add(version=v)
                mvs.state = get_model_status_pb2.ModelVersionStatus.State.Value(st.state)
                mvs.status.SetInParent()
                if st.error is not None:
                    mvs.status.error_code = st.error.code.value[0]
                    mvs.status.error_message = st.error.message
            return resp

    # configuration changes (--model_config_file_poll_wait_seconds)
    def reload_config(self, models: list[ModelConfig]) -> None:
        """Serve `models` from now on (TF Serving's ServerCore::ReloadConfig): labels are
        validated first (a failing label leaves everything as it was), models no longer
        listed are unloaded, new ones loaded, changed policies applied."""
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; Received: {names}")
        if not models:
            raise ValueError("the new model config lists no model")
        new = {m.name: m for m in models}
        with self._poll_lock:
            retired = []
            with self._lock:
                self._update_labels(new)
                for name in [n for n in self.configs if n not in new]:
                    for st in self._states.pop(name, {}).values():
                        if st.servable is not None:
                            retired.append(st.servable)
                    log.info("Unloading model %s: no longer in the model config", name)
                for name in new:
                    self._states.setdefault(name, {})
                self.configs = new
            for servable in retired:
                servable.retire()
            for name, cfg in new.items():
                self._poll_model(name, cfg)


def _model_spec(spec_cls, servable: Servable, signature: str):
    spec = spec_cls(name=servable.name, signature_name=signature)
    spec.version.value = servable.version
    return spec


def metadata_response(
    manager: ModelManager,
    name: str,
    version: int | None,
    label: str | None,
    fields=("signature_def",),
):
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

    fields = list(fields)
    if not fields:
        raise error(
            "INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field"
        )
    for field in fields:
        if field != "signature_def":
            raise error("INVALID_ARGUMENT", f"Metadata field {field} is not supported")
    servable = manager.get(name, version, label)
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.CopyFrom(_model_spec(model_pb2.ModelSpec, servable, ""))
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    resp.metadata["signature_def"].Pack(sig_map)
    return resp
