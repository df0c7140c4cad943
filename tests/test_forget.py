"""`edge-infer forget` and `install.sh --uninstall`: a device's retained topics (Home Assistant discovery,
zone counts, snapshots, status) leave a real mosquitto, so Home Assistant forgets an uninstalled device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from edge.config import load_config
from tests.broker import Mosquitto
from tests.daemon_helpers import running_daemon, subscribed, tracked_clip_config, wait_until

REPO = Path(__file__).resolve().parents[1]
DEVICE = "gate-cam"


def _retained(port: int, topic: str) -> dict[str, bytes]:
    """What a new subscriber is handed as retained on `topic` (mosquitto sends it right after SUBACK)."""
    with subscribed(port, topic, client_id=f"retained-{time.monotonic_ns()}") as sub:
        time.sleep(0.5)
        return {t: p for t, p, retained in sub.messages if retained}


def _write_config(path: Path, tmp_path: Path, port: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tracked_clip_config(tmp_path, port, DEVICE)), encoding="utf-8")
    return path


def _run_daemon_once(config_path: Path, port: int) -> None:
    with running_daemon(load_config(config_path)) as daemon:
        assert wait_until(daemon.sources_done.is_set, 60), daemon.stats()
        assert wait_until(lambda: len(_retained(port, "homeassistant/#")) > 3, 10)


def _edge_infer_wrapper(tmp_path: Path) -> Path:
    """An `edge-infer` executable for install.sh's --bin: this interpreter running this checkout's CLI."""
    wrapper = tmp_path / "bin" / "edge-infer"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edge.cli "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    return wrapper


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_forget_removes_every_retained_topic_the_daemon_left(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config_path = _write_config(tmp_path / "config.yaml", tmp_path, mosquitto.port)
    _run_daemon_once(config_path, mosquitto.port)
    device = _retained(mosquitto.port, f"edge/{DEVICE}/#")
    assert f"edge/{DEVICE}/status" in device and f"edge/{DEVICE}/driveway/person/snapshot" in device, sorted(
        device
    )
    announced = _retained(mosquitto.port, "homeassistant/#")
    state = tmp_path / "state" / "homeassistant.json"
    assert set(json.loads(state.read_text())["topics"]) == set(announced)

    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "forget", "--config", str(config_path)],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"removed {len(device) + len(announced)} retained topics" in done.stdout
    assert f"({len(announced)} Home Assistant entities)" in done.stdout
    assert _retained(mosquitto.port, "#") == {}
    assert not state.exists()


def test_forget_names_the_broker_it_cannot_reach(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config_path = _write_config(tmp_path / "config.yaml", tmp_path, mosquitto.port)
    text = config_path.read_text().replace(f"port: {mosquitto.port}", "port: 1")
    config_path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "forget", "--config", str(config_path), "--timeout", "2"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("edge-infer forget: error: mqtt 127.0.0.1:1: cannot connect"), line


def test_uninstall_takes_the_device_out_of_home_assistant(tmp_path: Path, mosquitto: Mosquitto) -> None:
    root = tmp_path / "root"
    config_path = _write_config(root / "etc" / "edge-infer" / "config.yaml", tmp_path, mosquitto.port)
    _run_daemon_once(config_path, mosquitto.port)
    assert _retained(mosquitto.port, "homeassistant/#")
    bin_path = _edge_infer_wrapper(tmp_path)
    install = REPO / "systemd" / "install.sh"

    kept = subprocess.run(
        ["bash", str(install), "--root", str(root), "--bin", str(bin_path), "--uninstall"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    assert _retained(mosquitto.port, "homeassistant/#"), "--root without --forget leaves the broker alone"

    removed = subprocess.run(
        ["bash", str(install), "--root", str(root), "--bin", str(bin_path), "--uninstall", "--forget"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert "Home Assistant entities" in removed.stdout
    assert _retained(mosquitto.port, "#") == {}
    assert config_path.is_file()  # config and state are kept without --purge

    # A broker that is gone does not stop an uninstall: it says what to run later.
    config_path.write_text(config_path.read_text().replace(f"port: {mosquitto.port}", "port: 1"))
    offline = subprocess.run(
        ["bash", str(install), "--root", str(root), "--bin", str(bin_path), "--uninstall", "--forget", "--purge"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert "forget --config" in offline.stdout and "when the broker is reachable" in offline.stdout
    assert not config_path.exists()
