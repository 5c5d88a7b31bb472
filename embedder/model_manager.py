"""The model server's core: which model versions are served, loading/unloading them, and Predict.

Follows TF Serving's semantics: versions are the numeric directories under each model's base path
(others, dot-prefixed staging dirs and dirs without saved_model.pb are ignored); the version policy
picks which to serve; a new version is loaded and warmed up before an old one is unloaded
(availability-preserving); a version that fails to load is reported as END with its error and the
versions already serving keep serving. Knows nothing about gRPC.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import prometheus_client
import tensorflow as tf

from cbir.errors import CbirError, FailedPrecondition, InvalidInput, NotFound
from embedder import metrics
from embedder.batching import DynamicBatcher
from embedder.model_config import BatchingParameters, ModelEntry, load_model_server_config
from embedder.servable import Servable, Signature, has_saved_model, tf_error_message

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class State(enum.IntEnum):
    """ModelVersionStatus.State numbers of TF Serving."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclass(frozen=True)
class ModelRef:
    """Which servable a request asks for: latest, a pinned version or a version label."""

    name: str
    version: int | None = None
    label: str | None = None

    def __str__(self) -> str:
        # TF Serving's ServableRequest::DebugString, used in its NOT_FOUND messages.
        return (
            f"Specific({self.name}, {self.version})" if self.version is not None else f"Latest({self.name})"
        )


@dataclass(frozen=True)
class Prediction:
    model_name: str
    version: int
    signature_name: str
    outputs: Arrays


class _Series:
    """The Prometheus series of one model version, looked up once instead of on every Predict."""

    def __init__(self, name: str, version: int):
        self.name, self.version = name, str(version)
        self.items = metrics.PREDICT_ITEMS.labels(name)
        self.latency = metrics.PREDICT_LATENCY.labels(name)
        self._requests = {"OK": metrics.PREDICT_REQUESTS.labels(name, self.version, "OK")}

    def requests(self, status: str) -> prometheus_client.Counter:
        series = self._requests.get(status)
        if series is None:
            series = self._requests[status] = metrics.PREDICT_REQUESTS.labels(self.name, self.version, status)
        return series


@dataclass
class _Served:
    """An AVAILABLE version and its batchers (one per batchable signature)."""

    servable: Servable
    series: _Series
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


def scan_versions(base_path: str | Path) -> dict[int, Path]:
    """Loadable version directories under a base path: numeric names holding a SavedModel."""
    base = Path(base_path)
    found: dict[int, Path] = {}
    try:
        children = list(base.iterdir())
    except OSError:
        return found
    for child in children:
        name = child.name
        if not name.isdigit() or not child.is_dir():
            continue
        if not has_saved_model(child):
            continue  # still being copied, or not a SavedModel
        found[int(name)] = child
    return found


def _fingerprint(path: Path) -> tuple[int, int]:
    target = path / "saved_model.pb"
    if not target.exists():
        target = path / "saved_model.pbtxt"
    try:
        stat = target.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


