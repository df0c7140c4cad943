"""The daemon against a real mosquitto, a real clip and real ONNX Runtime sessions (tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import DaemonConfig
from edge.daemon import Daemon
from edge.errors import PackageError
from edge.health import Notifier
from tests.assets_media import labelled_clip, photo
from tests.broker import Mosquitto, free_port
from tests.daemon_helpers import (
    TINY_LABELS,
    make_tiny_package,
    running_daemon,
    subscribed,
    wait_until,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cam-01"
PREFIX = f"edge/{DEVICE}"


@pytest.fixture(scope="module")
def clip() -> Path:
    return labelled_clip(fps=10.0, seconds_per_photo=1.0).path  # 50 frames of real photos


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_tiny_package(root / "v1", version="1.0.0", gain=4.0)
    return root


def _video_source(path: Path, *, fps: int, loop: bool = True) -> dict[str, Any]:
    """A video file read as fast as the daemon takes it, capped at `fps`."""
    return {"type": "video", "realtime": False, "uri": str(path), "fps": fps, "loop": loop}


def _config(tmp_path: Path, models: Path, port: int, clip: Path, **over: Any) -> DaemonConfig:
    source = over.pop("source", _video_source(clip, fps=50, loop=False))
    data: dict[str, Any] = {
        "device_id": DEVICE,
        "profile": "x86-64-avx2",
        "model": str(models / "v1"),
        "source": source,
        "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1, "topic_prefix": "edge", "reconnect_max_s": 1.0},
        "outbox": {"path": str(tmp_path / "state" / "outbox.db"), "max_bytes": 1 << 20},
        "metrics": None,
        "flush_timeout_s": 10.0,
    }
    data.update(over)
    return DaemonConfig.model_validate(data)


@pytest.fixture
def daemon_config(
    tmp_path: Path, models: Path, clip: Path, mosquitto: Mosquitto
) -> Callable[..., DaemonConfig]:
    """`_config` for this test's state directory, models, clip and broker: callers pass only what differs."""

    def build(**over: Any) -> DaemonConfig:
        return _config(tmp_path, models, mosquitto.port, clip, **over)

    return build


def running(config: DaemonConfig, notifier: Notifier | None = None) -> AbstractContextManager[Daemon]:
    return running_daemon(config, notifier)


def _seqs(messages: list[dict[str, Any]]) -> list[int]:
    return sorted({m["seq"] for m in messages})


def _validator() -> Any:
    import jsonschema

    from edge.publish.payload import prediction_schema

    schema = prediction_schema()
    return jsonschema.Draft202012Validator(schema)


def test_clip_end_to_end_schema_and_seq_continuity(
    mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:
    with subscribed(mosquitto.port, f"{PREFIX}/#") as sub:
        config = daemon_config()
        with running(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 60)
        made = daemon.predictions
        assert made >= 40  # 50 frames at a 50 fps cap: a slow CI box may drop a few, never most
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= made, 20, suffix="/predictions")
        predictions = sub.payloads("/predictions")
        seqs = _seqs(predictions)
        assert seqs == list(range(seqs[0], seqs[0] + made))  # no gap, no extra
        validator = _validator()
        for message in predictions:
            validator.validate(message)
            assert message["device_id"] == DEVICE
            assert message["model"]["name"] == "tiny-colour"
            assert message["runtime"]["provider"] == "CPUExecutionProvider"
            assert message["result"]["type"] == "classification"
        # The tiny model's logits are 4 x mean R, G, B (0..1) and a constant 1.8 for "gray": the label of
        # every frame follows from the photo it shows, computed here from the photo itself.
        expected = {}
        for name in ("chelsea", "coffee", "rocket", "astronaut"):
            logits = np.append(photo(name).mean(axis=(0, 1))[::-1] / 255 * 4, 1.8)
            expected[name] = TINY_LABELS[int(np.argmax(logits))]
        shown = labelled_clip(fps=10.0, seconds_per_photo=1.0)
        hits = [
            m["result"]["top_k"][0]["label"] == expected[shown.photo_at(m["source"]["frame"])]
            for m in predictions
        ]
        assert sum(hits) >= 0.95 * len(hits)
        assert len(set(expected.values())) > 1  # the clip really exercises more than one class
        frames = [m["source"]["frame"] for m in sorted(predictions, key=lambda m: m["seq"])]
        assert frames == sorted(frames)  # one source, one worker: order is kept end to end
        assert len({m["boot_id"] for m in predictions}) == 1
        statuses = sub.payloads("/status")
        assert statuses[0]["state"] == "online" and statuses[-1]["state"] == "offline"
        assert statuses[0]["model"]["sha256"] == predictions[0]["model"]["sha256"]


