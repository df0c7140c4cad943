"""The MQTT publisher against a real mosquitto, watched by a separate paho subscriber.

Every received prediction is validated against the shipped JSON Schema; seqs are counted to prove that
nothing is lost (duplicates are allowed, bounded by the in-flight window).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.publish.mqtt import MqttConfig, Publisher
from edge.publish.outbox import Outbox
from edge.publish.payload import build_prediction, prediction_schema
from tests.broker import Mosquitto

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = jsonschema.Draft202012Validator(prediction_schema())
DEVICE = "cam-01"
BOOT = str(uuid.uuid4())


def prediction(frame: int) -> dict[str, Any]:
    now = time.time()
    return build_prediction(
        device_id=DEVICE,
        boot_id=BOOT,
        ts=now,
        source={"uri": "file:///clip.mp4", "frame": frame, "captured_at": now - 0.01},
        model={"name": "tiny", "version": "1", "sha256": hashlib.sha256(b"tiny").hexdigest()},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 9.1, "preprocess": 0.8, "inference": 6.2, "postprocess": 0.1},
        result={"type": "classification", "top_k": [{"label": "tabby", "index": 281, "score": 0.71}]},
    )


def _eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Subscriber:
    """A separate paho client with a persistent session, so it misses nothing across broker restarts."""

    def __init__(
        self, port: int, topic: str = "edge/#", protocol: paho.MQTTProtocolVersion = paho.MQTTv5
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.reconnect_delay_set(1, 1)
        self.topic = topic

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(self.topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            with self.lock:
                self.messages.append(msg)

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber did not subscribe"

    def on(self, suffix: str) -> list[paho.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def seqs(self) -> list[int]:
        return [json.loads(m.payload)["seq"] for m in self.on("/predictions")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


def make_publisher(
    broker: Mosquitto, outbox: Outbox, protocol: int = 5, qos: int = 1, **extra: Any
) -> Publisher:
    config = MqttConfig(host="127.0.0.1", port=broker.port, protocol=protocol, qos=qos, **extra)
    return Publisher(config, DEVICE, outbox, status={"model": "tiny", "provider": "CPUExecutionProvider"})


def test_predictions_arrive_valid_in_order_with_properties(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = make_publisher(mosquitto, outbox)
    publisher.start()
    assert publisher.wait_connected(10)
    total = 500
    for frame in range(total):
        outbox.add(prediction(frame))
    publisher.notify()
    wait_until(lambda: len(subscriber.seqs()) >= total, 20, "all predictions")
    wait_until(lambda: outbox.depth == 0, 10, "the outbox to drain")
    received = subscriber.on("/predictions")
    assert [json.loads(m.payload)["seq"] for m in received] == list(range(1, total + 1))
    for msg in received:
        VALIDATOR.validate(json.loads(msg.payload))
        assert msg.qos == 1
    props = received[0].properties
    assert getattr(props, "ContentType", None) == "application/json"
    assert ("schema", "edge.prediction/1") in getattr(props, "UserProperty", [])
    assert 0 < getattr(props, "MessageExpiryInterval", 0) <= 24 * 3600
    wait_until(lambda: publisher.stats["acked"] == total, 5, "the ack counter")
    assert publisher.stats["inflight"] == 0

    # status online is retained: a late subscriber gets it with the retain flag and the daemon's dict
    late = Subscriber(mosquitto.port, topic=f"edge/{DEVICE}/status")
    wait_until(lambda: bool(late.on("/status")), 10, "retained status")
    status = late.on("/status")[0]
    assert status.retain
    assert json.loads(status.payload) | {"ts": None, "since": None} == {
        "state": "online", "device_id": DEVICE, "ts": None, "since": None, "model": "tiny", "provider": "CPUExecutionProvider",
    }  # fmt: skip
    late.close()

    publisher.publish_event("model_swapped", {"to": "v2"})
    wait_until(lambda: bool(subscriber.on("/events")), 10, "the event")
    event = json.loads(subscriber.on("/events")[0].payload)
    assert event["event"] == "model_swapped" and event["data"] == {"to": "v2"}

    publisher.stop()
    wait_until(lambda: json.loads(subscriber.on("/status")[-1].payload)["state"] == "offline", 10, "offline")
    assert json.loads(subscriber.on("/status")[-1].payload)["reason"] == "stopped"
    outbox.close()


@pytest.mark.parametrize(("protocol", "qos"), [(311, 1), (5, 2), (5, 0), (311, 2)])
def test_protocols_and_qos(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path, protocol: int, qos: int
) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = make_publisher(mosquitto, outbox, protocol=protocol, qos=qos)
    publisher.start()
    assert publisher.wait_connected(10)
    for frame in range(200):
        outbox.add(prediction(frame))
    wait_until(lambda: len(subscriber.seqs()) >= 200, 20, "all predictions")
    wait_until(lambda: outbox.depth == 0, 10, "the outbox to drain")
    assert subscriber.seqs() == list(range(1, 201))
    publisher.stop()
    outbox.close()


@pytest.mark.parametrize("outage", ["stop", "freeze-then-kill"])
def test_broker_down_for_seconds_loses_nothing(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path, outage: str
) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = make_publisher(mosquitto, outbox, inflight_window=100)
    publisher.start()
    assert publisher.wait_connected(10)
    stop = threading.Event()
    producing = threading.Event()
    producing.set()
    added: list[int] = []

    def produce() -> None:  # the inference worker keeps going whatever the broker does
        frame = 0
        while not stop.is_set():
            if producing.wait(0.1):
                added.append(outbox.add(prediction(frame)))
                frame += 1
                time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: len(subscriber.seqs()) > 100, 10, "traffic before the outage")
        if outage == "stop":
            mosquitto.stop()  # SIGTERM: the broker saves its sessions, so what it acked reaches the subscriber
        else:
            # a frozen broker swallows a window of publishes without PUBACK, then dies with them:
            # only the publisher's re-send of its in-flight window can save those
            # what the broker acked before the freeze must be with the subscriber and in the broker's
            # autosave (every 1 s), else the broker itself would lose it when killed
            producing.clear()
            time.sleep(0.1)
            wait_until(lambda: set(added) <= set(subscriber.seqs()), 10, "the subscriber to catch up")
            time.sleep(1.5)
            mosquitto.pause()
            producing.set()
            wait_until(lambda: publisher.stats["inflight"] >= 100, 10, "a full in-flight window")
            mosquitto.stop(signal.SIGKILL)
        wait_until(lambda: not publisher.connected, 10, "the publisher to notice")
        during = len(added)
        time.sleep(3)
        assert len(added) > during + 100  # the outbox kept accepting while disconnected
        assert outbox.depth > 100
        mosquitto.start()
        wait_until(lambda: publisher.connected, 15, "the reconnect")
        time.sleep(0.5)
    finally:
        stop.set()
        producer.join(10)
    wait_until(lambda: set(added) <= set(subscriber.seqs()), 30, "every prediction after the outage")
    wait_until(lambda: outbox.depth == 0, 10, "the outbox to drain")
    seqs = subscriber.seqs()
    assert set(seqs) == set(range(1, len(added) + 1))  # 0 missing
    # the publisher re-sends its un-acked window after the reconnect (<= 100); the broker may also
    # redeliver what it had in flight to the subscriber's persistent session
    assert len(seqs) - len(set(seqs)) <= 200
    print(f"outage: {len(added)} added, {len(seqs) - len(set(seqs))} duplicates, stats {publisher.stats}")
    assert publisher.stats["reconnects"] >= 1
    publisher.stop()
    outbox.close()


def test_outbox_bound_drops_exactly_what_is_missing(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=100_000)
    total = 1000
    for frame in range(total):  # the broker is unreachable meanwhile: nothing is published yet
        outbox.add(prediction(frame))
    assert outbox.dropped > 0
    publisher = make_publisher(mosquitto, outbox)
    publisher.start()
    wait_until(lambda: outbox.depth == 0, 20, "the outbox to drain")
    wait_until(lambda: len(subscriber.seqs()) >= total - outbox.dropped, 10, "the backlog")
    seqs = subscriber.seqs()
    missing = set(range(1, total + 1)) - set(seqs)
    assert len(missing) == outbox.dropped
    assert missing == set(range(1, outbox.dropped + 1))  # the oldest went, oldest-first drain after
    assert seqs == sorted(seqs)
    publisher.stop()
    outbox.close()


def test_rows_dropped_while_in_flight_but_delivered_are_not_counted_lost(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path
) -> None:
    window = 50
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=60_000)  # about 100 predictions
    publisher = make_publisher(mosquitto, outbox, inflight_window=window)
    publisher.start()
    assert publisher.wait_connected(10)
    # the broker must have saved the subscriber's session before it is killed, or what the publisher
    # re-sends first after the restart reaches no session (seen: seqs 1 and 2 lost that way)
    saved = mosquitto.workdir / "mosquitto.db"
    since = time.time()
    assert _eventually(lambda: saved.is_file() and saved.stat().st_mtime > since, 10), "no autosave"
    mosquitto.pause()  # frozen: takes publishes into its socket, acknowledges nothing
    for frame in range(window):
        outbox.add(prediction(frame))
    wait_until(lambda: publisher.stats["inflight"] == window, 10, "a full in-flight window")
    total = 400
    for frame in range(window, total):
        outbox.add(prediction(frame))
    assert outbox.dropped >= window  # the bound dropped the in-flight rows too
    mosquitto.stop(signal.SIGKILL)
    mosquitto.start()
    wait_until(lambda: outbox.depth == 0 and publisher.stats["inflight"] == 0, 30, "the drain")
    if not _eventually(lambda: len(set(subscriber.seqs())) >= total - outbox.dropped, 30):
        got = set(subscriber.seqs())
        raise AssertionError(
            f"survivors: got {len(got)} of {total - outbox.dropped}; dropped {outbox.dropped}; "
            f"missing {sorted(set(range(1, total + 1)) - got)[:80]}; stats {publisher.stats}"
        )
    received = set(subscriber.seqs())
    assert set(range(1, window + 1)) <= received  # paho re-sent the in-flight window after all
    missing = set(range(1, total + 1)) - received
    assert len(missing) == outbox.dropped  # dropped counts exactly what is lost
    publisher.stop()
    outbox.close()


PUBLISHER_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.test_mqtt_publisher import make_publisher_for_port, prediction
from edge.publish.outbox import Outbox
port, db, count, delay = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
outbox = Outbox(db)
publisher = make_publisher_for_port(port, outbox)
publisher.start()
publisher.wait_connected(10)
print("connected", flush=True)
for frame in range(count):
    outbox.add(prediction(frame))
    time.sleep(delay)
publisher.stop(flush_timeout=10)
outbox.close()
print("done", flush=True)
"""


