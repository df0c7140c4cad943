"""`edge-infer run --config FILE`: sources -> pre -> backend -> post -> outbox -> MQTT.

Threads, each with one job:
- a capture thread inside every Source keeps only its newest frame;
- a pump per source moves frames into one bounded frame queue (drop-oldest, counted per source), so
  several sources share one model session;
- the inference worker: pre-process, run, post-process, build the payload, store it in the outbox
  (which assigns `seq`), ping the systemd watchdog; it reads the active model once per frame, so a swap
  lands between two inferences and a prediction is never served by a half-loaded model;
- the Publisher drains the outbox to MQTT and acks on PUBACK.
Signal handlers only set an event; the main thread does the orderly stop.

`Daemon.from_config(config)` builds the parts (profile, trust policy, sources, outbox, publisher);
`Daemon(...)` receives them typed by the Protocols below, so a test can run the worker with a memory
outbox and a publisher that sends nothing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge.arrays import Array
from edge.backends import fallback_counts
from edge.config import DaemonConfig, HealthConfig, MetricsConfig, load_config
from edge.errors import BackendError, ConfigError, EdgeError, PackageError
from edge.health import HealthProbes, HttpEndpoint, Metrics, Notifier, Probe, StatsSnapshot
from edge.jsontypes import JSONObject, JSONValue
from edge.package import Package, is_archive, unpack_into
from edge.profiles import DeviceProfile
from edge.publish.commands import CommandHandler, ReplyRoute
from edge.publish.requests import InferRequest, RateLimiter, RequestRejected, infer_topic, tensors_for
from edge.publish.sequences import SequenceError, SequenceFlags, SequenceTable, StreamTurns
from edge.session import ModelSession, StageTimings, open_session
from edge.sources import Frame, Source

if TYPE_CHECKING:
    from edge.detect.events import Message
    from edge.detect.service import ObjectService
    from edge.serve_http import HttpServer
from edge.trust import TrustPolicy, check_model_path

log = logging.getLogger(__name__)

EVENTS_OUTBOX = "events.db"  # beside the outbox: object events, durable, with a seq of their own
REQUEST_URI = "mqtt:infer"  # the payload's source.uri for predictions made on request
STATUS_STATS_S = 10.0  # how often the retained status refreshes its fps/latency (Home Assistant sensors)
WORKER_POLL_S = 0.1  # the worker wakes this often even without frames, to ping the watchdog
# /healthz/live fails when the worker has not come round its loop for this long (a hung backend).
WORKER_STALL_S = 30.0


# ---------------------------------------------------------------------------------------------------------
# The bounded frame queue


class Answer(Protocol):
    """Where a request's prediction goes (an MQTT response topic, an HTTP response)."""

    def deliver(self, payload: JSONObject, outputs: list[Array]) -> None: ...  # outputs: tensor requests

    def fail(self, message: str, field: str) -> None: ...


@dataclass
class Turn:
    """A job's place among its stream's runs, given as it leaves the queue (stateful models only)."""

    number: int | None = None


@dataclass(frozen=True)
class Job:
    """One item for the inference worker: a source's frame, or a request with where its answer goes
    (`feeds`: a tensor request's ready inputs, served without pre-processing; `tag`: the payload's
    `request` object; `stream`: whose recurrent state a request continues, None: its source's;
    `start`: that state starts over at this job)."""

    frame: Frame
    answer: Answer | None = None
    feeds: Mapping[str, Array] | None = None
    tag: JSONObject | None = None
    stream: str | None = None
    start: bool = False
    turn: Turn = dataclasses.field(default_factory=Turn, compare=False, repr=False)

    @property
    def state_stream(self) -> str:
        return self.stream if self.stream is not None else self.frame.uri

    @property
    def droppable(self) -> bool:
        return self.answer is None  # a request is answered, never silently replaced by a newer frame


