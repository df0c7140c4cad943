"""`Daemon(...)` takes its parts typed, so the worker runs here without a broker or a database: a memory
outbox, a publisher that only records, a real video source and a real ONNX Runtime session."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from edge.config import DaemonConfig
from edge.daemon import Daemon
from edge.jsontypes import JSONObject
from edge.profiles import load_profile
from edge.publish.outbox import MemoryOutbox
from edge.sources import open_source
from edge.trust import TrustPolicy
from tests.assets_media import labelled_clip
from tests.daemon_helpers import make_tiny_package


class RecordingPublisher:
    """Sends nothing; keeps what the daemon asked it to send."""

    def __init__(self) -> None:
        self.statuses: list[JSONObject] = []
        self.events: list[tuple[str, JSONObject | None]] = []
        self.started = self.stopped = False
        self.notified = 0

    @property
    def connected(self) -> bool:
        return True

    @property
    def stats(self) -> Mapping[str, object]:
        return {"acked": 0, "reconnects": 0}

    @property
    def connect_failures(self) -> Mapping[str, int]:
        return {}

    def start(self) -> None:
        self.started = True

    def stop(self, flush_timeout: float = 5.0) -> None:
        self.stopped = True

    def notify(self) -> None:
        self.notified += 1

    def set_status(self, status: JSONObject) -> None:
        self.statuses.append(status)

    def publish_event(self, name: str, data: JSONObject | None = None) -> None:
        self.events.append((name, data))


class SwitchableOutbox(MemoryOutbox):
    """A memory outbox whose disk can be declared full."""

    disk_is_full = False

    @property  # type: ignore[override]
    def storing(self) -> bool:
        return not self.disk_is_full


def build_daemon(tmp_path: Path, **over: object) -> tuple[Daemon, SwitchableOutbox, RecordingPublisher]:
    models = tmp_path / "models"
    make_tiny_package(models / "v1")
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0).path  # 50 frames
    data: dict[str, object] = {
        "device_id": "parts-01",
        "model": str(models / "v1"),
        "source": {"type": "video", "uri": str(clip), "realtime": False, "loop": False},
        "outbox": {"enabled": False, "path": str(tmp_path / "state" / "outbox.db")},
        "metrics": None,
    }
    config = DaemonConfig.model_validate(data | over)
    outbox = SwitchableOutbox(1 << 20)
    publisher = RecordingPublisher()
    daemon = Daemon(
        config,
        profile=load_profile("x86-64-avx2"),
        trust=TrustPolicy([], tmp_path / "state"),
        sources=[open_source(source) for source in config.all_sources],
        outbox=outbox,
        publisher=publisher,
        metrics=config.metrics,
        health=config.health,
    )
    return daemon, outbox, publisher


@pytest.fixture
def parts_daemon(tmp_path: Path) -> tuple[Daemon, SwitchableOutbox, RecordingPublisher]:
    return build_daemon(tmp_path)


def test_the_worker_serves_every_frame_into_the_outbox_it_was_given(
    parts_daemon: tuple[Daemon, SwitchableOutbox, RecordingPublisher],
) -> None:
    daemon, outbox, publisher = parts_daemon
    daemon.start()
    assert daemon.run() == 0  # returns once the file source is finished and drained
    assert daemon.predictions == 50 and daemon.inference_errors == 0
    assert outbox.next_seq == 51  # every prediction went through the outbox, seq 1..50
    assert publisher.started and publisher.stopped and publisher.notified == 50
    online = publisher.statuses[0]
    assert online["state"] == "online" and online["device_id"] == "parts-01"
    assert online["profile"] == "x86-64-avx2"
    stats = daemon.stats()
    assert stats["predictions"] == 50
    assert stats["runtime"] == {"backend": "onnxruntime", "provider": "CPUExecutionProvider"}


def test_commands_are_the_daemons_own_handlers(
    parts_daemon: tuple[Daemon, SwitchableOutbox, RecordingPublisher],
) -> None:
    daemon, _, _ = parts_daemon
    daemon.start()
    try:
        handlers = daemon.command_handlers()
        assert sorted(handlers) == ["reload", "rollback", "selfcheck", "stats"]
        check = handlers["selfcheck"]({})
        assert check is not None and check["passed"] is True
        stats = handlers["stats"]({})
        assert stats is not None and isinstance(stats["stats"], dict)
    finally:
        daemon.request_stop()
        daemon.run()


def _get(port: int | None, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_health_probes_answer_from_the_daemons_state_and_404_elsewhere(tmp_path: Path) -> None:
    looping = {"type": "video", "uri": str(labelled_clip(fps=10.0, seconds_per_photo=1.0).path), "loop": True}
    daemon, outbox, _ = build_daemon(
        tmp_path,
        source=looping,
        metrics={"port": 0, "addr": "127.0.0.1"},
        health={"port": 0, "addr": "127.0.0.1"},
    )
    before = daemon.readiness()
    assert not before.ok and before.reason == "no model loaded yet"
    daemon.start()
    try:
        assert daemon.metrics is not None
        for port in (daemon.metrics.port, daemon.health_port):
            assert _get(port, "/healthz/live") == (200, {"status": "ok", "checks": {"worker": True}})
            code, body = _get(port, "/healthz/ready")
            assert code == 200 and body["status"] == "ok", body
            assert body["checks"] == {
                "model_loaded": True,
                "selfcheck_passed": True,
                "worker_alive": True,
                "outbox_writable": True,
            }
            assert _get(port, "/healthz")[0] == 404
            assert _get(port, "/")[0] == 404
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics.port}/metrics", timeout=5) as response:
            assert b"edge_predictions_total" in response.read()
        assert _get(daemon.health_port, "/metrics")[0] == 404  # the health port serves probes only
        outbox.disk_is_full = True
        code, body = _get(daemon.health_port, "/healthz/ready")
        assert code == 503 and body["status"] == "failing"
        assert body["reason"] == "the outbox cannot store predictions (disk full)"
        assert body["checks"]["outbox_writable"] is False  # type: ignore[index]
        assert _get(daemon.health_port, "/healthz/live")[0] == 200  # full disk: not ready, still alive
    finally:
        daemon.request_stop()
        daemon.run()
    code, body = _get_refused(daemon.health_port)
    assert code is None  # closed on stop


def _get_refused(port: int | None) -> tuple[int | None, object]:
    try:
        return _get(port, "/healthz/live")
    except urllib.error.URLError:
        return None, None