def make_publisher_for_port(port: int, outbox: Outbox) -> Publisher:
    config = MqttConfig(host="127.0.0.1", port=port, inflight_window=200)
    return Publisher(config, DEVICE, outbox, status={"model": "tiny"})


def run_publisher(port: int, db: Path, count: int, delay: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", PUBLISHER_SCRIPT, str(REPO), str(port), str(db), str(count), str(delay)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_sigkilled_publisher_sends_will_and_restart_continues_seq(
    mosquitto: Mosquitto, subscriber: Subscriber, tmp_path: Path
) -> None:
    db = tmp_path / "outbox.db"
    first = run_publisher(mosquitto.port, db, count=100_000, delay=0.001)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "connected"
        wait_until(lambda: len(subscriber.seqs()) > 300, 20, "traffic from the first process")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    wait_until(
        lambda: any(json.loads(m.payload)["state"] == "offline" for m in subscriber.on("/status")),
        10,
        "the Last Will",
    )
    will = [
        json.loads(m.payload) for m in subscriber.on("/status") if json.loads(m.payload)["state"] == "offline"
    ]
    assert will[0]["reason"] == "connection lost"
    # The will names the connection it ends: the same `since` as the `online` it replaces, so a
    # subscriber can order them although the will was written when that connection was made.
    online = [
        json.loads(m.payload) for m in subscriber.on("/status") if json.loads(m.payload)["state"] == "online"
    ]
    assert online and will[0]["since"] == online[-1]["since"]
    late = Subscriber(mosquitto.port, topic=f"edge/{DEVICE}/status")  # the will is retained
    wait_until(lambda: bool(late.on("/status")), 10, "the retained will")
    assert late.on("/status")[0].retain and json.loads(late.on("/status")[0].payload)["state"] == "offline"
    late.close()
    before = max(subscriber.seqs())

    second = run_publisher(mosquitto.port, db, count=100, delay=0.0)
    try:
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    with Outbox(db) as outbox:
        last = outbox.next_seq - 1
        assert outbox.depth == 0
    wait_until(lambda: set(range(1, last + 1)) <= set(subscriber.seqs()), 20, "every seq of both runs")
    seqs = subscriber.seqs()
    assert last > before
    assert set(seqs) == set(range(1, last + 1))  # seq continued across the restart, nothing lost
    assert len(seqs) - len(set(seqs)) <= 200  # re-sent window of the killed process at most


