"""The daemon as a real subprocess (`python -m edge.cli run --config FILE`), so scenarios can SIGKILL,
SIGSTOP and restart it like a supervisor would. READY and WATCHDOG pings arrive as sd_notify datagrams on
a socket this helper binds and names in NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.daemon_helpers import make_sensor_package, make_tiny_package, write_config

REPO = Path(__file__).resolve().parents[2]
DEVICE = "fault-01"
PREFIX = "edge"
WINDOW = 16
CHANNELS = 2


def sensor_samples(path: Path, windows: int) -> Path:
    """A raw f32le file of `windows` sensor windows; window k holds k (so a payload names its window)."""
    samples = np.repeat(np.arange(windows, dtype=np.float32), WINDOW)
    path.write_bytes(np.stack([samples, -samples], axis=1).astype("<f4").tobytes())
    return path


def fault_config(
    workdir: Path,
    broker_port: int,
    *,
    windows: int,
    rate: float,
    loop: bool,
    max_bytes: int = 1 << 20,
    inflight_window: int = 100,
    keepalive: int = 5,
    flush_timeout_s: float = 30.0,
    source: dict[str, Any] | None = None,
    sources: list[dict[str, Any]] | None = None,
    device_id: str = DEVICE,
    outbox_enabled: bool = True,
) -> Path:
    """A config for the tiny sensor package fed `rate` windows per second from a file (real sensor
    source, real ONNX Runtime session), QoS 1 to the test's broker, the outbox under `workdir/state`.
    A video `source` (or video `sources`, served by one model session) gets the tiny image classifier."""
    models = workdir / "models"
    first = sources[0] if sources else source
    package = "tiny" if first is not None and first.get("type") == "video" else "sensor"
    if not (models / package / "manifest.json").exists():
        if package == "tiny":
            make_tiny_package(models / package)
        else:
            make_sensor_package(models / package, window=WINDOW, channels=CHANNELS)
    if source is None and sources is None:
        data = sensor_samples(workdir / "samples.f32", windows)
        source = {
            "type": "sensor",
            "uri": str(data),
            "format": "f32le",
            "channels": CHANNELS,
            "window": WINDOW,
            "sample_rate": int(rate * WINDOW),
            "realtime": True,
            "loop": loop,
        }
    return write_config(
        workdir / "edge.yaml",
        device_id=device_id,
        profile="x86-64-avx2",
        model=f"models/{package}",
        **({"sources": sources} if sources is not None else {"source": source}),
        mqtt={
            "host": "127.0.0.1",
            "port": broker_port,
            "qos": 1,
            "topic_prefix": PREFIX,
            "keepalive": keepalive,
            "inflight_window": inflight_window,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 1.0,
        },
        outbox={"enabled": outbox_enabled, "path": "state/outbox.db", "max_bytes": max_bytes},
        metrics=None,
        flush_timeout_s=flush_timeout_s,
        frame_queue=64,
    )


@dataclass
class NotifySocket:
    """A bound AF_UNIX datagram socket collecting sd_notify messages with their monotonic arrival time."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.messages.extend((now, line) for line in data.decode(errors="replace").splitlines())

    def lines(self, key: str) -> list[float]:
        """Arrival times of every `KEY=...` line (e.g. "READY=1", "WATCHDOG=1")."""
        with self._lock:
            return [t for t, line in self.messages if line.startswith(key)]

    def wait_for(self, key: str, timeout: float, after: float = -1.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t in self.lines(key) if t > after]
            if hits:
                return hits[0]
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class DaemonProcess:
    """Start, kill and restart `edge-infer run` with one config; every process it starts is killed in
    `close()` (call it from a finalizer). The log of every run is appended to `workdir/daemon.log`."""

    def __init__(self, config: Path, workdir: Path, watchdog_usec: int | None = None):
        self.config = config
        self.workdir = workdir
        self.log = workdir / "daemon.log"
        # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
        self.notify = NotifySocket(Path(f"/tmp/edge-notify-{os.getpid()}-{time.monotonic_ns()}.sock"))
        self.watchdog_usec = watchdog_usec
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def outbox_path(self) -> Path:
        return self.workdir / "state" / "outbox.db"

    def start(self) -> DaemonProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(self.notify.path)}
        env.pop("WATCHDOG_PID", None)
        if self.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        else:
            env.pop("WATCHDOG_USEC", None)
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until this run's READY=1 (raises with the log if it exits or times out first)."""
        started = time.monotonic()
        already = len(self.notify.lines("READY=1"))
        deadline = started + timeout
        while time.monotonic() < deadline:
            if len(self.notify.lines("READY=1")) > already:
                return time.monotonic() - started
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)
        raise AssertionError(f"daemon not READY within {timeout} s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "daemon is not running"
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too, but be explicit
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the daemon flushes its outbox) and the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log_tail()}") from None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s:\n{self.log_tail()}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def close(self) -> None:
        try:
            self.kill()
        finally:
            self.notify.close()


def read_outbox(path: Path) -> dict[str, Any]:
    """The outbox's own counters and pending seqs, read-only (works while the daemon runs: WAL)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        meta = {key: value for key, value in conn.execute("SELECT key, value FROM meta")}
        pending = [int(row[0]) for row in conn.execute("SELECT seq FROM messages ORDER BY seq")]
    finally:
        conn.close()
    return {
        "next_seq": int(meta.get("next_seq", 1)),
        "dropped": int(meta.get("dropped", 0)),
        "boots": int(meta.get("boots", 0)),
        "pending": pending,
    }


def outbox_disk_bytes(path: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        file = Path(str(path) + suffix)
        sizes[suffix or "db"] = file.stat().st_size if file.exists() else 0
    return sizes


class CommandClient:
    """Sends `{prefix}/{device}/cmd/{name}` requests (MQTT 3.1.1, so replies come on `.../reply`) over one
    connection and matches replies by the `id` the daemon echoes back."""

    def __init__(self, port: int, device: str = DEVICE, prefix: str = PREFIX):
        import json

        import paho.mqtt.client as mqtt

        self._json = json
        self.base = f"{prefix}/{device}/cmd"
        self.replies: dict[Any, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fault-cmd-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv311,
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{self.base}/+/reply", qos=1)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise TimeoutError("command reply subscription not acknowledged within 10 s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = self._json.loads(msg.payload)
        except ValueError:
            return
        with self._cond:
            self.replies[body.get("id")] = body
            self._cond.notify_all()

    def call(self, name: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        body = {**(args or {}), "id": request_id}
        self.client.publish(f"{self.base}/{name}", self._json.dumps(body), qos=1)
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self.replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply to {name} #{request_id} within {timeout} s")
                self._cond.wait(remaining)
            return self.replies.pop(request_id)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
