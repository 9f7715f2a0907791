"""Model management: polling base paths for version directories, loading and retiring
versions under the version policy, version labels, status and metadata lookups
(TF Serving's ServerCore with its file-system storage path source, in miniature)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import Any

from tfbn.serving._batcher import Batcher
from tfbn.serving._config import BatchingParameters, ModelConfig
from tfbn.serving._loading import LoadOptions, load_servable
from tfbn.serving._servable import Servable
from tfbn.serving._status import ServingError, error

log = logging.getLogger("tfbn.serving.server")


@dataclasses.dataclass
class _VersionState:
    state: str = "LOADING"  # START, LOADING, AVAILABLE, UNLOADING, END (TF Serving's names)
    error: ServingError | None = None
    fingerprint: Any = None
    servable: Servable | None = None


def _version_dirs(base_path: str) -> dict[int, str]:
    try:
        names = os.listdir(base_path)
    except OSError:
        return {}
    out = {}
    for name in names:
        full = os.path.join(base_path, name)
        if name.isdigit() and os.path.isdir(full):
            out[int(name)] = full
    return out


def _fingerprint(path: str):
    stats = []
    for name in ("saved_model.pb", "saved_model.pbtxt", "variables"):
        try:
            st = os.stat(os.path.join(path, name))
            stats.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(stats)


class ModelManager:
    """Loads, serves and swaps model versions (TF Serving's ServerCore, in miniature)."""

    def __init__(self, models: list[ModelConfig], batching: BatchingParameters | None = None,
                 load_options: LoadOptions | None = None, metrics=None,
                 allow_version_labels_for_unavailable_models: bool = False):
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; Received: {names}")
        self.configs = {m.name: m for m in models}
        self.batching = batching
        self.load_options = load_options or LoadOptions()
        self.metrics = metrics
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._states: dict[str, dict[int, _VersionState]] = {m.name: {} for m in models}
        self._lock = threading.RLock()
        self._labels: dict[str, dict[str, int]] = {}
        self._update_labels(self.configs)
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # polling
    def poll_once(self) -> None:
        """Look at every base path once; load new aspired versions, retire old ones."""
        with self._poll_lock:
            for name, cfg in self.configs.items():
                self._poll_model(name, cfg)

    def _poll_model(self, name: str, cfg: ModelConfig) -> None:
        on_disk = _version_dirs(cfg.base_path)
        aspired = [v for v in cfg.select(list(on_disk)) if v in on_disk]
        states = self._states[name]
        for v in sorted(aspired, reverse=True):
            st = states.get(v)
            fp = _fingerprint(on_disk[v])
            if st is not None and (st.state == "AVAILABLE" or (st.state == "END" and st.error
                                                               and st.fingerprint == fp)):
                continue
            with self._lock:
                states[v] = _VersionState("LOADING", fingerprint=fp)
            try:
                servable = load_servable(name, v, on_disk[v], self.load_options, self.metrics)
                if self.batching is not None:
                    servable.batcher = Batcher(self.batching)
            except ServingError as err:
                log.warning("Loading servable: {name: %s version: %d} failed: %s", name, v, err)
                with self._lock:
                    states[v] = _VersionState("END", error=err, fingerprint=fp)
                continue
            except Exception as err:  # noqa: BLE001 - a broken version must not stop the server
                log.warning("Loading servable: {name: %s version: %d} failed: %s", name, v, err)
                with self._lock:
                    states[v] = _VersionState("END", error=error("INTERNAL", str(err)), fingerprint=fp)
                continue
            log.info("Successfully loaded servable version {name: %s version: %d}", name, v)
            with self._lock:
                states[v] = _VersionState("AVAILABLE", fingerprint=fp, servable=servable)
        # Retire versions no longer aspired, but never the last available one while no
        # aspired version is available (a broken new version leaves the old one serving).
        with self._lock:
            available_aspired = any(states.get(v) and states[v].state == "AVAILABLE" for v in aspired)
            retire = [v for v, st in states.items()
                      if st.state == "AVAILABLE" and v not in aspired and available_aspired]
            for v in retire:
                servable = states[v].servable
                states[v] = _VersionState("END", fingerprint=states[v].fingerprint)
                if servable is not None:
                    servable.retire()

    def start_polling(self, interval: float) -> None:
        if interval <= 0 or self._thread is not None:
            return

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001 - keep polling
                    log.exception("polling the model base paths failed")

        self._thread = threading.Thread(target=loop, name="tfbn-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            servables = [st.servable for s in self._states.values() for st in s.values() if st.servable]
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
                        raise error("FAILED_PRECONDITION", f"Request to assign label to version "
                                    f"{version} of model {name}, which is not currently available "
                                    "for inference")
                    new.setdefault(name, {})[label] = version
            self._labels = new

    def get(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request addresses (TF Serving's GetServableHandle)."""
        if not name:
            raise error("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        if version is not None and label:
            raise error("INVALID_ARGUMENT", f"Both model version ({version}) and model version label "
                                           f"({label}) cannot be supplied.")
        with self._lock:
            states = self._model(name)
            if label:
                version = self._label_version(name, label)
            if version is not None:
                st = states.get(int(version)) if states is not None else None
                if st is None or st.state != "AVAILABLE":
                    raise error("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
                return st.servable
            if states is None:
                raise error("NOT_FOUND", f"Servable not found for request: Latest({name})")
            available = [v for v, st in states.items() if st.state == "AVAILABLE"]
            if available:
                return states[max(available)].servable
            failed = sorted((v, st) for v, st in states.items() if st.error is not None)
            if failed:
                v, st = failed[-1]
                raise error("FAILED_PRECONDITION", f"Servable not available for request: Latest({name}): "
                           f"version {v} failed to load: {st.error.message}")
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


def metadata_response(manager: ModelManager, name: str, version: int | None, label: str | None,
                      fields=("signature_def",)):
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

    fields = list(fields)
    if not fields:
        raise error("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
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

