from __future__ import annotations

import os
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest

from edge.health import Metrics, Notifier, StatsSnapshot


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def _drain(sock: socket.socket) -> list[str]:
    sock.settimeout(0.05)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except (TimeoutError, BlockingIOError):
        return out


def test_ready_status_stopping_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with _bind(str(path)) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.ready("serving tiny on CPUExecutionProvider")
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=serving tiny on CPUExecutionProvider"
        assert notifier.status("reloading")
        assert sock.recv(4096).decode() == "STATUS=reloading"
        assert notifier.stopping()
        assert sock.recv(4096).decode().startswith("STOPPING=1\n")
        notifier.close()


def test_abstract_socket_with_at_sign() -> None:
    name = f"edge-test-{uuid.uuid4().hex}"
    with _bind(b"\0" + name.encode()) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_watchdog_pings_are_rate_limited_to_a_quarter_of_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    now = [100.0]
    with _bind(str(path)) as sock:
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier(env, clock=lambda: now[0])
        assert notifier.watchdog_interval == pytest.approx(0.5)
        sent = []
        for _ in range(40):  # a loop iterating every 50 ms for 2 s
            sent.append(notifier.watchdog())
            now[0] += 0.05
        received = _drain(sock)
        assert received == ["WATCHDOG=1"] * sum(sent)
        assert sum(sent) == 4  # one ping per 0.5 s, always < WATCHDOG_USEC / 2 apart
        notifier.close()


def test_watchdog_meant_for_another_pid_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with _bind(str(path)):
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        notifier = Notifier(env)
        assert notifier.watchdog_interval is None
        assert not notifier.watchdog()


def test_metrics_endpoint_serves_the_snapshot_and_latencies() -> None:
    snap = StatsSnapshot(
        sources={"clip.avi": {"frames_in": 30, "frames_dropped": 2, "reconnects": 1}},
        queue_dropped={"clip.avi": 3},
        outbox_depth=7,
        outbox_dropped=5,
        outbox_disk_full=4,
        mqtt_connected=True,
        mqtt_reconnects=2,
        predictions_published=20,
        predictions_made=27,
        backend="onnxruntime",
        provider="CPUExecutionProvider",
        model_name="tiny",
        model_version="1.0",
        model_sha256="ab" * 32,
    )
    metrics = Metrics(lambda: snap)
    for seconds in (0.003, 0.004, 0.03):
        metrics.inference_seconds.observe(seconds)
    port = metrics.serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    lines = set(text.splitlines())
    assert 'edge_frames_in_total{source="clip.avi"} 30.0' in lines
    assert 'edge_frames_dropped_total{source="clip.avi"} 5.0' in lines
    assert "edge_outbox_depth 7.0" in lines
    assert "edge_outbox_dropped_total 5.0" in lines
    assert "edge_outbox_disk_full_total 4.0" in lines
    assert "edge_mqtt_connected 1.0" in lines
    assert "edge_mqtt_reconnects_total 2.0" in lines
    assert "edge_predictions_published_total 20.0" in lines
    assert "edge_inference_seconds_count 3.0" in lines
    assert 'edge_inference_seconds_bucket{le="0.005"} 2.0' in lines
    info = next(line for line in lines if line.startswith("edge_model_info{"))
    assert 'provider="CPUExecutionProvider"' in info and 'backend="onnxruntime"' in info


def test_inference_errors_and_backend_fallbacks_are_exported() -> None:
    snapshot = StatsSnapshot(inference_errors=3, backend_fallbacks={"gpu": 2, "CUDAExecutionProvider": 1})
    text = Metrics(lambda: snapshot).render().decode()
    assert "edge_inference_errors_total 3.0" in text
    assert 'edge_backend_fallbacks_total{accelerator="gpu"} 2.0' in text
    assert 'edge_backend_fallbacks_total{accelerator="CUDAExecutionProvider"} 1.0' in text
