"""Why the publisher cannot connect is logged once per change, counted by reason and shown in stats;
a second daemon with the same client id is named instead of flapping with 'Unspecified error'."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pytest

from edge.health import Metrics, StatsSnapshot
from edge.publish.mqtt import MqttConfig, Publisher
from edge.publish.outbox import Outbox
from tests.broker import Mosquitto, free_port
from tests.daemon_helpers import wait_until

DEVICE = "cam-01"


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_a_refused_port_is_logged_once_and_counted_on_every_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.publish.mqtt")
    port = free_port()  # nothing listens here
    publisher = Publisher(
        MqttConfig(port=port, reconnect_min_s=1, reconnect_max_s=1), DEVICE, Outbox(tmp_path / "o.db")
    )
    publisher.start()
    try:
        assert wait_until(lambda: publisher.connect_failures["refused"] >= 3, 15)
        logged = _warnings(caplog, "cannot connect")
        assert len(logged) == 1, logged
        assert (
            f"127.0.0.1:{port}" in logged[0] and "refused" in logged[0] and "edge-infer-cam-01" in logged[0]
        )
        stats = publisher.stats
        assert stats["connect_failures"] >= 3 and str(stats["last_connect_error"]).startswith("refused: ")
        # The same counts reach Prometheus.
        metrics = Metrics(lambda: StatsSnapshot(mqtt_connect_failures=dict(publisher.connect_failures)))
        text = metrics.render().decode()
        assert 'edge_mqtt_connect_failures_total{reason="refused"}' in text
    finally:
        publisher.stop(flush_timeout=0.2)
        publisher.outbox.close()


def test_bad_credentials_are_an_auth_failure_logged_once_then_a_good_connection_clears_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.publish.mqtt")
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), DEVICE, "right"], check=True)
    broker = Mosquitto(
        tmp_path / "broker", extra_config=f"allow_anonymous false\npassword_file {passwords}"
    ).start()
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    config = MqttConfig(
        port=broker.port, username=DEVICE, password_file=secret, reconnect_min_s=1, reconnect_max_s=1
    )
    publisher = Publisher(config, DEVICE, Outbox(tmp_path / "o.db"))
    publisher.start()
    try:
        assert wait_until(lambda: publisher.connect_failures["auth"] >= 2, 15)
        logged = _warnings(caplog, "cannot connect")
        assert len(logged) == 1 and "auth: the broker refused the connection" in logged[0], logged
        assert not publisher.connected
    finally:
        publisher.stop(flush_timeout=0.2)
        publisher.outbox.close()
        broker.stop()


@pytest.mark.parametrize("protocol", [5, 311])
def test_two_daemons_with_one_client_id_are_named_once(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture, protocol: int
) -> None:
    caplog.set_level(logging.INFO, logger="edge.publish.mqtt")
    config = MqttConfig(port=mosquitto.port, protocol=protocol, reconnect_min_s=1, reconnect_max_s=1)
    first = Publisher(config, DEVICE, Outbox(tmp_path / "a.db"))
    second = Publisher(config, DEVICE, Outbox(tmp_path / "b.db"))
    first.start()
    assert first.wait_connected(10)
    second.start()
    try:
        assert wait_until(
            lambda: first.stats["session_takeovers"] + second.stats["session_takeovers"] >= 1, 30
        )
        time.sleep(3)  # a few more rounds of knocking each other off
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        named = [m for m in errors if "client id 'edge-infer-cam-01'" in m and "taking over" in m]
        assert 1 <= len(named) <= 2, errors  # once per publisher at most
        flapping = [m for m in _warnings(caplog, "disconnected") if "Unspecified error" in m]
        assert len(flapping) <= TAKEOVER_TOLERANCE, flapping
    finally:
        for publisher in (first, second):
            publisher.stop(flush_timeout=0.2)
            publisher.outbox.close()


# MQTT 3.1.1 has no takeover reason: the streak that identifies one logs a couple of plain disconnects first.
TAKEOVER_TOLERANCE = 4


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_doctor_config_tries_the_broker_as_the_daemon_would_and_says_what_failed(tmp_path: Path) -> None:
    from tests.daemon_helpers import make_tiny_package, write_config

    make_tiny_package(tmp_path / "models" / "current")
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), DEVICE, "right"], check=True)
    broker = Mosquitto(
        tmp_path / "broker", extra_config=f"allow_anonymous false\npassword_file {passwords}"
    ).start()
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)

    def config(port: int) -> Path:
        return write_config(
            tmp_path / "edge.yaml",
            device_id=DEVICE,
            profile="x86-64-avx2",
            model="models/current",
            source={"type": "video", "uri": "rtsp://cam/stream"},
            mqtt={"host": "127.0.0.1", "port": port, "username": DEVICE, "password_file": str(secret)},
            outbox={"path": "state/outbox.db"},
            metrics=None,
        )

    try:
        done = _doctor(config(broker.port))
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"broker       127.0.0.1:{broker.port}: FAILED (auth): the broker refused" in done.stdout
        assert "package      tiny-colour 1.0.0" in done.stdout  # the config's package was self-checked

        refused = free_port()
        done = _doctor(config(refused))
        assert done.returncode == 1
        assert f"broker       127.0.0.1:{refused}: FAILED (refused)" in done.stdout, done.stdout

        secret.write_text("right\n")
        done = _doctor(config(broker.port))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"broker       127.0.0.1:{broker.port}: connected" in done.stdout
        assert "config       warning: source.uri: video source rtsp://cam/stream: a stream" in done.stdout
    finally:
        broker.stop()