class FrameQueue:
    """Jobs from every source and request waiting for the one inference worker. When full, a live
    source's new frame replaces the oldest frame (a fresh frame is worth more than a stale one; the drop
    is counted against its source); lossless sources (files read at their reader's pace) and requests
    wait for room instead, and are never the ones dropped."""

    def __init__(self, maxsize: int):
        self._items: collections.deque[Job] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.dropped: dict[str, int] = collections.defaultdict(int)
        # Told of each job as it leaves, under the queue's lock: so in the order jobs were queued, which
        # racing workers would otherwise lose (tracked objects need their source's frames in order).
        self.on_take: Callable[[Job], None] | None = None

    def _take(self) -> Job:
        job = self._items.popleft()
        if self.on_take is not None:
            self.on_take(job)
        return job

    def put(self, job: Job | Frame, wait_for_room: bool = False, stop: threading.Event | None = None) -> None:
        job = job if isinstance(job, Job) else Job(job)
        with self._cond:
            while wait_for_room and len(self._items) >= self._maxsize and not (stop and stop.is_set()):
                self._cond.wait(0.2)
            if len(self._items) >= self._maxsize and not wait_for_room:
                oldest = next((item for item in self._items if item.droppable), None)
                if oldest is None:  # everything queued is a request: this frame is the one to go
                    self.dropped[job.frame.uri] += 1
                    return
                self._items.remove(oldest)
                self.dropped[oldest.frame.uri] += 1
            self._items.append(job)
            self._cond.notify_all()

    def get(self, timeout: float) -> Job | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            job = self._take()
            self._cond.notify_all()  # a lossless source may be waiting for this room
            return job

    def get_batch(self, max_size: int, timeout: float, max_delay_s: float) -> list[Job]:
        """Up to `max_size` jobs: waits `timeout` for the first, then at most `max_delay_s` more for
        the rest (Triton's max_queue_delay, DeepStream's batched-push-timeout); [] when none came."""
        first = self.get(timeout)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + max_delay_s
        with self._cond:
            while len(batch) < max_size:
                if not self._items:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    continue
                batch.append(self._take())
            self._cond.notify_all()  # lossless sources may be waiting for this room
        return batch

    def discard_all(self) -> list[Job]:
        with self._cond:
            for job in self._items:
                self.dropped[job.frame.uri] += 1
            left = list(self._items)
            self._items.clear()
            return left

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class _Countdown:
    """Calls `done` once `count` parts have called `one_done` (a request's acknowledgement after its
    last answer)."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left = count
        self._done = done
        self._lock = threading.Lock()

    def one_done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._done()


class MqttAnswer:
    """A request's answer over MQTT: the prediction payload to its reply route, or `{"error", "field"}`."""

    def __init__(self, publisher: PredictionPublisher, request: InferRequest, topic: str) -> None:
        self.publisher = publisher
        self.request = request
        self.topic = topic

    def deliver(self, payload: JSONObject, outputs: list[Array]) -> None:
        self.publisher.reply(self.request.reply, json.dumps(payload, separators=(",", ":")).encode())
        self.request.acknowledge()

    def fail(self, message: str, field: str) -> None:
        request = self.request
        self.publisher.reject(
            RequestRejected(f"{self.topic}: {message}", field, request.reply, request.correlation_id)
        )
        request.acknowledge()


# ---------------------------------------------------------------------------------------------------------
# The daemon