def test_files_read_flat_out_lose_no_frame_even_when_sources_share_a_full_queue(
    tmp_path: Path, clip: Path, daemon_config: Callable[..., DaemonConfig]
) -> None:
    """realtime: false and no fps means every frame (benchmarks, batch jobs): three such sources and a
    one-frame queue make the pumps wait for room instead of dropping the oldest frame."""
    copies = []
    for index in range(3):
        copy = tmp_path / f"clip-{index}{clip.suffix}"
        copy.write_bytes(clip.read_bytes())
        copies.append({"type": "video", "realtime": False, "uri": str(copy), "loop": False})
    config = daemon_config(source=None, sources=copies, frame_queue=1)
    with running(config) as daemon:
        assert wait_until(daemon.sources_done.is_set, 120)
        assert wait_until(lambda: daemon.predictions >= 150, 60), daemon.predictions
    assert all(source.lossless for source in daemon.sources)
    assert daemon.predictions == 150, "50 frames from each of the 3 files"
    assert sum(daemon.queue.dropped.values()) == 0


def test_broker_down_for_a_while_then_back_loses_nothing(
    clip: Path, mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:
    with subscribed(mosquitto.port, f"{PREFIX}/predictions", client_id="persistent-sub") as sub:
        config = daemon_config(source=_video_source(clip, fps=20))
        with running(config) as daemon:
            assert sub.wait_for(lambda ms: len(ms) >= 10, 20)
            mosquitto.stop()
            before = daemon.predictions
            assert wait_until(lambda: daemon.predictions >= before + 20, 20)  # made while the broker is away
            assert daemon.outbox.depth > 0
            mosquitto.start()
            assert wait_until(lambda: daemon.publisher.connected, 30)
            after = daemon.predictions
            assert wait_until(lambda: daemon.predictions >= after + 10, 20)
        made = daemon.predictions
        complete = sub.wait_for(lambda ms: len(_seqs(ms)) >= made, 30)
        seqs = _seqs(sub.payloads())
        missing = sorted(set(range(seqs[0], seqs[0] + made)) - set(seqs))
        assert complete and not missing, (
            made,
            len(seqs),
            missing[:20],
            daemon.outbox.stats,
            daemon.publisher.stats,
        )
        assert seqs == list(range(seqs[0], seqs[0] + made))


def test_outbox_bound_drops_oldest_and_counts_exactly(
    tmp_path: Path, mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:
    with subscribed(mosquitto.port, f"{PREFIX}/predictions", client_id="bound-sub") as sub:
        mosquitto.stop()
        config = daemon_config(
            outbox={"path": str(tmp_path / "state" / "outbox.db"), "max_bytes": 8192},
            exit_on_source_end=False,
        )
        with running(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 60)
            made = daemon.predictions
            depth, dropped = daemon.outbox.depth, daemon.outbox.dropped
            assert dropped > 0 and depth + dropped == made
            assert daemon.outbox.size_bytes <= 8192
            mosquitto.start()
            assert sub.wait_for(lambda ms: len(_seqs(ms)) >= depth, 30)
            assert wait_until(lambda: daemon.outbox.depth == 0, 10)
        seqs = _seqs(sub.payloads())
        first = daemon.outbox.next_seq - made
        assert seqs == list(range(first + dropped, first + made))  # exactly the newest survived


def _send_command(port: int, name: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    replies: list[dict[str, Any]] = []
    got = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cmd-{name}-{time.monotonic_ns()}")
    client.on_message = lambda c, u, m: (replies.append(json.loads(m.payload)), got.set())
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(f"{PREFIX}/cmd/{name}/reply", qos=1)
        assert subscribed.wait(10)
        client.publish(f"{PREFIX}/cmd/{name}", json.dumps(body), qos=1).wait_for_publish(10)
        assert got.wait(timeout), f"no reply to cmd/{name} within {timeout} s"
        return replies[0]
    finally:
        client.loop_stop()
        client.disconnect()


def test_hot_swap_under_load_loses_nothing_and_never_mixes_models(
    models: Path, clip: Path, mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:
    make_tiny_package(models / "v2", version="2.0.0", gain=6.0)
    sha = {
        v: json.loads((models / v / "manifest.json").read_text())["artifacts"][0]["sha256"]
        for v in ("v1", "v2")
    }
    with subscribed(mosquitto.port, f"{PREFIX}/#", client_id="swap-sub") as sub:
        config = daemon_config(source=_video_source(clip, fps=40))
        with running(config) as daemon:
            assert sub.wait_for(lambda ms: len(ms) >= 10, 20, suffix="/predictions")
            for target in ("v2", "v1", str(models / "v2")):
                reply = _send_command(mosquitto.port, "reload", {"path": target, "id": target})
                assert reply["ok"] is True, reply
                assert reply["id"] == target
                count = daemon.predictions
                assert wait_until(lambda c=count: daemon.predictions >= c + 5, 20)
            assert daemon.active is not None and daemon.active.info["sha256"] == sha["v2"]
            assert daemon.previous is not None and daemon.previous.info["sha256"] == sha["v1"]
            stats = _send_command(mosquitto.port, "stats", {})
            assert stats["ok"] and stats["result"]["stats"]["model"]["version"] == "2.0.0"
            assert stats["result"]["stats"]["outbox"]["disk_full"] == 0  # predictions lost to a full disk
            check = _send_command(mosquitto.port, "selfcheck", {})
            assert check["ok"] and check["result"]["passed"] and check["result"]["golden"]["passed"]
        made = daemon.predictions
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= made, 30, suffix="/predictions")
        predictions = sorted(sub.payloads("/predictions"), key=lambda m: m["seq"])
        seqs = _seqs(predictions)
        assert seqs == list(range(seqs[0], seqs[0] + made))
        assert {m["model"]["sha256"] for m in predictions} == set(sha.values())
        versions = {sha["v1"]: "1.0.0", sha["v2"]: "2.0.0"}
        assert all(versions[m["model"]["sha256"]] == m["model"]["version"] for m in predictions)
        # The swaps are ordered: v1 ... v2 ... v1 ... v2, never interleaved.
        runs = [predictions[0]["model"]["version"]]
        for m in predictions[1:]:
            if m["model"]["version"] != runs[-1]:
                runs.append(m["model"]["version"])
        assert runs == ["1.0.0", "2.0.0", "1.0.0", "2.0.0"]
        swapped = [e for e in sub.payloads("/events") if e.get("event", e.get("name")) == "model_swapped"]
        assert len(swapped) == 3


def test_failed_swap_keeps_the_old_model_serving(
    tmp_path: Path, models: Path, clip: Path, mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:
    make_tiny_package(models / "bad-golden", version="9.0.0", corrupt="golden")
    make_tiny_package(models / "bad-hash", version="9.0.1", corrupt="hash")
    make_tiny_package(tmp_path / "elsewhere", version="9.0.2")
    with subscribed(mosquitto.port, f"{PREFIX}/#", client_id="fail-sub") as sub:
        config = daemon_config(source=_video_source(clip, fps=30))
        with running(config) as daemon:
            serving = daemon.active
            assert sub.wait_for(lambda ms: len(ms) >= 5, 20, suffix="/predictions")
            for target, reason in (
                ("bad-golden", "golden"),
                ("bad-hash", "sha256"),
                (str(tmp_path / "elsewhere"), "outside the models directory"),
                ("../elsewhere", "outside the models directory"),
            ):
                reply = _send_command(mosquitto.port, "reload", {"path": target})
                assert reply["ok"] is False, reply
                assert reason in reply["error"], reply
                assert daemon.active is serving
            count = daemon.predictions
            assert wait_until(lambda: daemon.predictions >= count + 5, 20)
        made = daemon.predictions
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= made, 30, suffix="/predictions")
        assert {m["model"]["version"] for m in sub.payloads("/predictions")} == {"1.0.0"}
        failed = [e for e in sub.payloads("/events") if e.get("event", e.get("name")) == "model_swap_failed"]
        assert len(failed) == 4


def test_sd_notify_and_metrics_from_a_running_daemon(
    tmp_path: Path, clip: Path, daemon_config: Callable[..., DaemonConfig]
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    config = daemon_config(source=_video_source(clip, fps=20), metrics={"port": 0, "addr": "127.0.0.1"})
    messages: list[str] = []
    try:
        with running(config, notifier) as daemon:
            while not any(m.startswith("READY=1") for m in messages):
                messages.append(sock.recv(4096).decode())
            started = time.monotonic()
            pings = 0
            while pings < 5:
                if sock.recv(4096).decode() == "WATCHDOG=1":
                    pings += 1
            assert time.monotonic() - started < 5
            assert wait_until(lambda: daemon.publisher.connected and daemon.predictions >= 10, 20)
            assert daemon.metrics is not None and daemon.metrics.port
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics.port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        lines = text.splitlines()
        frames_in = next(line for line in lines if line.startswith("edge_frames_in_total{"))
        assert float(frames_in.rsplit(" ", 1)[1]) >= 10
        assert any(
            line.startswith("edge_inference_seconds_count ") and float(line.split()[1]) >= 10
            for line in lines
        )
        assert "edge_mqtt_connected 1.0" in lines
        assert any(
            'provider="CPUExecutionProvider"' in line for line in lines if line.startswith("edge_model_info")
        )
        sock.settimeout(2)
        tail = []
        try:
            while True:
                tail.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any(m.startswith("STOPPING=1") for m in tail)
    finally:
        sock.close()


def _start_subprocess(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_sigkill_and_restart_loses_nothing_and_never_reuses_seq(
    tmp_path: Path, models: Path, clip: Path, mosquitto: Mosquitto
) -> None:
    with subscribed(mosquitto.port, f"{PREFIX}/#", client_id="kill-sub") as sub:
        config_path = write_config(
            tmp_path / "edge.yaml",
            device_id=DEVICE,
            profile="x86-64-avx2",
            model="models/v1",
            source={"type": "video", "realtime": False, "uri": str(clip), "fps": 20, "loop": True},
            mqtt={"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
            outbox={"path": "state/outbox.db", "max_bytes": 1 << 20},
            metrics=None,
        )
        log = tmp_path / "daemon.log"
        proc = _start_subprocess(config_path, log)
        try:
            assert sub.wait_for(lambda ms: len(ms) >= 15, 30, suffix="/predictions"), log.read_text()
            mosquitto.pause()  # the next predictions pile up in the outbox, unacknowledged
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            mosquitto.resume()
            proc = _start_subprocess(config_path, log)
            assert sub.wait_for(
                lambda ms: len({m["boot_id"] for m in ms}) == 2 and len(ms) >= 40, 30, "/predictions"
            ), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
            # The clean stop flushed the outbox; wait for the subscriber to see the tail too.
            assert sub.wait_for(lambda ms: ms and ms[-1]["state"] == "offline", 20, suffix="/status")
            time.sleep(0.5)
            predictions = sub.payloads("/predictions")
            by_seq: dict[int, set[str]] = {}
            for m in predictions:
                by_seq.setdefault(m["seq"], set()).add(m["boot_id"])
            seqs = sorted(by_seq)
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a prediction went missing across the kill"
            assert all(len(boots) == 1 for boots in by_seq.values()), "a seq was reused after the restart"
            first_boot = predictions[0]["boot_id"]
            boundary = max(s for s, b in by_seq.items() if first_boot in b)
            assert all(first_boot not in by_seq[s] for s in seqs if s > boundary)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_sensor_windows_from_a_file_reach_the_model_in_order(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from tests.daemon_helpers import make_sensor_package

    models = tmp_path / "models"
    make_sensor_package(models / "sensor", window=16, channels=2)
    windows = 30
    samples = np.repeat(np.arange(windows, dtype=np.float32), 16)  # window k holds k in every sample
    (tmp_path / "samples.f32").write_bytes(np.stack([samples, -samples], axis=1).astype("<f4").tobytes())
    with subscribed(mosquitto.port, f"{PREFIX}/predictions", client_id="sensor-sub") as sub:
        config = _config(
            tmp_path,
            models,
            mosquitto.port,
            tmp_path / "samples.f32",
            model=str(models / "sensor"),
            source={
                "type": "sensor",
                "uri": str(tmp_path / "samples.f32"),
                "format": "f32le",
                "channels": 2,
                "window": 16,
                "sample_rate": 160,
                "realtime": True,
            },
        )
        with running(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 30)
        made = daemon.predictions
        assert made >= windows - 2
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= made, 20)
        for message in sub.payloads():
            [output] = message["result"]["outputs"]
            k = message["source"]["frame"]
            assert output["name"] == "mean"
            assert np.allclose(np.ravel(output["data"]), [k, -k]), message["result"]


def test_source_file_vanishing_and_coming_back_reconnects_and_reports_it(
    tmp_path: Path, clip: Path, mosquitto: Mosquitto, daemon_config: Callable[..., DaemonConfig]
) -> None:

    local = tmp_path / "cam.mp4"
    shutil.copy(clip, local)
    with subscribed(mosquitto.port, f"{PREFIX}/#", client_id="vanish-sub") as sub:
        source = {**_video_source(local, fps=40), "reconnect_min_s": 0.2, "reconnect_max_s": 0.4}
        config = daemon_config(source=source)
        with running(config) as daemon:
            assert sub.wait_for(lambda ms: len(ms) >= 5, 20, suffix="/predictions")
            local.unlink()  # the open capture plays out its pass, then reopening fails and is retried
            assert sub.wait_for(lambda es: any(e["event"] == "source_reconnected" for e in es), 40, "/events")
            stalled = daemon.predictions
            shutil.copy(clip, local)
            assert wait_until(lambda: daemon.predictions >= stalled + 10, 40), daemon.stats()
            assert not daemon.stop_event.is_set()


def _signed_models(tmp_path: Path, clip: Path, mosquitto: Mosquitto) -> tuple[DaemonConfig, Path]:
    """Signed packages v1 (sequence 5, served through `current`), v2 (6) and older (4), and a config that
    trusts only their key."""
    from edge.signing import generate_keypair, load_private_key

    generate_keypair(tmp_path / "signing.pem", tmp_path / "signing.pub.pem")
    key = load_private_key(tmp_path / "signing.pem")
    models = tmp_path / "models"
    make_tiny_package(models / "v1", version="1.0.0", sequence=5, sign_key=key)
    make_tiny_package(models / "v2", version="2.0.0", gain=6.0, sequence=6, sign_key=key)
    make_tiny_package(models / "older", version="0.9.0", sequence=4, sign_key=key)
    (models / "current").symlink_to("v1")
    config = _config(
        tmp_path,
        models,
        mosquitto.port,
        clip,
        source=_video_source(clip, fps=30),
        trusted_keys=[str(tmp_path / "signing.pub.pem")],
        model=str(models / "current"),
    )
    return config, models


def test_with_trusted_keys_only_signed_newer_packages_are_swapped_in(
    tmp_path: Path, clip: Path, mosquitto: Mosquitto
) -> None:
    from edge.signing import generate_keypair, load_private_key

    other_key = tmp_path / "other.pem"
    generate_keypair(other_key, tmp_path / "other.pub.pem")
    config, models = _signed_models(tmp_path, clip, mosquitto)
    make_tiny_package(models / "unsigned", version="1.1.0", sequence=6)
    make_tiny_package(models / "stranger", version="1.2.0", sequence=6, sign_key=load_private_key(other_key))
    with running(config) as daemon:
        for target, reason in (
            ("unsigned", "not signed"),
            ("stranger", "signature does not match"),
            ("older", "rollback refused"),
        ):
            reply = _send_command(mosquitto.port, "reload", {"path": target})
            assert reply["ok"] is False and reason in reply["error"], reply
            assert daemon.active is not None and daemon.active.info["version"] == "1.0.0"
        reply = _send_command(mosquitto.port, "reload", {"path": "v2"})
        assert reply["ok"] is True, reply
        assert daemon.active is not None and daemon.active.info["version"] == "2.0.0"
    # The swap is persisted (current -> v2), so a restart serves v2 ...
    assert os.readlink(models / "current") == "v2"
    with running(config) as daemon:
        assert daemon.active is not None and daemon.active.info["version"] == "2.0.0"
    # ... and the accepted sequence survives it: pointing `current` back at the older v1 is refused.
    (models / "current").unlink()
    (models / "current").symlink_to("v1")
    with pytest.raises(PackageError, match="rollback refused"):
        Daemon.from_config(config).start()


def test_rollback_returns_to_the_previous_package_only_and_survives_a_restart(
    tmp_path: Path, clip: Path, mosquitto: Mosquitto
) -> None:
    config, models = _signed_models(tmp_path, clip, mosquitto)
    with subscribed(mosquitto.port, f"{PREFIX}/#") as sub, running(config) as daemon:
        reply = _send_command(mosquitto.port, "rollback", {})
        assert reply["ok"] is False and "no previous model" in reply["error"], reply
        assert _send_command(mosquitto.port, "reload", {"path": "v2"})["ok"] is True
        assert sub.wait_for(
            lambda ss: any(s.get("previous_model", {}).get("version") == "1.0.0" for s in ss),
            10,
            suffix="/status",
        )  # the status names the model serving and the one a rollback would serve
        reply = _send_command(mosquitto.port, "rollback", {})
        assert reply["ok"] is True and reply["result"]["to"]["version"] == "1.0.0", reply
        assert daemon.active is not None and daemon.active.info["version"] == "1.0.0"
        assert sub.wait_for(
            lambda es: any(e["event"] == "model_rolled_back" for e in es), 10, suffix="/events"
        )
    assert os.readlink(models / "current") == "v1"
    # The rollback is the one exemption from the floor (sequence 6): a restart serves v1 again, twice ...
    for _ in range(2):
        with running(config) as daemon:
            assert daemon.active is not None and daemon.active.info["version"] == "1.0.0"
            # ... while any other older package is still refused.
            reply = _send_command(mosquitto.port, "reload", {"path": "older"})
            assert reply["ok"] is False and "rollback refused" in reply["error"], reply


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary (apt install ffmpeg)")
def test_stream_credentials_never_leave_the_source(
    tmp_path: Path,
    clip: Path,
    mosquitto: Mosquitto,
    daemon_config: Callable[..., DaemonConfig],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """One stream that plays (ffmpeg, credentials in its URL) and one RTSP camera that never answers: not
    one MQTT message, log line (Python or OpenCV's own), metric, stats reply or thread name may carry the
    password."""
    import logging

    secret = "s3cr3t-pw"
    port = free_port()
    served = f"http://127.0.0.1:{port}/live.mjpg"
    ffmpeg = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
         "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", served],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    caplog.set_level(logging.DEBUG)
    stream = {"type": "video", "uri": f"http://viewer:{secret}@127.0.0.1:{port}/live.mjpg", "fps": 10}
    dead = {"type": "video", "uri": f"rtsp://admin:{secret}@127.0.0.1:{free_port()}/ch1", "fps": 10}
    for camera in (stream, dead):
        camera.update(open_timeout_s=1, read_timeout_s=1, reconnect_min_s=0.2, reconnect_max_s=0.4)
    config = daemon_config(source=None, sources=[stream, dead], metrics={"port": 0, "addr": "127.0.0.1"})
    try:
        time.sleep(0.3)  # ffmpeg opens its listening socket
        with subscribed(mosquitto.port, "#", client_id="leak-scan") as sub, running(config) as daemon:
            assert sub.wait_for(lambda ms: len(ms) >= 5, 30, suffix="/predictions")
            assert sub.wait_for(lambda es: any(e["event"] == "source_reconnected" for e in es), 30, "/events")
            stats = _send_command(mosquitto.port, "stats", {})
            assert daemon.metrics is not None
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics.port}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
            threads = [thread.name for thread in threading.enumerate()]
            messages = [payload.decode(errors="replace") for _, payload, _ in sub.messages]
    finally:
        ffmpeg.terminate()
        ffmpeg.wait(timeout=5)
    native = capfd.readouterr()
    logged = [record.getMessage() for record in caplog.records]
    assert "viewer:***@127.0.0.1" in json.dumps(stats)  # the sources are named, only without the password
    assert "127.0.0.1" in metrics and messages and logged
    for where, texts in {
        "MQTT message": messages,
        "log line": logged,
        "native output": [native.out, native.err],
        "stats reply": [json.dumps(stats)],
        "metrics": [metrics],
        "thread name": threads,
    }.items():
        leaked = [text for text in texts if secret in text]
        assert not leaked, f"the password reached a {where}: {leaked[0][:300]}"


def test_sensor_windows_piped_into_stdin_are_all_served(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`producer | edge-infer run` with a sensor on "-": a pipe is data, not a live sensor; every window
    written into it becomes a prediction, however fast it was written."""
    from tests.daemon_helpers import make_sensor_package

    make_sensor_package(tmp_path / "models" / "sensor", window=16, channels=2)
    windows = 187
    samples = np.repeat(np.arange(windows, dtype=np.float32), 16)
    config_path = write_config(
        tmp_path / "edge.yaml",
        device_id=DEVICE,
        profile="x86-64-avx2",
        model="models/sensor",
        source={"type": "sensor", "uri": "-", "format": "f32le", "channels": 2, "window": 16},
        mqtt={"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
        outbox={"path": "state/outbox.db"},
        metrics=None,
        exit_on_source_end=True,
    )
    with subscribed(mosquitto.port, f"{PREFIX}/predictions", client_id="stdin-sub") as sub:
        done = subprocess.run(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config_path)],
            input=np.stack([samples, -samples], axis=1).astype("<f4").tobytes(),
            capture_output=True,
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= windows, 20), len(sub.payloads())
        frames = sorted(m["source"]["frame"] for m in sub.payloads())
        assert frames == list(range(windows))
