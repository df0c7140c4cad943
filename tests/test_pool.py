"""A worker pool on one broker: daemons sharing `pool: {name}` split `{prefix}/pool/{name}/infer` (MQTT 5
shared subscription), and a request a killed member had taken is answered when it returns (it is
acknowledged only once answered, and its session persists)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import DaemonConfig
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, wait_until, write_config

REPO = Path(__file__).resolve().parent.parent
POOL_TOPIC = "edge/pool/yard/infer"


def _jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((24, 32, 3), (10, 10, 240), np.uint8))  # red in BGR
    assert ok
    return data.tobytes()


class App:
    """An MQTT 5 client asking the pool and collecting the answers by correlation data."""

    def __init__(self, port: int) -> None:
        self.topic = f"app/{uuid.uuid4().hex[:8]}"
        self.answers: dict[bytes, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.answers[bytes(message.properties.CorrelationData)] = json.loads(message.payload)

    def ask(self, count: int, start: int = 0) -> list[bytes]:
        sent = []
        for index in range(start, start + count):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.topic
            props.ContentType = "image/jpeg"
            props.CorrelationData = f"q{index}".encode()
            self.client.publish(POOL_TOPIC, _jpeg(), qos=1, properties=props).wait_for_publish(10)
            sent.append(props.CorrelationData)
        return sent

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _member(tmp_path: Path, port: int, name: str) -> Path:
    root = tmp_path / name
    make_tiny_package(root / "models" / "v1")
    return write_config(
        root / "edge.yaml",
        device_id=name,
        profile="x86-64-avx2",
        model="models/v1",
        pool={"name": "yard"},
        requests={"rate_per_s": 1000, "burst": 1000},
        mqtt={"host": "127.0.0.1", "port": port, "qos": 1},
        outbox={"path": "state/outbox.db"},
        metrics=None,
    )


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _online(log: Path) -> bool:
    return "mqtt connected" in log.read_text()


def test_a_pool_splits_requests_and_a_killed_member_answers_its_share_when_it_returns(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    names = ["yard-a", "yard-b", "yard-c"]
    configs = {name: _member(tmp_path, mosquitto.port, name) for name in names}
    logs = {name: tmp_path / f"{name}.log" for name in names}
    procs = {name: _start(configs[name], logs[name]) for name in names}
    app = App(mosquitto.port)
    try:
        assert wait_until(lambda: all(_online(log) for log in logs.values()), 30), {
            n: log.read_text()[-500:] for n, log in logs.items()
        }
        time.sleep(0.5)  # the shared subscriptions follow the connections
        sent = app.ask(60)
        assert wait_until(lambda: len(app.answers) == 60, 30), len(app.answers)
        served_by = collections.Counter(answer["device_id"] for answer in app.answers.values())
        assert set(served_by) == set(names) and min(served_by.values()) >= 5, served_by
        assert all(a["result"]["top_k"][0]["label"] == "red" for a in app.answers.values())

        # A member frozen (it takes its share off the socket but answers nothing), then SIGKILLed:
        # the broker hands what it never acknowledged to it again when it comes back.
        frozen = "yard-b"
        procs[frozen].send_signal(signal.SIGSTOP)
        more = app.ask(30, start=60)
        assert wait_until(lambda: len(app.answers) >= 60 + 15, 30)  # the others answer their share
        procs[frozen].send_signal(signal.SIGKILL)
        procs[frozen].wait(10)
        procs[frozen] = _start(configs[frozen], logs[frozen])
        assert wait_until(lambda: len(app.answers) == 90, 60), sorted(set(more) - set(app.answers))
        assert set(app.answers) == set(sent + more)
    finally:
        app.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_pool_needs_mqtt5_and_a_topic_safe_name() -> None:
    base = {"device_id": "x", "model": "/m"}
    with pytest.raises(ValueError, match="pool needs mqtt.protocol 5"):
        DaemonConfig.model_validate({**base, "pool": {"name": "yard"}, "mqtt": {"protocol": 311}})
    with pytest.raises(ValueError, match="topic level and a share name"):
        DaemonConfig.model_validate({**base, "pool": {"name": "ya/rd"}})
    assert DaemonConfig.model_validate({**base, "pool": {"name": "yard"}}).all_sources == []


def test_a_request_is_acknowledged_only_once_answered(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Taken but not answered when the connection drops: the broker sends it again (an auto-acknowledged
    request would be gone with the worker that took it)."""
    from edge.publish.mqtt import MqttConfig, Publisher
    from edge.publish.outbox import MemoryOutbox
    from edge.publish.requests import InferRequest

    taken: list[InferRequest] = []
    publisher = Publisher(
        MqttConfig(port=mosquitto.port, reconnect_min_s=1, reconnect_max_s=1),
        "yard-slow",
        MemoryOutbox(1 << 20),
        on_request=taken.append,  # takes requests and never answers them
        pool="yard",
    )
    publisher.start()
    app = App(mosquitto.port)
    try:
        assert publisher.wait_connected(10)
        time.sleep(0.3)
        app.ask(1)
        assert wait_until(lambda: len(taken) == 1, 10)
        publisher._client.socket().close()  # the connection dies under it; paho reconnects, same session
        assert wait_until(lambda: len(taken) >= 2, 20), "the unanswered request was not delivered again"
        assert taken[1].reply == taken[0].reply
        taken[1].acknowledge()  # answered now: acknowledged, so never again
        time.sleep(0.5)  # the PUBACK leaves before the connection is cut
        publisher._client.socket().close()
        time.sleep(3)
        assert len(taken) == 2  # one message, acknowledged through its second copy: not sent again
    finally:
        app.close()
        publisher.stop(flush_timeout=0.5)
