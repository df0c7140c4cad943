"""A package shipped as a `.tar` is served as it is by `run`, `reload`, `bench`, `doctor` and
`check-config`: unpacked safely into the models directory (or, for bench/doctor, a temporary one)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from edge.errors import PackageError
from edge.package import extract_archive, unpack_into
from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, subscribed, wait_until, write_config

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cam-tar"


def _tar(package: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        tar.add(package, arcname=package.name)
    return archive


def _cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *arguments], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_bench_doctor_and_check_config_take_a_tar_and_leave_nothing_behind(tmp_path: Path) -> None:
    archive = _tar(make_tiny_package(tmp_path / "build" / "tiny"), tmp_path / "tiny.tar")
    before = set(Path(tempfile.gettempdir()).glob("edge-package-*"))

    done = _cli("bench", str(archive), "--seconds", "0.2", "--warmup", "1", "--no-cold-start", "--json")
    assert done.returncode == 0, done.stderr
    assert '"provider"' in done.stdout

    done = _cli("doctor", "--package", str(archive), "--profile", "x86-64-avx2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "package      tiny-colour 1.0.0 on onnxruntime CPUExecutionProvider" in done.stdout
    assert "golden check passed" in done.stdout

    config = write_config(
        tmp_path / "edge.yaml",
        device_id=DEVICE,
        profile="x86-64-avx2",
        model="tiny.tar",
        source={"type": "video", "uri": "rtsp://cam/stream"},
        outbox={"path": "state/outbox.db"},
    )
    done = _cli("check-config", str(config))
    assert done.returncode == 0, done.stderr
    assert "model tiny-colour 1.0.0" in done.stdout
    assert set(Path(tempfile.gettempdir()).glob("edge-package-*")) == before


def test_the_daemon_serves_a_tar_and_reloads_another_into_the_models_directory(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _tar(make_tiny_package(tmp_path / "build" / "v1"), models / "v1.tar")
    _tar(make_tiny_package(tmp_path / "build" / "v2", version="2.0.0", gain=6.0), models / "v2.tar")
    config = write_config(
        tmp_path / "edge.yaml",
        device_id=DEVICE,
        profile="x86-64-avx2",
        model="models/v1.tar",
        source={
            "type": "video",
            "uri": str(labelled_clip().path),
            "realtime": False,
            "fps": 20,
            "loop": True,
        },
        mqtt={"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
        outbox={"path": "state/outbox.db"},
        metrics=None,
    )
    log = tmp_path / "daemon.log"
    with subscribed(mosquitto.port, f"edge/{DEVICE}/#", client_id="tar-sub") as sub:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            assert sub.wait_for(lambda ms: len(ms) >= 3, 30, "/predictions"), log.read_text()
            assert {m["model"]["version"] for m in sub.payloads("/predictions")} == {"1.0.0"}
            import paho.mqtt.client as mqtt

            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tar-cmd")
            client.connect("127.0.0.1", mosquitto.port)
            client.loop_start()
            client.publish(f"edge/{DEVICE}/cmd/reload", '{"path": "v2.tar"}', qos=1).wait_for_publish(10)
            assert sub.wait_for(lambda es: any(e["event"] == "model_swapped" for e in es), 30, "/events")
            assert wait_until(
                lambda: any(m["model"]["version"] == "2.0.0" for m in sub.payloads("/predictions")), 20
            ), log.read_text()
            client.loop_stop()
            client.disconnect()
        finally:
            proc.terminate()
            proc.wait(20)
    unpacked = sorted(p.name for p in models.iterdir() if p.is_dir())
    assert [name.rsplit("-", 1)[0] for name in unpacked] == ["tiny-colour-1.0.0", "tiny-colour-2.0.0"]
    assert not [p for p in models.iterdir() if p.name.startswith(".unpack-")]


def test_unpacking_twice_finds_the_first_copy_and_a_tar_bomb_is_refused(tmp_path: Path) -> None:
    archive = _tar(make_tiny_package(tmp_path / "build" / "tiny"), tmp_path / "tiny.tar")
    first = unpack_into(archive, tmp_path / "models")
    assert unpack_into(archive, tmp_path / "models") == first
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]
    with pytest.raises(PackageError, match=r"unpacks to \d+ bytes \(limit 1000\)"):
        extract_archive(archive, tmp_path / "bomb", max_total_bytes=1000)
    assert not (tmp_path / "bomb").exists()
