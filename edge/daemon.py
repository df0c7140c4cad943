"""`edge-infer run --config FILE`: sources -> pre -> backend -> post -> outbox -> MQTT (DESIGN.md 3).

Threads, each with one job:
- a capture thread inside every Source keeps only its newest frame;
- a pump per source moves frames into one bounded frame queue (drop-oldest, counted per source), so
  several sources share one model session;
- the inference worker: pre-process, run, post-process, build the payload, store it in the outbox
  (which assigns `seq`), ping the systemd watchdog; it reads the active model once per frame, so a swap
  lands between two inferences and a prediction is never served by a half-loaded model;
- the Publisher drains the outbox to MQTT and acks on PUBACK.
Signal handlers only set an event; the main thread does the orderly stop.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import DaemonConfig, load_config
from edge.errors import BackendError, ConfigError, EdgeError, PackageError
from edge.health import Metrics, Notifier, StatsSnapshot
from edge.trust import TrustPolicy, check_model_path

log = logging.getLogger(__name__)

WORKER_POLL_S = 0.1  # the worker wakes this often even without frames, to ping the watchdog


@functools.lru_cache(maxsize=256)
def public_uri(uri: str) -> str:
    """A source uri fit for payloads, metrics and events: an RTSP password never leaves the device."""
    from edge.sources.camera import redact

    return redact(uri)


# ---------------------------------------------------------------------------------------------------------
# The bounded frame queue


class FrameQueue:
    """Frames from every source waiting for the one inference worker; when full the oldest is dropped
    (a fresh frame is worth more than a stale one) and the drop is counted against its source, except
    for lossless sources (files read at their reader's pace), whose put waits for room instead."""

    def __init__(self, maxsize: int):
        self._items: collections.deque[Any] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.dropped: dict[str, int] = collections.defaultdict(int)

    def put(self, frame: Any, wait_for_room: bool = False, stop: threading.Event | None = None) -> None:
        with self._cond:
            while wait_for_room and len(self._items) >= self._maxsize and not (stop and stop.is_set()):
                self._cond.wait(0.2)
            if len(self._items) >= self._maxsize:
                oldest = self._items.popleft()
                self.dropped[oldest.uri] += 1
            self._items.append(frame)
            self._cond.notify_all()

    def get(self, timeout: float) -> Any | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            frame = self._items.popleft()
            self._cond.notify_all()  # a lossless source may be waiting for this room
            return frame

    def discard_all(self) -> int:
        with self._cond:
            for frame in self._items:
                self.dropped[frame.uri] += 1
            count = len(self._items)
            self._items.clear()
            return count

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


# ---------------------------------------------------------------------------------------------------------
# A model ready to serve


class SensorPreprocessor:
    """(window, channels) float32 windows -> the model's input tensor (same element count, batch of one)."""

    def __init__(self, spec: Any):
        self.spec = spec
        self.shape = [int(d) if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        self.dtype = np.dtype(spec.dtype)

    def __call__(self, data: np.ndarray) -> tuple[np.ndarray, None]:
        layout = self.spec.layout
        if layout in ("NCT",) and data.ndim == 2:
            data = data.T
        if int(np.prod(self.shape)) != data.size:
            raise ValueError(
                f"a window of shape {data.shape} does not fit input '{self.spec.name}' {self.spec.shape}"
            )
        return np.ascontiguousarray(data.reshape(self.shape).astype(self.dtype, copy=False)), None


@dataclass
class ModelSession:
    """A loaded, verified, self-checked package with its pre- and post-processing."""

    package: Any
    loaded: Any
    postprocess: Any
    image_pre: Any | None
    sensor_pre: Any | None
    input_name: str
    artifact_sha256: str
    golden: dict[str, Any] | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def info(self) -> dict[str, str]:
        manifest = self.package.manifest
        return {"name": manifest.name, "version": manifest.version, "sha256": self.artifact_sha256}

    @property
    def backend_name(self) -> str:
        return str(self.loaded.backend.name)

    @property
    def provider(self) -> str:
        return str(self.loaded.provider)

    def preprocess(self, data: np.ndarray) -> tuple[np.ndarray, Any]:
        if data.dtype == np.uint8 and data.ndim in (2, 3) and self.image_pre is not None:
            return self.image_pre(data)
        if self.sensor_pre is None:
            raise ValueError(f"frame of shape {data.shape} does not fit the model's input")
        return self.sensor_pre(data)

    def infer(self, data: np.ndarray) -> tuple[dict[str, Any], dict[str, float]]:
        """One frame through the whole model; returns the payload's `result` and the stage timings."""
        t0 = time.perf_counter()
        tensor, geometry = self.preprocess(data)
        t1 = time.perf_counter()
        outputs = self.loaded.backend.run({self.input_name: tensor})
        t2 = time.perf_counter()
        result = self.postprocess(outputs, geometry)
        t3 = time.perf_counter()
        return result, {
            "preprocess": (t1 - t0) * 1e3,
            "inference": (t2 - t1) * 1e3,
            "postprocess": (t3 - t2) * 1e3,
        }

    def close(self) -> None:
        try:
            self.loaded.backend.close()
        except Exception:  # closing must never take the daemon down
            log.exception("closing model %s", self.info)


def _golden_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    return {"passed": bool(getattr(report, "passed", False))}


def open_session(
    package: Any,
    profile: Any,
    *,
    backend: str | None,
    threads: int | None,
    on_event: Any = None,
) -> ModelSession:
    """Load a verified package, golden-check and warm it up. Raises EdgeError subclasses."""
    from edge.backends import load_model
    from edge.processing.preprocess import ImagePreprocessor
    from edge.tasks import make_decoder

    loaded = load_model(package, profile, backend=backend, threads=threads, on_event=on_event)
    try:
        # load_model only returns a backend whose golden run passed; None means the package has none.
        report = loaded.golden
        if report is not None and not report.passed:
            raise BackendError(f"{package.root}: {report.summary()}")
        if report is None:
            log.warning("package %s has no golden data: served without a self-check", package.root)
        # The manifest's spec carries resize/colour/mean/std; the backend's own view of its inputs
        # only knows names, shapes and dtypes.
        spec = loaded.input_specs[0]
        image_pre = None
        if len(spec.shape) == 4 and (spec.layout or "NCHW") in ("NCHW", "NHWC"):
            image_pre = ImagePreprocessor.from_spec(spec)
        sensor_pre = None if image_pre is not None else SensorPreprocessor(spec)
        session = ModelSession(
            package=package,
            loaded=loaded,
            postprocess=make_decoder(package.manifest, package.labels()),
            image_pre=image_pre,
            sensor_pre=sensor_pre,
            input_name=spec.name,
            artifact_sha256=loaded.artifact.sha256,
            golden=_golden_dict(report),
        )
        # Warm-up: the first run allocates arenas and picks kernels; do it before READY, not on a frame.
        if image_pre is not None:
            session.infer(np.zeros((image_pre.height, image_pre.width, 3), np.uint8))
        elif sensor_pre is not None:
            loaded.backend.run({spec.name: np.zeros(sensor_pre.shape, sensor_pre.dtype)})
        return session
    except BaseException:
        loaded.backend.close()
        raise


# ---------------------------------------------------------------------------------------------------------
# The daemon


class Daemon:
    """Owns every thread. `start()` loads, connects and starts; `run()` blocks until a stop or the end of
    every file source, then stops in order; `request_stop()` may be called from anywhere (signals too)."""

    def __init__(self, config: DaemonConfig, *, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.sources_done = threading.Event()
        self.queue = FrameQueue(config.frame_queue)
        self.sources: list[Any] = []
        self.metrics: Metrics | None = None
        self.outbox: Any = None
        self.publisher: Any = None
        self.profile: Any = None
        self.trusted_keys: list[bytes] | None = None
        self.trust: TrustPolicy | None = None
        self.active: ModelSession | None = None
        self.previous: ModelSession | None = None
        self._swap_lock = threading.Lock()  # one reload at a time; the worker never takes it
        self._threads: list[threading.Thread] = []
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._worker_error: BaseException | None = None
        self._pumps_lock = threading.Lock()
        self._pumps_running = 0
        self._all_pumped = threading.Event()  # every source finished and its frames are in the queue
        self.predictions = 0
        self.inference_errors = 0
        self.started_at = time.monotonic()  # uptime, not a timestamp: immune to wall-clock jumps
        self.boot_id = str(uuid.uuid4())
        self._last_reconnects: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        from edge.profiles import resolve_profile
        from edge.publish.outbox import MemoryOutbox, Outbox
        from edge.signing import load_public_key
        from edge.sources import open_source

        config = self.config
        self.notifier.status("loading model")
        self.profile = resolve_profile(config.profile).profile
        self.trusted_keys = [load_public_key(key) for key in config.trusted_keys] or None
        self.trust = self._make_trust_policy()
        package = self._load_verified(config.model, None)
        self.active = self._open_session(package)
        if self.trust is not None:
            self.trust.accept(package)
        log.info(
            "model %s %s on %s/%s",
            self.active.info["name"],
            self.active.info["version"],
            self.active.backend_name,
            self.active.provider,
        )
        if config.outbox.enabled:
            self.outbox = Outbox(config.outbox.path, config.outbox.max_bytes, config.outbox.reserve_bytes)
        else:
            self.outbox = MemoryOutbox(config.outbox.max_bytes)  # logs that predictions can be lost
        self.publisher = self._make_publisher()
        if isinstance(self.outbox, MemoryOutbox):
            self.outbox.is_connected = lambda: self.publisher.connected
        self.publisher.set_status(self._status("online"))
        self.publisher.start()
        if config.metrics is not None and config.metrics.port is not None:
            self.metrics = Metrics(self.snapshot)
            port = self.metrics.serve(config.metrics.port, config.metrics.addr)
            log.info("metrics on http://%s:%d/metrics", config.metrics.addr, port)
        for source_config in config.all_sources:
            source = open_source(source_config)
            self.sources.append(source)
        self._worker = threading.Thread(target=self._work, name="inference", daemon=True)
        self._worker.start()
        self._pumps_running = len(self.sources)
        for source in self.sources:
            source.start()
            pump = threading.Thread(target=self._pump, args=(source,), name=f"pump {source.uri}", daemon=True)
            pump.start()
            self._threads.append(pump)
        self.notifier.ready(self._status_line())

    def _make_trust_policy(self) -> TrustPolicy:
        """Signature and anti-rollback policy (edge.trust); its state lives beside the outbox."""
        from edge.trust import TrustPolicy

        return TrustPolicy(self.trusted_keys or [], self.config.outbox.path.parent, self.config.models_dir)

    def _make_publisher(self) -> Any:
        from edge.publish.mqtt import Publisher

        handlers = {
            "reload": lambda args: self.reload(args.get("path")),
            "selfcheck": lambda args: self.selfcheck(),
            "stats": lambda args: {"stats": self.stats()},
        }
        return Publisher(self.config.mqtt, self.config.device_id, self.outbox, handlers)

    def run(self) -> int:
        """Block until stopped (signal, command) or every source finished; then stop in order."""
        try:
            while not self.stop_event.wait(0.5):
                self._watch_sources()
                if self.config.exit_on_source_end and self.sources_done.is_set():
                    log.info("every source finished; stopping")
                    break
            if self._worker_error is not None:
                raise self._worker_error
        finally:
            self.shutdown()
        return 0

    def request_stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        """Stop sources, finish the in-flight inference, flush the outbox while connected, go offline."""
        self.notifier.stopping("stopping: flushing outbox")
        for source in self.sources:
            try:
                source.stop()
            except Exception:
                log.exception("stopping source %s", source.uri)
        self._worker_stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        left = self.queue.discard_all()
        if left:
            log.info("dropped %d queued frame(s) on stop", left)
        for thread in self._threads:
            thread.join(timeout=5)
        if self.publisher is not None:
            deadline = time.monotonic() + self.config.flush_timeout_s
            while (
                self.outbox.depth > 0 and self.publisher.connected and time.monotonic() < deadline
            ):  # unsent predictions stay in the outbox for the next start; waiting only helps if connected
                time.sleep(0.02)
            if self.outbox.depth:
                log.info("%d prediction(s) kept in the outbox for the next start", self.outbox.depth)
            self.publisher.stop(flush_timeout=max(0.5, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.close()
        if self.outbox is not None:
            self.outbox.close()
        for session in (self.active, self.previous):
            if session is not None:
                session.close()
        self.notifier.close()

    # -- threads -------------------------------------------------------------------------------------------

    def _pump(self, source: Any) -> None:
        lossless = bool(getattr(source, "lossless", False))
        while not self._worker_stop.is_set():
            frame = source.read(0.2)
            if frame is not None:
                self.queue.put(frame, wait_for_room=lossless, stop=self._worker_stop)
            elif source.finished:
                # The last frame may have landed between the timed-out read and `finished` turning true.
                last = source.read(0)
                if last is not None:
                    self.queue.put(last, wait_for_room=lossless, stop=self._worker_stop)
                break
        with self._pumps_lock:
            self._pumps_running -= 1
            if self._pumps_running == 0 and all(s.finished for s in self.sources):
                self._all_pumped.set()

    def _work(self) -> None:
        try:
            while not self._worker_stop.is_set():
                self.notifier.watchdog()
                frame = self.queue.get(WORKER_POLL_S)
                if frame is not None:
                    self._infer_one(frame)
                elif self._all_pumped.is_set() and len(self.queue) == 0:
                    self.sources_done.set()
        except BaseException as exc:  # a worker crash must stop the daemon, not hang it
            log.exception("inference worker failed")
            self._worker_error = exc
            self.stop_event.set()

    def _infer_one(self, frame: Any) -> None:
        from edge.publish.payload import build_prediction

        session = self.active  # read once: the whole frame is served by one model
        assert session is not None
        try:
            result, timings = session.infer(frame.data)
        except Exception as exc:  # a bad frame must not stop the stream; count and go on
            self.inference_errors += 1
            log.warning("frame %d from %s: %s", frame.index, public_uri(frame.uri), exc)
            return
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(timings["inference"] / 1e3)
        timings["capture_to_publish"] = (time.monotonic() - frame.captured_mono) * 1e3
        payload = build_prediction(
            device_id=self.config.device_id,
            boot_id=self.boot_id,
            ts=time.time(),
            source={"uri": public_uri(frame.uri), "frame": frame.index, "captured_at": frame.captured_at},
            model=session.info,
            runtime={"backend": session.backend_name, "provider": session.provider},
            latency_ms=timings,
            result=result,
        )
        self.outbox.add(payload)
        self.publisher.notify()
        self.predictions += 1
        if self.metrics is not None:
            self.metrics.capture_to_publish_seconds.observe(time.monotonic() - frame.captured_mono)

    def _watch_sources(self) -> None:
        for source in self.sources:
            reconnects = int(source.stats.get("reconnects", 0))
            if reconnects > self._last_reconnects.get(source.uri, 0):
                self._last_reconnects[source.uri] = reconnects
                self.publisher.publish_event(
                    "source_reconnected", {"uri": source.uri, "reconnects": reconnects}
                )

    # -- models ----------------------------------------------------------------------------------------------

    def _load_verified(self, path: Path, current: ModelSession | None) -> Any:
        """The package at `path`, hashes and signature verified, and not older than what we accepted."""
        from edge.package import load_package

        package = load_package(path, trusted_keys=self.trusted_keys)
        if self.trust is not None:
            self.trust.check(package, current.package.manifest if current is not None else None)
        return package

    def _open_session(self, package: Any) -> ModelSession:
        return open_session(
            package,
            self.profile,
            backend=self.config.backend,
            threads=self.config.threads,
            on_event=self._on_backend_event,
        )

    def _on_backend_event(self, name: str, data: dict[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish_event(name, data)
        else:
            log.warning("backend event %s: %s", name, data)

    def resolve_reload_path(self, raw: Any) -> Path:
        """A reload target must be a directory inside the models directory (the configured model's parent)."""
        if raw is None:
            return self.config.model
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise ConfigError("reload: `path` must be a non-empty string")
        try:
            return check_model_path(raw, self.config.models_dir)
        except PackageError as exc:
            raise ConfigError(f"reload: {exc}") from exc

    def reload(self, raw_path: Any) -> dict[str, Any]:
        """Load a package beside the running one, check it, swap between two inferences; keep the old one
        until the next swap (rollback target). Any failure leaves the old model serving."""
        with self._swap_lock:
            old = self.active
            assert old is not None
            try:
                path = self.resolve_reload_path(raw_path)
                package = self._load_verified(path, old)
                new = self._open_session(package)
            except EdgeError as exc:
                data = {"path": str(raw_path), "error": str(exc), "serving": old.info}
                log.warning("model swap failed, still serving %s: %s", old.info["version"], exc)
                self.publisher.publish_event("model_swap_failed", data)
                raise

            # The worker reads `self.active` once per frame: this assignment lands between two inferences.
            retired, self.previous, self.active = self.previous, old, new
            if self.trust is not None:
                self.trust.accept(package)
            self._persist_choice(path)
            if retired is not None:
                retired.close()
            data = {"from": old.info, "to": new.info, "path": str(path), "provider": new.provider}
            log.info("model swapped: %s -> %s", old.info["version"], new.info["version"])
            self.publisher.set_status(self._status("online"))
            self.publisher.publish_event("model_swapped", data)
            self.notifier.status(self._status_line())
            return {**data, "golden": new.golden}

    def _persist_choice(self, path: Path) -> None:
        """Point the configured `model` symlink at the package now serving, so a restart loads it too (and
        is not refused by the anti-rollback floor). Atomic: a new link renamed over the old one."""
        link = self.config.model
        if not link.is_symlink():
            if path.resolve() != link.resolve():
                log.warning("%s is not a symlink: a restart will load it, not %s", link, path)
            return
        if path.resolve() == link.resolve():
            return
        target = os.path.relpath(path.resolve(), link.parent.resolve())
        staging = link.with_name(f".{link.name}.{os.getpid()}.new")
        try:
            staging.unlink(missing_ok=True)
            os.symlink(target, staging, target_is_directory=True)
            os.replace(staging, link)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            log.error("cannot repoint %s at %s: %s; a restart will load the old package", link, path, exc)

    def selfcheck(self) -> dict[str, Any]:
        session = self.active
        assert session is not None
        report = session.loaded.self_check()
        return {"passed": bool(report.passed), "model": session.info, "golden": _golden_dict(report)}

    # -- commands, status, stats -------------------------------------------------------------------------------

    def _status(self, state: str) -> dict[str, Any]:
        from edge import __version__

        session = self.active
        status: dict[str, Any] = {"state": state, "device_id": self.config.device_id, "versions": {}}
        status["versions"]["edge"] = __version__
        try:
            import onnxruntime

            status["versions"]["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
        if session is not None:
            status["model"] = session.info
            status["runtime"] = {"backend": session.backend_name, "provider": session.provider}
        if self.profile is not None:
            status["profile"] = self.profile.name
        return status

    def _status_line(self) -> str:
        session = self.active
        if session is None:
            return "starting"
        return (
            f"serving {session.info['name']} {session.info['version']} on {session.provider}, "
            f"{len(self.sources)} source(s)"
        )

    def snapshot(self) -> StatsSnapshot:
        session = self.active
        pub_stats = dict(getattr(self.publisher, "stats", {}) or {}) if self.publisher else {}
        return StatsSnapshot(
            sources={public_uri(s.uri): dict(s.stats) for s in self.sources},
            queue_dropped={public_uri(uri): count for uri, count in self.queue.dropped.items()},
            outbox_depth=int(self.outbox.depth) if self.outbox else 0,
            outbox_dropped=int(self.outbox.dropped) if self.outbox else 0,
            outbox_disk_full=int(self.outbox.disk_full) if self.outbox else 0,
            mqtt_connected=bool(self.publisher.connected) if self.publisher else False,
            mqtt_reconnects=int(pub_stats.get("reconnects", 0)),
            predictions_published=int(pub_stats.get("acked", 0)),
            predictions_made=self.predictions,
            backend=session.backend_name if session else "",
            provider=session.provider if session else "",
            model_name=session.info["name"] if session else "",
            model_version=session.info["version"] if session else "",
            model_sha256=session.info["sha256"] if session else "",
        )

    def stats(self) -> dict[str, Any]:
        snap = self.snapshot()
        return {
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "predictions": snap.predictions_made,
            "inference_errors": self.inference_errors,
            "sources": {
                uri: {**stats, "queue_dropped": snap.queue_dropped.get(uri, 0)}
                for uri, stats in snap.sources.items()
            },
            "outbox": {
                "depth": snap.outbox_depth,
                "dropped": snap.outbox_dropped,
                "disk_full": snap.outbox_disk_full,
            },
            "mqtt": {"connected": snap.mqtt_connected, **dict(getattr(self.publisher, "stats", {}) or {})},
            "model": self.active.info if self.active else None,
            "previous_model": self.previous.info if self.previous else None,
            "runtime": {"backend": snap.backend, "provider": snap.provider},
        }


# ---------------------------------------------------------------------------------------------------------
# `edge-infer run`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, help="the daemon's YAML config")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    daemon = Daemon(config)

    def on_signal(signum: int, frame: Any) -> None:
        daemon.request_stop()  # only a flag: the main thread does the orderly stop

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        daemon.start()
    except (EdgeError, OSError) as exc:
        daemon.shutdown()
        if isinstance(exc, EdgeError):
            raise
        raise PackageError(f"cannot start: {exc}") from exc
    return daemon.run()