class PredictionOutbox(Protocol):
    """Where the worker stores predictions before MQTT has them: the SQLite `Outbox` or `MemoryOutbox`."""

    disk_full: int

    @property
    def depth(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def storing(self) -> bool: ...  # False while a full disk keeps new predictions out

    def add(self, payload: JSONObject, topic: str | None = None, qos: int | None = None) -> int: ...

    def close(self) -> None: ...


class PredictionPublisher(Protocol):
    """What the daemon needs from the MQTT side (`edge.publish.mqtt.Publisher`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def stats(self) -> Mapping[str, object]: ...

    @property
    def connect_failures(self) -> Mapping[str, int]: ...  # failed connection attempts by reason

    def start(self) -> None: ...

    def stop(self, flush_timeout: float = 5.0) -> None: ...

    def notify(self) -> None: ...

    def set_status(self, status: JSONObject) -> None: ...

    def publish_event(self, name: str, data: JSONObject | None = None) -> None: ...

    def publish_retained(self, topic: str, payload: bytes) -> None: ...  # object counts, snapshots, discovery

    def publish_message(self, topic: str, payload: bytes) -> None: ...  # object events

    def reply(self, route: ReplyRoute, body: bytes) -> None: ...  # a request's answer

    def reject(self, rejected: RequestRejected) -> None: ...  # a request's error answer


def _count(stats: Mapping[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


class Daemon:
    """Owns every thread. `start()` loads, connects and starts; `run()` blocks until a stop or the end of
    every file source, then stops in order; `request_stop()` may be called from anywhere (signals too)."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        profile: DeviceProfile,
        trust: TrustPolicy,
        sources: list[Source],
        outbox: PredictionOutbox,
        publisher: PredictionPublisher,
        metrics: MetricsConfig | None = None,
        health: HealthConfig | None = None,
        notifier: Notifier | None = None,
        events_outbox: PredictionOutbox | None = None,
    ):
        self.config = config
        self.profile = profile
        self.trust = trust
        self.sources = sources
        self.outbox = outbox
        self.events_outbox = events_outbox  # object events (with tracking); None: sent at QoS 1 only
        self.publisher = publisher
        self.notifier = notifier or Notifier()
        self.metrics_config = metrics
        self.health_config = health
        self.metrics: Metrics | None = None
        self._health_endpoint: HttpEndpoint | None = None
        self._http: HttpServer | None = None
        self._objects: ObjectService | None = None
        self._worker_beats: list[float] = []  # monotonic time of each worker's last loop
        self.stop_event = threading.Event()
        self.sources_done = threading.Event()
        self.queue = FrameQueue(config.frame_queue)
        self.active: ModelSession | None = None
        self.previous: ModelSession | None = None
        self._swap_lock = threading.Lock()  # one reload at a time; the worker never takes it
        self._threads: list[threading.Thread] = []
        self._workers: list[threading.Thread] = []
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
        self._infer_topic = infer_topic(config.mqtt.topic_prefix, config.device_id)
        self._rate_limiter = RateLimiter(config.requests.rate_per_s, config.requests.burst)
        self._request_lock = threading.Lock()
        self._requests_served = 0
        self._turns = StreamTurns()
        self._sequences = SequenceTable(
            config.requests.sequence_idle_s, config.requests.max_sequences, self._forget_stream
        )

    @classmethod
    def from_config(cls, config: DaemonConfig, *, notifier: Notifier | None = None) -> Daemon:
        """The real parts for a config: the device profile, the trust policy (its state lives beside the
        outbox), every source (opened, not started), the outbox and the MQTT publisher."""
        from edge.profiles import resolve_profile
        from edge.publish.mqtt import Publisher
        from edge.publish.outbox import MemoryOutbox, Outbox
        from edge.signing import load_public_key
        from edge.sources import open_source

        profile = resolve_profile(config.profile).profile
        trusted_keys = [load_public_key(key) for key in config.trusted_keys]
        trust = TrustPolicy(trusted_keys, config.outbox.path.parent)
        sources = [open_source(source_config) for source_config in config.all_sources]
        outbox: Outbox | MemoryOutbox
        events: Outbox | MemoryOutbox | None = None
        tracks = config.tracking.enabled or config.snapshots.enabled or config.homeassistant.enabled
        if config.outbox.enabled:
            outbox = Outbox(config.outbox.path, config.outbox.max_bytes, config.outbox.reserve_bytes)
            if tracks:  # object events: durable like predictions, with a seq of their own
                events = Outbox(
                    config.outbox.path.with_name(EVENTS_OUTBOX), max(4096, config.outbox.max_bytes // 4), 0
                )
        else:
            outbox = MemoryOutbox(config.outbox.max_bytes)  # logs that predictions can be lost
            events = MemoryOutbox(max(4096, config.outbox.max_bytes // 4)) if tracks else None
        handlers: dict[str, CommandHandler] = {}  # filled below: the handlers are the daemon's methods
        requests: list[Callable[[InferRequest], None]] = []  # the daemon's handler, bound below
        publisher = Publisher(
            config.mqtt,
            config.device_id,
            outbox,
            handlers,
            on_request=(lambda request: requests[0](request))
            if config.requests.enabled or config.pool is not None
            else None,
            request_max_bytes=config.requests.max_bytes,
            pool=config.pool.name if config.pool is not None else None,
            side_outboxes=[events] if events is not None else [],
        )
        for memory in (outbox, events):
            if isinstance(memory, MemoryOutbox):
                memory.is_connected = lambda: publisher.connected
        daemon = cls(
            config,
            profile=profile,
            trust=trust,
            sources=sources,
            outbox=outbox,
            publisher=publisher,
            metrics=config.metrics,
            health=config.health,
            notifier=notifier,
            events_outbox=events,
        )
        handlers.update(daemon.command_handlers())
        requests.append(daemon.on_request)
        return daemon

    def command_handlers(self) -> dict[str, CommandHandler]:
        """`cmd/{name}` -> handler; each takes the command's JSON arguments and returns the reply body."""
        return {
            "reload": lambda args: self.reload(args.get("path")),
            "rollback": lambda args: self.rollback(),
            "selfcheck": lambda args: self.selfcheck(),
            "stats": lambda args: {"stats": self.stats()},
        }

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._serve_http()  # first, so /healthz/ready answers 503 "model not loaded" while it loads
        self.notifier.status("loading model")
        package = self._load_verified(self.config.model, None)
        self.active = self._open_session(package)
        self.trust.accept(package)
        log.info(
            "model %s %s on %s/%s",
            self.active.info["name"],
            self.active.info["version"],
            self.active.backend_name,
            self.active.provider,
        )
        self._objects = self._object_service(self.active)
        self.queue.on_take = self._taken
        self.publisher.set_status(self._status("online"))
        self.publisher.start()
        info = self.active.info
        if self._objects is not None:
            self._send(self._objects.startup_messages(info["name"], info["version"]))
        self._announce(self._objects.discovery(info["name"], info["version"]) if self._objects else [])
        if self.config.http is not None:
            from edge.serve_http import HttpServer

            self._http = HttpServer(self.config.http, self)
            self._http.start()
        count = self.workers
        self._worker_beats = [time.monotonic()] * count
        self._workers = [
            threading.Thread(
                target=self._work, args=(i,), name=f"inference-{i}" if count > 1 else "inference", daemon=True
            )
            for i in range(count)
        ]
        for worker in self._workers:
            worker.start()
        self._pumps_running = len(self.sources)
        for source in self.sources:
            source.start()
            pump = threading.Thread(target=self._pump, args=(source,), name=f"pump {source.uri}", daemon=True)
            pump.start()
            self._threads.append(pump)
        self.notifier.ready(self._status_line())

    def _serve_http(self) -> None:
        probes = HealthProbes(live=self.liveness, ready=self.readiness)
        if self.metrics_config is not None and self.metrics_config.port is not None:
            self.metrics = Metrics(self.snapshot)
            port = self.metrics.serve(self.metrics_config.port, self.metrics_config.addr, probes)
            log.info("metrics on http://%s:%d/metrics", self.metrics_config.addr, port)
        if self.health_config is not None:
            self._health_endpoint = HttpEndpoint(None, probes)
            port = self._health_endpoint.serve(self.health_config.port, self.health_config.addr)
            log.info("health probes on http://%s:%d/healthz/ready", self.health_config.addr, port)

    @property
    def health_port(self) -> int | None:
        return self._health_endpoint.port if self._health_endpoint is not None else None

    def liveness(self) -> Probe:
        """Alive: every inference worker is coming round its loop (a hung backend stops it)."""
        stalled = time.monotonic() - min(self._worker_beats, default=0.0)
        alive = bool(self._workers) and all(w.is_alive() for w in self._workers) and stalled < WORKER_STALL_S
        reason = "" if alive else self._worker_problem(stalled)
        return Probe({"worker": alive}, reason)

    def readiness(self) -> Probe:
        """Ready: a model is loaded and passed its self-check, the worker is alive, the outbox stores."""
        session = self.active
        golden = session.golden if session is not None else None
        worker = self.liveness()
        checks = {
            "model_loaded": session is not None,
            "selfcheck_passed": session is not None and (golden is None or golden.passed),
            "worker_alive": worker.ok,
            "outbox_writable": self.outbox.storing,
        }
        reasons = {
            "model_loaded": "no model loaded yet",
            "selfcheck_passed": "the model's golden self-check failed",
            "worker_alive": worker.reason,
            "outbox_writable": "the outbox cannot store predictions (disk full)",
        }
        failing = next((name for name, ok in checks.items() if not ok), None)
        return Probe(checks, reasons[failing] if failing else "")

    def _worker_problem(self, stalled: float) -> str:
        if not self._workers:
            return "the inference worker has not started"
        if not all(worker.is_alive() for worker in self._workers):
            return f"the inference worker stopped: {self._worker_error!r}"
        return f"the inference worker has not looped for {stalled:.0f} s (hung backend?)"

    def run(self) -> int:
        """Block until stopped (signal, command) or every source finished; then stop in order."""
        try:
            stats_due = time.monotonic()
            while not self.stop_event.wait(0.5):
                self._watch_sources()
                if (
                    self._objects is not None
                    and self.config.homeassistant.enabled
                    and time.monotonic() >= stats_due
                ):
                    stats_due = time.monotonic() + STATUS_STATS_S  # Home Assistant's fps/latency sensors
                    self.publisher.set_status(self._status("online"))
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
        if self._http is not None:
            self._http.close()  # no new requests; those queued are answered or told below
        for source in self.sources:
            try:
                source.stop()
            except Exception:
                log.exception("stopping source %s", source.uri)
        self._worker_stop.set()
        for worker in self._workers:
            worker.join(timeout=30)
        left = self.queue.discard_all()
        for job in left:
            if job.answer is not None:
                job.answer.fail("the daemon is stopping", "payload")
        if left:
            log.info("dropped %d queued frame(s) and request(s) on stop", len(left))
        for thread in self._threads:
            thread.join(timeout=5)
        if self._objects is not None:
            self._send(self._objects.close())  # every object ends; counts back to 0
        deadline = time.monotonic() + self.config.flush_timeout_s
        queues = [self.outbox] + ([self.events_outbox] if self.events_outbox is not None else [])
        while (
            any(queue.depth > 0 for queue in queues)
            and self.publisher.connected
            and time.monotonic() < deadline
        ):  # unsent messages stay in their outbox for the next start; waiting only helps if connected
            time.sleep(0.02)
        if self.outbox.depth:
            log.info("%d prediction(s) kept in the outbox for the next start", self.outbox.depth)
        self.publisher.stop(flush_timeout=max(0.5, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.close()
        if self._health_endpoint is not None:
            self._health_endpoint.close()
        self.outbox.close()
        if self.events_outbox is not None:
            self.events_outbox.close()
        for session in (self.active, self.previous):
            if session is not None:
                session.close()
        self.notifier.close()

    # -- threads -------------------------------------------------------------------------------------------

    def _pump(self, source: Source) -> None:
        lossless = source.lossless
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

    def _work(self, number: int = 0) -> None:
        try:
            while not self._worker_stop.is_set():
                self._worker_beats[number] = time.monotonic()
                self.notifier.watchdog()
                batching = self.config.batching
                if batching is None:
                    job = self.queue.get(WORKER_POLL_S)
                    jobs = [job] if job is not None else []
                else:
                    jobs = self.queue.get_batch(batching.max_size, WORKER_POLL_S, batching.max_delay_ms / 1e3)
                if jobs:
                    self._infer(jobs)
                elif self._all_pumped.is_set() and len(self.queue) == 0:
                    self.sources_done.set()
        except BaseException as exc:  # a worker crash must stop the daemon, not hang it
            log.exception("inference worker failed")
            self._worker_error = exc
            self.stop_event.set()

    def _infer(self, jobs: list[Job]) -> None:
        session = self.active  # read once: the whole batch is served by one model
        assert session is not None
        if session.stateful or any(job.turn.number is not None for job in jobs):
            for job in jobs:  # one by one, in the order taken: each continues its stream's state
                self._infer_in_turn(session, job)
            return
        tensors = [job for job in jobs if job.feeds is not None]
        batched = [job for job in jobs if job.feeds is None]
        for job in tensors:
            assert job.feeds is not None
            try:
                outputs, result, timings = session.run_feeds(job.feeds)
            except Exception as exc:
                self._failed(job, exc)
                continue
            self._publish(session, job, result, timings, 1, outputs)
        if not batched:
            return
        try:
            served = session.infer_batch([job.frame.data for job in batched])
        except Exception as exc:
            if len(batched) == 1:  # a bad frame must not stop the stream; count and go on
                self._failed(batched[0], exc)
                return
            # one bad frame must not cost the others their predictions: serve them one by one
            for job in batched:
                self._infer([job])
            return
        for job, (result, timings) in zip(batched, served, strict=True):
            self._publish(session, job, result, timings, len(batched))

    def _infer_in_turn(self, session: ModelSession, job: Job) -> None:
        """One job of a stateful model, after every earlier job of its stream (another worker may hold
        those). A new session (a model swap) starts every stream with no state."""
        stream = job.state_stream
        number = job.turn.number
        if number is not None:
            self._turns.wait(stream, number)
        try:
            if job.start or job.frame.restart:
                session.reset_state(stream)
            try:
                if job.feeds is not None:
                    outputs, result, timings = session.run_feeds(job.feeds, stream)
                else:
                    result, timings = session.infer(job.frame.data, stream=stream)
                    outputs = None
            except Exception as exc:
                self._failed(job, exc)
                return
            finally:
                if job.stream is not None and not self._sequences.is_open(stream):
                    session.reset_state(stream)  # a one-off request, or its sequence ended or expired
            self._publish(session, job, result, timings, 1, outputs)
        finally:
            if number is not None:
                self._turns.done(stream, number)

    def _forget_stream(self, stream: str) -> None:
        session = self.active
        if session is not None:
            session.reset_state(stream)

    def _taken(self, job: Job) -> None:
        """Told of each job as it leaves the queue, in queue order."""
        session = self.active
        if session is not None and session.stateful:
            job.turn.number = self._turns.issue(job.state_stream)
        if self._objects is not None and job.answer is None:
            self._objects.taken(job.frame.uri, job.frame.index)

    def _failed(self, job: Job, exc: Exception) -> None:
        if self._objects is not None and job.answer is None:
            self._objects.skip(job.frame.uri, job.frame.index)
        self.inference_errors += 1
        log.warning("frame %d from %s: %s", job.frame.index, job.frame.uri, exc)
        if job.answer is not None:
            job.answer.fail(str(exc), "inputs" if job.feeds is not None else "payload")

    def _publish(
        self,
        session: ModelSession,
        job: Job,
        result: JSONObject,
        timings: StageTimings,
        batch: int,
        outputs: list[Array] | None = None,
    ) -> None:
        from edge.publish.payload import build_prediction

        frame = job.frame
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(timings.inference / 1e3)
        latency_ms = timings.to_dict()
        latency_ms["capture_to_publish"] = (time.monotonic() - frame.captured_mono) * 1e3
        runtime: JSONObject = {"backend": session.backend_name, "provider": session.provider}
        if batch > 1:
            runtime["batch"] = batch
        objects = self._objects
        if objects is not None and job.answer is None:
            # before the payload is built: the detections get their track ids
            self._send(objects.process(frame.uri, result, frame.captured_at, frame.data, frame.index))
            objects.observe(timings.inference)
        payload = build_prediction(
            device_id=self.config.device_id,
            boot_id=self.boot_id,
            ts=time.time(),
            source={"uri": frame.uri, "frame": frame.index, "captured_at": frame.captured_at},
            model=session.info,
            runtime=runtime,
            latency_ms=latency_ms,
            result=result,
        )
        if job.tag is not None:
            payload["request"] = job.tag
        self.outbox.add(payload)  # assigns seq: the answer and the stored prediction are the same message
        self.publisher.notify()
        if job.answer is not None:
            job.answer.deliver(payload, outputs or [])
        self.predictions += 1
        if self.metrics is not None:
            self.metrics.capture_to_publish_seconds.observe(time.monotonic() - frame.captured_mono)

    # -- tracked objects ----------------------------------------------------------------------------------------

    def _object_service(self, session: ModelSession) -> ObjectService | None:
        """Tracking for a detection model when the config asks for it (or for what needs it: Home
        Assistant's entities, snapshots)."""
        config = self.config
        wanted = config.tracking.enabled or config.snapshots.enabled or config.homeassistant.enabled
        if not wanted or session.package.manifest.task != "detection":
            if wanted:
                log.warning(
                    "tracking: %s is not a detection model; no objects are tracked", session.info["name"]
                )
            return None
        from edge.detect.service import ObjectService, ObjectSource

        sources = [
            ObjectSource(source.uri, getattr(cfg, "name", None), dict(getattr(cfg, "zones", {}) or {}))
            for source, cfg in zip(self.sources, config.all_sources, strict=True)
        ]
        labels = config.homeassistant.labels or list(session.package.labels() or [])
        return ObjectService(
            config.tracking,
            config.snapshots,
            config.homeassistant,
            topic_prefix=config.mqtt.topic_prefix,
            device_id=config.device_id,
            sources=sources,
            labels=labels,
        )

    def _announce(self, discovery: list[Message]) -> None:
        """Home Assistant's view made to match this config: entities a changed config (or discovery turned
        off) no longer has are removed, the rest announced. What was announced lives beside the outbox."""
        from edge.detect.homeassistant import announce

        state = self.config.outbox.path.parent / "homeassistant.json"
        if discovery or state.exists():
            self._send(announce(state, discovery))

    def _send(self, messages: list[Message]) -> None:
        base = f"{self.config.mqtt.topic_prefix}/{self.config.device_id}"
        for message in messages:
            topic = message.full_topic(base)
            if message.retained:
                self.publisher.publish_retained(topic, message.payload)
            elif message.kind == "event" and self.events_outbox is not None:
                self.events_outbox.add(message.json(), topic=topic)  # durable; gets the events' own seq
                self.publisher.notify()
            else:
                self.publisher.publish_message(topic, message.payload)

    # -- requests (the publisher's request thread) ------------------------------------------------------------

    def on_request(self, request: InferRequest) -> None:
        """A parsed `infer` request (the publisher's request thread): queued like any request. A request
        of several texts is answered once per text (`request.index` says which), and acknowledged to
        the broker once all are."""
        topic = self._infer_topic
        session = self.active
        assert session is not None
        items: list[Array | Mapping[str, Array]]
        if request.image is not None:
            items = [request.image]
        elif request.tensors is not None:
            specs = {spec.name: (spec.shape, spec.dtype) for spec in session.input_specs}
            data = {spec.name for spec in session.package.manifest.data_inputs}
            items = [tensors_for(request.tensors, specs, topic, request, frozenset(specs) - data)]
        elif session.text_pre is None:
            raise RequestRejected(
                f"{topic}: model '{session.info['name']}' takes images or tensors, not text (it has no tokenizer)",
                "texts" if request.texts and len(request.texts) > 1 else "text",
                request.reply,
                request.correlation_id,
            )
        else:
            items = [np.array(text, dtype=object) for text in request.texts or []]
        countdown = _Countdown(len(items), request.acknowledge)
        answered = dataclasses.replace(request, acknowledge=countdown.one_done)
        sequence = request.sequence
        for index, item in enumerate(items):
            tag: JSONObject = {}
            if request.correlation_id is not None:
                tag["correlation_id"] = request.correlation_id
            if len(items) > 1:
                tag["index"] = index
            # several texts: the sequence starts at the first and ends after the last
            part = (
                dataclasses.replace(
                    sequence,
                    start=sequence.start and index == 0,
                    end=sequence.end and index == len(items) - 1,
                )
                if sequence is not None
                else None
            )
            try:
                self.submit_request(
                    item,
                    MqttAnswer(self.publisher, answered, topic),
                    request.client,
                    REQUEST_URI,
                    tag or None,
                    request.received_mono,
                    part,
                )
            except RequestRejected as exc:
                raise RequestRejected(
                    f"{topic}: {exc}", exc.field, request.reply, request.correlation_id
                ) from None

    def submit_request(
        self,
        data: Array | Mapping[str, Array],
        answer: Answer,
        client: str,
        uri: str,
        tag: JSONObject | None = None,
        received_mono: float | None = None,
        sequence: SequenceFlags | None = None,
    ) -> None:
        """Queue one request (an image, or tensors by input name) beside the sources' frames, batched
        with them; it waits for room rather than being dropped. Rate-limited per client (a reply topic,
        an HTTP peer): over the limit it raises RequestRejected. A stateful model's request continues
        its `sequence`'s state, or, without one, runs alone from zero state (edge.publish.sequences)."""
        if not self._rate_limiter.allow(client):
            limits = self.config.requests
            raise RequestRejected(
                f"rate limit: at most {limits.rate_per_s:g} requests/s per client (burst {limits.burst})",
                "payload",
                None,
            )
        session = self.active
        assert session is not None
        with self._request_lock:
            self._requests_served += 1
            number = self._requests_served
        stream: str | None = None
        if sequence is not None:
            if not session.stateful:
                raise RequestRejected(
                    f"model '{session.info['name']}' keeps no state between requests: sequence_id does not apply",
                    "sequence_id",
                    None,
                )
            try:
                self._sequences.admit(sequence)
            except SequenceError as exc:
                raise RequestRejected(str(exc), exc.field, None) from None
            stream = sequence.stream
            tag = {**(tag or {}), "sequence_id": sequence.id}  # the payload's `request` says which
        elif session.stateful:
            stream = f"request:{number}"  # never open: forgotten after its one run
        received = time.monotonic() if received_mono is None else received_mono
        wall = time.time() - (time.monotonic() - received)
        frame = Frame(
            data if isinstance(data, np.ndarray) else np.zeros(0, np.float32), number, wall, received, uri
        )
        feeds = None if isinstance(data, np.ndarray) else dict(data)
        start = sequence is not None and sequence.start
        job = Job(frame, answer, feeds, tag, stream, start)
        self.queue.put(job, wait_for_room=True, stop=self._worker_stop)

    def model_metadata(self) -> JSONObject:
        """The Open Inference Protocol's model metadata for the model now serving."""
        from edge.serve_http import tensor_metadata

        session = self.active
        assert session is not None
        platform = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}.get(
            session.backend_name, session.backend_name
        )
        return {
            "name": session.info["name"],
            "versions": [session.info["version"]],
            "platform": platform,
            "inputs": [tensor_metadata(s.name, s.shape, s.dtype) for s in session.input_specs],
            "outputs": [tensor_metadata(s.name, s.shape, s.dtype) for s in session.loaded.output_specs],
        }

    def _watch_sources(self) -> None:
        for source in self.sources:
            reconnects = int(source.stats.get("reconnects", 0))
            if reconnects > self._last_reconnects.get(source.uri, 0):
                self._last_reconnects[source.uri] = reconnects
                self.publisher.publish_event(
                    "source_reconnected", {"uri": source.uri, "reconnects": reconnects}
                )

    # -- models ----------------------------------------------------------------------------------------------

    def _load_verified(self, path: Path, current: ModelSession | None) -> Package:
        """The package at `path` (a package .tar is unpacked into the models directory first), hashes and
        signature verified, and not older than what we accepted. Resolved first: the configured `model`
        is a symlink that a later swap repoints, and a session kept for rollback must still read its own
        golden files."""
        if is_archive(path):
            path = unpack_into(path, self.config.models_dir)
            log.info("unpacked the package archive into %s", path)
        return self.trust.load(path.resolve(), current.package.manifest if current is not None else None)

    @property
    def workers(self) -> int:
        """Inference workers: the config's, else what the device profile suggests."""
        return self.config.workers or self.profile.workers

    def _open_session(self, package: Package) -> ModelSession:
        workers = self.workers
        threads = self.config.threads
        if workers > 1:
            # the cores are split between the copies: each with all of them would oversubscribe the CPU
            threads = max(1, (threads or self.profile.threads or os.cpu_count() or 1) // workers)
        session = open_session(
            package,
            self.profile,
            backend=self.config.backend,
            threads=threads,
            on_event=self._on_backend_event,
            replicas=workers,
        )
        batching = self.config.batching
        if batching is not None and batching.max_size > 1 and not session.batchable:
            shapes = ", ".join(f"{spec.name} {spec.shape}" for spec in session.input_specs)
            log.warning(
                "batching: %s %s has a fixed batch size (%s); its frames run one backend call each",
                package.manifest.name,
                package.manifest.version,
                shapes,
            )
        return session

    def _on_backend_event(self, name: str, data: JSONObject) -> None:
        self.publisher.publish_event(name, data)

    def resolve_reload_path(self, raw: JSONValue) -> Path:
        """A reload target must be a directory inside the models directory (the configured model's parent)."""
        if raw is None:
            return self.config.model
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise ConfigError("reload: `path` must be a non-empty string")
        try:
            return check_model_path(raw, self.config.models_dir)
        except PackageError as exc:
            raise ConfigError(f"reload: {exc}") from exc

    def reload(self, raw_path: JSONValue) -> JSONObject:
        """Load a package beside the running one, check it, swap between two inferences; keep the old one
        until the next swap (rollback target). Any failure leaves the old model serving."""
        with self._swap_lock:
            old = self.active
            assert old is not None
            try:
                package = self._load_verified(self.resolve_reload_path(raw_path), old)
                path = package.root
                new = self._open_session(package)
            except EdgeError as exc:
                failed: JSONObject = {"path": str(raw_path), "error": str(exc), "serving": _info(old)}
                log.warning("model swap failed, still serving %s: %s", old.info["version"], exc)
                self.publisher.publish_event("model_swap_failed", failed)
                raise

            # The worker reads `self.active` once per frame: this assignment lands between two inferences.
            retired, self.previous, self.active = self.previous, old, new
            self.trust.accept(package)
            self._persist_choice(path)
            if retired is not None:
                retired.close()
            data: JSONObject = {
                "from": _info(old),
                "to": _info(new),
                "path": str(path),
                "provider": new.provider,
            }
            log.info("model swapped: %s -> %s", old.info["version"], new.info["version"])
            self.publisher.set_status(self._status("online"))
            self.publisher.publish_event("model_swapped", data)
            self.notifier.status(self._status_line())
            return {**data, "golden": _golden_dict(new)}

    def rollback(self) -> JSONObject:
        """Serve the previous package again (kept loaded since the last swap) after its self-check passes;
        the anti-rollback floor stays, with only this package exempt (edge.trust.accept_rollback)."""
        with self._swap_lock:
            current, target = self.active, self.previous
            assert current is not None
            if target is None:
                raise ConfigError("rollback: no previous model is kept (there was no model swap since start)")
            report = target.loaded.self_check()
            if not report.passed:
                raise BackendError(f"rollback: the previous model fails its self-check: {report.summary()}")
            self.trust.accept_rollback(target.package)
            # The worker reads `self.active` once per frame: this assignment lands between two inferences.
            self.active, self.previous = target, current
            self._persist_choice(target.package.root)
            data: JSONObject = {"from": _info(current), "to": _info(target), "path": str(target.package.root)}
            log.warning("model rolled back: %s -> %s", current.info["version"], target.info["version"])
            self.publisher.set_status(self._status("online"))
            self.publisher.publish_event("model_rolled_back", data)
            self.notifier.status(self._status_line())
            return {**data, "golden": report.to_dict()}

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

    def selfcheck(self) -> JSONObject:
        session = self.active
        assert session is not None
        report = session.loaded.self_check()
        return {"passed": bool(report.passed), "model": _info(session), "golden": report.to_dict()}

    # -- commands, status, stats -------------------------------------------------------------------------------

    def _status(self, state: str) -> JSONObject:
        from edge import __version__

        session = self.active
        versions: JSONObject = {"edge": __version__}
        try:
            import onnxruntime

            versions["onnxruntime"] = str(onnxruntime.__version__)
        except ImportError:
            pass
        status: JSONObject = {"state": state, "device_id": self.config.device_id, "versions": versions}
        if self.previous is not None:
            status["previous_model"] = _info(self.previous)  # what cmd/rollback would serve
        if session is not None:
            status["model"] = _info(session)
            status["runtime"] = {"backend": session.backend_name, "provider": session.provider}
        status["profile"] = self.profile.name
        if self._objects is not None and self.config.homeassistant.enabled:
            status["stats"] = self._objects.stats.stats(time.time())
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
        pub_stats = self.publisher.stats
        return StatsSnapshot(
            sources={s.uri: dict(s.stats) for s in self.sources},
            queue_dropped={uri: count for uri, count in self.queue.dropped.items()},
            outbox_depth=self.outbox.depth,
            outbox_dropped=self.outbox.dropped,
            outbox_disk_full=self.outbox.disk_full,
            mqtt_connected=self.publisher.connected,
            mqtt_reconnects=_count(pub_stats, "reconnects"),
            mqtt_connect_failures=dict(self.publisher.connect_failures),
            inference_errors=self.inference_errors,
            backend_fallbacks=fallback_counts(),
            predictions_published=_count(pub_stats, "acked"),
            predictions_made=self.predictions,
            backend=session.backend_name if session else "",
            provider=session.provider if session else "",
            model_name=session.info["name"] if session else "",
            model_version=session.info["version"] if session else "",
            model_sha256=session.info["sha256"] if session else "",
        )

    def stats(self) -> JSONObject:
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
            **(
                {"events_outbox": {"depth": self.events_outbox.depth, "dropped": self.events_outbox.dropped}}
                if self.events_outbox is not None
                else {}
            ),
            "mqtt": {"connected": snap.mqtt_connected, **_json_stats(self.publisher.stats)},
            "model": _info(self.active) if self.active else None,
            "previous_model": _info(self.previous) if self.previous else None,
            "runtime": {"backend": snap.backend, "provider": snap.provider},
            "sequences": {"open": len(self._sequences), "expired": self._sequences.expired},
        }


def _info(session: ModelSession) -> JSONObject:
    return {key: value for key, value in session.info.items()}


def _golden_dict(session: ModelSession) -> JSONObject | None:
    report = session.golden
    return None if report is None else report.to_dict()


def _json_stats(stats: Mapping[str, object]) -> JSONObject:
    """A publisher's counters as JSON (they are numbers and flags; anything else is shown as text)."""
    return {
        key: value if isinstance(value, int | float | str | bool) or value is None else str(value)
        for key, value in stats.items()
    }


# ---------------------------------------------------------------------------------------------------------
# `edge-infer run`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, help="the daemon's YAML config")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        daemon = Daemon.from_config(config)
    except OSError as exc:  # an outbox directory that cannot be created, a device that cannot be opened
        raise PackageError(f"cannot start: {exc}") from exc

    def on_signal(signum: int, frame: FrameType | None) -> None:
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