@pytest.mark.parametrize("secret_from", ["password_file", "environment"])
def test_username_and_password_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret_from: str
) -> None:
    passwords = tmp_path / "broker-passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "cam-01", "s3cret"], check=True)
    broker = Mosquitto(
        tmp_path / "broker", extra_config=f"allow_anonymous false\npassword_file {passwords}"
    ).start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)  # the publisher refuses a password file other users can read
    monkeypatch.delenv("EDGE_MQTT_PASSWORD", raising=False)
    if secret_from == "environment":
        monkeypatch.setenv("EDGE_MQTT_PASSWORD", "s3cret")
        extra: dict[str, Any] = {}
    else:
        extra = {"password_file": secret}
    outbox = Outbox(tmp_path / "outbox.db")
    publisher = make_publisher(broker, outbox, username="cam-01", **extra)
    bad_secret = tmp_path / "wrong-password"
    bad_secret.write_text("guess\n")
    bad_secret.chmod(0o600)
    wrong = make_publisher(
        broker,
        Outbox(tmp_path / "other.db"),
        username="cam-01",
        client_id="intruder",
        password_file=bad_secret,
    )
    try:
        publisher.start()
        wrong.start()
        assert publisher.wait_connected(10)
        outbox.add(prediction(0))
        wait_until(lambda: publisher.stats["acked"] == 1, 10, "the PUBACK")
        assert not wrong.connected and wrong.stats["connects"] == 0  # wrong password: refused
    finally:
        publisher.stop()
        wrong.stop(flush_timeout=0)
        outbox.close()
        broker.stop()


def test_unreadable_password_file_names_the_field(tmp_path: Path) -> None:
    from edge.errors import ConfigError

    config = MqttConfig(username="cam-01", password_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"mqtt.password_file: .*missing"):
        Publisher(config, DEVICE, Outbox(tmp_path / "outbox.db"))


def test_config_accepts_protocol_spellings_and_rejects_unknown_keys() -> None:
    from pydantic import ValidationError

    assert MqttConfig(protocol="3.1.1").protocol == 311
    assert MqttConfig(protocol=5).protocol == 5
    with pytest.raises(ValidationError):
        MqttConfig(hostname="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        MqttConfig(topic_prefix="edge/#")
