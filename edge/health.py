"""Health signals for the supervisor: systemd's sd_notify protocol, a Prometheus endpoint and HTTP probes.

sd_notify is a datagram to the socket named in NOTIFY_SOCKET (a path, or '@name' for the abstract
namespace); without it every call is a no-op, so the daemon runs the same under systemd, in a container or
in a test. WATCHDOG=1 is sent by the inference loop itself (`Notifier.watchdog()` once per iteration, rate
limited here), never by a timer thread: a hung backend then stops the pings and systemd restarts us.

The metrics port (and `health.port`, when set) serves `/metrics`, `/healthz/live` (the inference worker
is looping) and `/healthz/ready` (model loaded, self-check passed, worker alive, outbox writable): 200 with
the checks as JSON, or 503 naming the first that failed. Every other path is a 404.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


def _notify_address(raw: str) -> str | bytes:
    # Abstract sockets are spelled with a leading '@' in the environment and a NUL byte on the wire.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    """sd_notify over NOTIFY_SOCKET; every method is a cheap no-op when the variable is unset."""

    def __init__(self, environ: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic):
        env = os.environ if environ is None else environ
        self._address = _notify_address(env["NOTIFY_SOCKET"]) if env.get("NOTIFY_SOCKET") else None
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.watchdog_interval = self._watchdog_interval(env)
        self._last_ping = -float("inf")

    @staticmethod
    def _watchdog_interval(env: Any) -> float | None:
        """Seconds between pings: a quarter of WATCHDOG_USEC, well under the required half."""
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
        try:
            return max(int(usec), 1) / 4e6
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (and a debug log) if it could not be sent."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message, self._address)
                return True
            except OSError as exc:
                log.debug("sd_notify %r failed: %s", lines, exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """Called from the inference loop every iteration; pings at most once per interval."""
        if self._address is None or self.watchdog_interval is None:
            return False
        now = self._clock()
        if now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# ---------------------------------------------------------------------------------------------------------
# Prometheus


@dataclass
class StatsSnapshot:
    """What the daemon knows at scrape time; counters are owned by the parts that count them."""

    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # uri -> frames_in, frames_dropped, ...
    queue_dropped: dict[str, int] = field(default_factory=dict)  # uri -> dropped by the daemon's frame queue
    outbox_depth: int = 0
    outbox_dropped: int = 0
    outbox_disk_full: int = 0  # predictions lost because the outbox's disk was full
    mqtt_connected: bool = False
    mqtt_reconnects: int = 0
    mqtt_connect_failures: dict[str, int] = field(default_factory=dict)  # reason -> failed attempts
    inference_errors: int = 0
    backend_fallbacks: dict[str, int] = field(default_factory=dict)  # accelerator given up -> times
    predictions_published: int = 0
    predictions_made: int = 0
    backend: str = ""
    provider: str = ""
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""


@dataclass(frozen=True)
class Probe:
    """One health answer: each named check passed or not; `reason` says why the first failing one failed."""

    checks: Mapping[str, bool]
    reason: str = ""

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def body(self) -> bytes:
        status = "ok" if self.ok else "failing"
        data = {
            "status": status,
            "checks": dict(self.checks),
            **({"reason": self.reason} if not self.ok else {}),
        }
        return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True)
class HealthProbes:
    """What `/healthz/live` and `/healthz/ready` ask (the daemon answers them from its own state)."""

    live: Callable[[], Probe]
    ready: Callable[[], Probe]


class _Routes(BaseHTTPRequestHandler):
    """`/metrics`, `/healthz/live`, `/healthz/ready`; 404 elsewhere (a probe must not pass by accident)."""

    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        probes = self.server.probes
        if path == "/metrics" and self.server.metrics is not None:
            self._send(200, self.server.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif path in ("/healthz/live", "/healthz/ready") and probes is not None:
            probe = probes.live() if path.endswith("live") else probes.ready()
            self._send(200 if probe.ok else 503, probe.body(), "application/json")
        else:
            self._send(404, b'{"error":"not found"}', "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(
        self, format: str, *args: object
    ) -> None:  # scrapes every few seconds: not worth a log line
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], metrics: Metrics | None, probes: HealthProbes | None):
        super().__init__(addr, _Routes)
        self.metrics = metrics
        self.probes = probes


class HttpEndpoint:
    """One listening port serving metrics and/or health probes, on its own thread."""

    def __init__(self, metrics: Metrics | None, probes: HealthProbes | None):
        self._metrics = metrics
        self._probes = probes
        self._server: _Server | None = None
        self.port: int | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        self._server = _Server((addr, port), self._metrics, self._probes)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name=f"http :{self.port}", daemon=True).start()
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Metrics:
    """A private registry (several daemons may live in one test process) served on `port` if given.

    Latencies are observed as they happen; everything else is read from `snapshot()` at scrape time,
    so the exported numbers are exactly the counters the parts keep themselves.
    """

    def __init__(self, snapshot: Callable[[], StatsSnapshot]):
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot = snapshot
        buckets = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
        self.inference_seconds = Histogram(
            "edge_inference_seconds",
            "Backend inference time per frame",
            registry=self.registry,
            buckets=buckets,
        )
        self.capture_to_publish_seconds = Histogram(
            "edge_capture_to_outbox_seconds",
            "Time from frame capture to the prediction stored in the outbox",
            registry=self.registry,
            buckets=buckets,
        )
        self.registry.register(_SnapshotCollector(snapshot))
        self._endpoint: HttpEndpoint | None = None
        self.port: int | None = None

    def serve(self, port: int, addr: str = "0.0.0.0", probes: HealthProbes | None = None) -> int:
        """Serve `/metrics` (and the health probes, when given) on `port`; 0 picks a free one."""
        self._endpoint = HttpEndpoint(self, probes)
        self.port = self._endpoint.serve(port, addr)
        return self.port

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], StatsSnapshot]):
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # collected lazily; describing would take a snapshot at registration time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        snap = self._snapshot()
        frames_in = CounterMetricFamily("edge_frames_in", "Frames captured per source", labels=["source"])
        frames_dropped = CounterMetricFamily(
            "edge_frames_dropped",
            "Frames dropped per source (the source's newest-frame slot plus the daemon's frame queue)",
            labels=["source"],
        )
        reconnects = CounterMetricFamily("edge_source_reconnects", "Source reconnects", labels=["source"])
        for uri, stats in snap.sources.items():
            frames_in.add_metric([uri], stats.get("frames_in", 0))
            frames_dropped.add_metric([uri], stats.get("frames_dropped", 0) + snap.queue_dropped.get(uri, 0))
            reconnects.add_metric([uri], stats.get("reconnects", 0))
        yield frames_in
        yield frames_dropped
        yield reconnects
        yield GaugeMetricFamily(
            "edge_outbox_depth", "Predictions waiting for a broker ack", snap.outbox_depth
        )
        yield CounterMetricFamily(
            "edge_outbox_dropped", "Predictions dropped because the outbox was full", snap.outbox_dropped
        )
        yield CounterMetricFamily(
            "edge_outbox_disk_full",
            "Predictions lost because the outbox could not be written (disk full)",
            snap.outbox_disk_full,
        )
        yield GaugeMetricFamily(
            "edge_mqtt_connected", "1 while connected to the broker", int(snap.mqtt_connected)
        )
        yield CounterMetricFamily("edge_mqtt_reconnects", "MQTT reconnects", snap.mqtt_reconnects)
        yield _labelled(
            "edge_mqtt_connect_failures",
            "Failed MQTT connection attempts by reason (refused, dns, timeout, tls, auth, ...)",
            "reason",
            snap.mqtt_connect_failures,
        )
        yield CounterMetricFamily(
            "edge_inference_errors", "Frames whose inference failed (counted, skipped)", snap.inference_errors
        )
        yield _labelled(
            "edge_backend_fallbacks",
            "Backend accelerators given up at model load (the profile's fallback policy allowed it)",
            "accelerator",
            snap.backend_fallbacks,
        )
        yield CounterMetricFamily(
            "edge_predictions_published", "Predictions acknowledged by the broker", snap.predictions_published
        )
        yield CounterMetricFamily("edge_predictions", "Predictions made", snap.predictions_made)
        info = InfoMetricFamily("edge_model", "Model and execution provider in use")
        info.add_metric(
            [],
            {
                "backend": snap.backend,
                "provider": snap.provider,
                "name": snap.model_name,
                "version": snap.model_version,
                "sha256": snap.model_sha256,
            },
        )
        yield info


def _labelled(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> Any:
    """A counter with one label, a sample per key of `counts`."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family