class ModelManager:
    """Serves the versions that the config's policies select, swapping them without downtime."""

    def __init__(
        self,
        entries: Iterable[ModelEntry],
        *,
        batching: BatchingParameters | None = None,
        enable_warmup: bool = True,
        allow_labels_for_unavailable: bool = False,
        load: Callable[[str, int, Path], Servable] = Servable,
        on_availability: Callable[[bool], None] | None = None,
    ):
        self._entries: dict[str, ModelEntry] = {e.name: e for e in entries}
        self._batching = batching
        self._enable_warmup = enable_warmup
        self._allow_labels_for_unavailable = allow_labels_for_unavailable
        self._load = load
        self._on_availability = on_availability
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()
        self._served: dict[str, dict[int, _Served]] = {}
        self._status: dict[str, dict[int, VersionStatus]] = {}
        self._failed: dict[tuple[str, int], tuple[int, int]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, poll_seconds: float) -> None:
        """Loads in the background and keeps polling base paths every ``poll_seconds``.

        As in TF Serving: 0 polls exactly once, a negative value never polls.
        """
        if poll_seconds < 0:
            return
        thread = threading.Thread(
            target=self._poll_loop, args=(poll_seconds,), name="model-poller", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def watch_config_file(self, path: str, poll_seconds: float) -> None:
        """Re-reads ``--model_config_file`` every ``poll_seconds`` and applies it when it changes."""
        if poll_seconds <= 0:
            return

        def loop() -> None:
            last = Path(path).read_text(errors="replace") if Path(path).exists() else None
            while not self._stop.wait(poll_seconds):
                try:
                    text = Path(path).read_text(errors="replace")
                except OSError as exc:
                    log.warning("cannot read model config file", extra={"path": path, "error": str(exc)})
                    continue
                if text == last:
                    continue
                last = text
                try:
                    self.apply_config(load_model_server_config(path))
                    log.info("model config file reloaded", extra={"path": path})
                except CbirError as exc:
                    log.error("model config file rejected", extra={"path": path, "error": exc.message})

        thread = threading.Thread(target=loop, name="config-watcher", daemon=True)
        self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._lock:
            served = [s for versions in self._served.values() for s in versions.values()]
            self._served.clear()
        for item in served:
            item.close()

    def _poll_loop(self, poll_seconds: float) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything a file system does
                log.exception("model poll failed")
            if poll_seconds == 0 or self._stop.wait(poll_seconds):
                return

    # ------------------------------------------------------------------ config and versions

    @property
    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def all_available(self) -> bool:
        """True when every configured model has at least one AVAILABLE version (health SERVING)."""
        with self._lock:
            return bool(self._entries) and all(self._served.get(name) for name in self._entries)

    def poll_once(self) -> None:
        """One pass over every base path: load what the policies want, then unload the rest."""
        with self._reconcile_lock:
            with self._lock:
                entries = list(self._entries.values())
                removed = [name for name in self._served if name not in self._entries]
            for entry in entries:
                self._reconcile(entry)
            for name in removed:
                for version in list(self._served.get(name, {})):
                    self._unload(name, version)
        if self._on_availability is not None:
            self._on_availability(self.all_available())

    def apply_config(self, entries: Iterable[ModelEntry]) -> None:
        """Replaces the whole model config (HandleReloadConfigRequest), waiting for the loads.

        Labels must point to versions that are AVAILABLE once the new config has loaded (unless
        --allow_version_labels_for_unavailable_models), as TF Serving requires.
        """
        entries = list(entries)
        names = [e.name for e in entries]
        if len(names) != len(set(names)):
            raise InvalidInput("model config lists a model name more than once")
        with self._lock:
            previous = dict(self._entries)
            # Labels are applied only after the versions they point to have loaded.
            self._entries = {
                e.name: ModelEntry(
                    e.name,
                    e.base_path,
                    e.policy,
                    previous[e.name].labels if e.name in previous else {},
                    e.platform,
                )
                for e in entries
            }
        self.poll_once()
        problems: dict[str, list[str]] = {}
        for entry in entries:
            for version in sorted(set(entry.labels.values())):
                if not self._allow_labels_for_unavailable and not self._is_available(entry.name, version):
                    problems.setdefault(entry.name, []).append(
                        f"Request to assign label to version {version} of model {entry.name}, "
                        "which is not currently available for inference."
                    )
        with self._lock:
            for entry in entries:
                # A model whose new labels point nowhere keeps its previous labels.
                if entry.name in self._entries and entry.name not in problems:
                    self._entries[entry.name] = entry
        if problems:
            raise FailedPrecondition(" ".join(m for messages in problems.values() for m in messages))

    def _is_available(self, name: str, version: int) -> bool:
        with self._lock:
            return version in self._served.get(name, {})

    def _reconcile(self, entry: ModelEntry) -> None:
        on_disk = scan_versions(entry.base_path)
        if not on_disk:
            log.debug(
                "no versions found under base path", extra={"model": entry.name, "base_path": entry.base_path}
            )
        for version, path in list(on_disk.items()):
            # A version that failed to load is not retried until its files change.
            if self._failed.get((entry.name, version)) == _fingerprint(path):
                del on_disk[version]
        while True:
            wanted = entry.policy.select(on_disk)
            with self._lock:
                loaded = set(self._served.get(entry.name, {}))
            missing = sorted(wanted - loaded, reverse=True)
            if not missing:
                break
            for version in missing:
                if not self._load_version(entry.name, version, on_disk[version]):
                    # A version that failed does not count for the policy: the next older one
                    # is served instead of it (and the current one is not unloaded for nothing).
                    del on_disk[version]
        # Availability-preserving: unload only what the policy no longer wants once the wanted
        # versions serve; with nothing loadable left on disk, keep serving the newest loaded one.
        surplus = loaded - wanted
        if surplus and not wanted:
            keep = max(surplus)
            surplus.discard(keep)
            log.warning(
                "no loadable version on disk; keeping the loaded one",
                extra={"model": entry.name, "version": keep},
            )
        for version in sorted(surplus):
            self._unload(entry.name, version)

    def _set_status(self, name: str, status: VersionStatus) -> None:
        with self._lock:
            self._status.setdefault(name, {})[status.version] = status
            metrics.AVAILABLE_VERSIONS.labels(name).set(len(self._served.get(name, {})))

    def _load_version(self, name: str, version: int, path: Path) -> bool:
        fingerprint = _fingerprint(path)
        self._set_status(name, VersionStatus(version, State.LOADING))
        log.info("loading model version", extra={"model": name, "version": version, "path": str(path)})
        started = time.monotonic()
        served: _Served | None = None
        try:
            servable = self._load(name, version, path)
            served = _Served(servable, _Series(name, version))
            if self._batching is not None:
                for signature in servable.signatures.values():
                    if signature.batchable:
                        served.batchers[signature.name] = DynamicBatcher(
                            _runner(servable, signature),
                            self._batching,
                            name=f"{name}-{version}-{signature.name}",
                        )
            if self._enable_warmup:
                replayed = servable.warm_up(lambda sig, inputs: self._run(served, sig, inputs))
                log.info(
                    "model version warmed up", extra={"model": name, "version": version, "requests": replayed}
                )
        except Exception as exc:  # noqa: BLE001 - a bad version must not take the server down
            if served is not None:
                served.close()
            code = exc.code if isinstance(exc, CbirError) else grpc.StatusCode.UNKNOWN
            message = exc.message if isinstance(exc, CbirError) else _load_error_text(exc)
            self._failed[(name, version)] = fingerprint
            self._set_status(name, VersionStatus(version, State.END, code, message))
            metrics.MODEL_LOADS.labels(name, "error").inc()
            log.error(
                "model version failed to load",
                extra={"model": name, "version": version, "path": str(path), "error": message},
            )
            return False
        with self._lock:
            self._served.setdefault(name, {})[version] = served
        self._set_status(name, VersionStatus(version, State.AVAILABLE))
        self._failed.pop((name, version), None)
        metrics.MODEL_LOADS.labels(name, "ok").inc()
        metrics.MODEL_LOAD_SECONDS.labels(name).observe(time.monotonic() - started)
        log.info(
            "model version available",
            extra={"model": name, "version": version, "seconds": round(time.monotonic() - started, 2)},
        )
        return True

    def _unload(self, name: str, version: int) -> None:
        with self._lock:
            served = self._served.get(name, {}).pop(version, None)
            if name in self._served and not self._served[name]:
                del self._served[name]
        if served is None:
            return
        self._set_status(name, VersionStatus(version, State.UNLOADING))
        # Requests already holding this version finish on it; the memory goes with the last one.
        served.close()
        self._set_status(name, VersionStatus(version, State.END))
        log.info("model version unloaded", extra={"model": name, "version": version})

    # ------------------------------------------------------------------ requests

    def resolve(self, ref: ModelRef) -> Servable:
        return self._resolve(ref)[0].servable

    def _resolve(self, ref: ModelRef) -> tuple[_Served, int]:
        if not ref.name:
            raise InvalidInput("Missing ModelSpec: the model name is empty")
        with self._lock:
            entry = self._entries.get(ref.name)
            versions = self._served.get(ref.name, {})
            version = ref.version
            if ref.label:
                if ref.version is not None:
                    raise InvalidInput("ModelSpec gives both a version and a version_label")
                if entry is None or ref.label not in entry.labels:
                    raise NotFound(f"Unrecognized servable version label: {ref.label}")
                version = entry.labels[ref.label]
            if version is None:
                if not versions:
                    raise NotFound(f"Servable not found for request: {ref}")
                version = max(versions)
            if version not in versions:
                raise NotFound(f"Servable not found for request: {ModelRef(ref.name, version)}")
            return versions[version], version

    def predict(
        self,
        ref: ModelRef,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
    ) -> Prediction:
        started = time.monotonic()
        served, version = self._resolve(ref)
        status = "OK"
        try:
            signature = served.servable.signature(signature_name)
            checked = served.servable.check_inputs(signature, inputs, output_filter)
            outputs = self._run(served, signature, checked)
            if output_filter:
                outputs = {alias: outputs[alias] for alias in output_filter}
            first = next(iter(checked.values()), None)
            if first is not None and first.ndim:
                served.series.items.inc(first.shape[0])
            return Prediction(ref.name, version, signature.name, outputs)
        except CbirError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            served.series.requests(status).inc()
            served.series.latency.observe(time.monotonic() - started)

    def _run(self, served: _Served, signature: Signature, inputs: Arrays) -> Arrays:
        batcher = served.batchers.get(signature.name)
        if batcher is None:
            return served.servable.run(signature, inputs)
        size = next(int(v.shape[0]) for v in inputs.values())
        return batcher.submit(inputs, size)

    def metadata(self, ref: ModelRef) -> tuple[Servable, int]:
        served, version = self._resolve(ref)
        return served.servable, version

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """GetModelStatus: every version known of ``name``, or just one."""
        with self._lock:
            if label:
                entry = self._entries.get(name)
                if entry is None or label not in entry.labels:
                    raise NotFound(f"Unrecognized servable version label: {label}")
                version = entry.labels[label]
            known = self._status.get(name, {})
            if not known:
                raise NotFound(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in known:
                    raise NotFound(f"Could not find version {version} of model {name}")
                return [known[version]]
            return [known[v] for v in sorted(known)]


def _runner(servable: Servable, signature: Signature) -> Callable[[Arrays], Arrays]:
    return lambda inputs: servable.run(signature, inputs)


def _load_error_text(exc: Exception) -> str:
    if isinstance(exc, tf.errors.OpError):
        return tf_error_message(exc)
    return f"{type(exc).__name__}: {exc}"
