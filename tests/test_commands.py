"""Commands on `{prefix}/{device}/cmd/{name}`: validation (pure) and replies through a real mosquitto."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.publish.commands import (
    MAX_COMMAND_BYTES,
    Command,
    CommandRejected,
    dispatch,
    parse_command,
    reply_route,
)
from edge.publish.mqtt import MqttConfig, Publisher
from edge.publish.outbox import Outbox
from tests.broker import Mosquitto
from tests.test_mqtt_publisher import DEVICE, prediction, wait_until

TOPIC = f"edge/{DEVICE}/cmd"


# -- parsing (pure) -----------------------------------------------------------------------------


def test_good_command_parses_with_mqtt5_route() -> None:
    cmd = parse_command(
        f"{TOPIC}/reload",
        b'{"id": 7, "path": "/models/v2"}',
        response_topic="me/replies",
        correlation_data=b"c1",
    )
    assert cmd is not None
    assert cmd.name == "reload" and cmd.args == {"path": "/models/v2"} and cmd.request_id == 7
    assert (cmd.reply.topic, cmd.reply.correlation_data) == ("me/replies", b"c1")
    assert parse_command(f"{TOPIC}/stats", b"{}").args == {}  # type: ignore[union-attr]
    assert parse_command(f"{TOPIC}/reload", b"") is None  # clearing a retained command runs nothing


def test_mqtt311_reply_goes_to_cmd_name_reply() -> None:
    assert reply_route(f"{TOPIC}/stats", None, None).topic == f"{TOPIC}/stats/reply"


@pytest.mark.parametrize(
    ("name", "payload", "retained", "reason"),
    [
        ("reload", b"{not json", False, "not valid JSON"),
        ("reload", b"\xff\xfe", False, "not valid JSON"),
        ("reload", b"[1, 2]", False, "must be a JSON object"),
        ("reload", b"{}", True, "retained"),
        ("reload", b'{"pad": "' + b"x" * MAX_COMMAND_BYTES + b'"}', False, "limit is"),
        ("format_disk", b"{}", False, "unknown command 'format_disk'"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(
    name: str, payload: bytes, retained: bool, reason: str
) -> None:
    with pytest.raises(CommandRejected, match=reason) as info:
        parse_command(f"{TOPIC}/{name}", payload, retained=retained)
    assert str(info.value).startswith(f"{TOPIC}/{name}: ")  # names the topic
    assert info.value.reply.topic == f"{TOPIC}/{name}/reply"


def test_dispatch_turns_handler_errors_into_error_replies() -> None:
    def boom(_args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("checksum mismatch")

    cmd = Command("reload", {}, reply_route(f"{TOPIC}/reload", None, None), request_id="r1")
    assert json.loads(dispatch(cmd, {"reload": boom})) == {
        "command": "reload", "ok": False, "id": "r1", "error": "checksum mismatch",
    }  # fmt: skip
    assert json.loads(dispatch(cmd, {"reload": lambda args: {"swapped": True}}))["result"] == {
        "swapped": True
    }
    assert json.loads(dispatch(cmd, {}))["ok"] is False


# -- through a real broker ----------------------------------------------------------------------


class Requester:
    """A separate client that sends commands and collects replies (MQTT 5 or 3.1.1)."""

    def __init__(self, port: int, protocol: paho.MQTTProtocolVersion) -> None:
        self.replies: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.protocol = protocol
        self.reply_topic = f"requester/{uuid.uuid4().hex[:6]}/replies"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        ready = threading.Event()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            with self.lock:
                self.replies.append(msg)

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(self.reply_topic, 1), (f"{TOPIC}/+/reply", 1)])
        assert ready.wait(10)

    def send(self, name: str, payload: bytes, correlation: bytes | None = None, retain: bool = False) -> None:
        props = None
        if self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(f"{TOPIC}/{name}", payload, 1, retain, props).wait_for_publish(5)

    def reply_for(self, correlation: bytes) -> dict[str, Any]:
        def find() -> paho.MQTTMessage | None:
            with self.lock:
                for msg in self.replies:
                    if getattr(msg.properties, "CorrelationData", None) == correlation:
                        return msg
            return None

        wait_until(lambda: find() is not None, 10, f"the reply to {correlation!r}")
        msg = find()
        assert msg is not None and msg.topic == self.reply_topic
        return dict(json.loads(msg.payload))

    def replies_on(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(m.payload) for m in self.replies if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Handlers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def reload(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("reload", args))
        if args.get("path") == "/broken":
            raise ValueError("golden self-check failed; kept the old model")
        return {"swapped": True, "path": args.get("path")}

    def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("stats", args))
        return {"frames_in": 12}

    def table(self) -> dict[str, Any]:
        return {"reload": self.reload, "stats": self.stats}


def start_publisher(broker: Mosquitto, tmp_path: Path, protocol: int, handlers: Handlers) -> Publisher:
    config = MqttConfig(port=broker.port, protocol=protocol)
    publisher = Publisher(
        config, DEVICE, Outbox(tmp_path / f"outbox-{protocol}.db"), on_command=handlers.table()
    )
    publisher.start()
    assert publisher.wait_connected(10)
    return publisher


def test_mqtt5_commands_reply_with_correlation_and_bad_ones_change_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # a retained command left on the broker must not run when the daemon (re)subscribes
    requester = Requester(mosquitto.port, paho.MQTTv5)
    requester.send("reload", b'{"path": "/stale"}', correlation=b"retained", retain=True)
    handlers = Handlers()
    publisher = start_publisher(mosquitto, tmp_path, 5, handlers)
    try:
        assert "retained" in requester.reply_for(b"retained")["error"]
        requester.send("reload", b"", retain=True)  # clear the retained message

        requester.send("reload", b"{oops", correlation=b"bad-json")
        assert "not valid JSON" in requester.reply_for(b"bad-json")["error"]
        requester.send("reload", b'{"p": "' + b"x" * (MAX_COMMAND_BYTES + 1) + b'"}', correlation=b"big")
        assert "limit is" in requester.reply_for(b"big")["error"]
        requester.send("shutdown", b"{}", correlation=b"unknown")
        assert "unknown command" in requester.reply_for(b"unknown")["error"]
        requester.send("selfcheck", b"{}", correlation=b"no-handler")
        assert requester.reply_for(b"no-handler")["ok"] is False
        assert handlers.calls == []  # nothing ran

        requester.send("reload", b'{"path": "/broken", "id": 3}', correlation=b"raises")
        reply = requester.reply_for(b"raises")
        assert reply == {
            "command": "reload",
            "ok": False,
            "id": 3,
            "error": "golden self-check failed; kept the old model",
        }

        # the loop survived the raising handler: commands and predictions still flow
        requester.send("stats", b'{"id": "s1"}', correlation=b"good")
        assert requester.reply_for(b"good") == {
            "command": "stats",
            "ok": True,
            "id": "s1",
            "result": {"frames_in": 12},
        }
        publisher.outbox.add(prediction(0))
        wait_until(lambda: publisher.stats["acked"] == 1, 10, "a prediction after the commands")
        assert handlers.calls == [("reload", {"path": "/broken"}), ("stats", {})]
        assert publisher.stats["commands_rejected"] == 4  # selfcheck is known, it just has no handler
    finally:
        publisher.stop()
        publisher.outbox.close()
        requester.close()


def test_mqtt311_commands_reply_on_cmd_name_reply(mosquitto: Mosquitto, tmp_path: Path) -> None:
    handlers = Handlers()
    publisher = start_publisher(mosquitto, tmp_path, 311, handlers)
    requester = Requester(mosquitto.port, paho.MQTTv311)
    try:
        requester.send("reload", b'{"path": "/models/v2"}')
        wait_until(lambda: bool(requester.replies_on(f"{TOPIC}/reload/reply")), 10, "the 3.1.1 reply")
        assert requester.replies_on(f"{TOPIC}/reload/reply") == [
            {"command": "reload", "ok": True, "result": {"swapped": True, "path": "/models/v2"}}
        ]
        requester.send("reload", b"[]")
        wait_until(lambda: len(requester.replies_on(f"{TOPIC}/reload/reply")) == 2, 10, "the error reply")
        assert requester.replies_on(f"{TOPIC}/reload/reply")[1]["ok"] is False
        assert handlers.calls == [("reload", {"path": "/models/v2"})]
    finally:
        publisher.stop()
        publisher.outbox.close()
        requester.close()


@pytest.mark.parametrize("protocol", [5, 311])
def test_persistent_session_delivers_commands_sent_while_offline(
    mosquitto: Mosquitto, tmp_path: Path, protocol: int
) -> None:
    handlers = Handlers()
    first = start_publisher(mosquitto, tmp_path, protocol, handlers)
    first.stop()
    first.outbox.close()
    version = paho.MQTTv5 if protocol == 5 else paho.MQTTv311
    requester = Requester(mosquitto.port, version)
    requester.send("stats", b'{"id": "while-offline"}', correlation=b"offline")
    # same client_id, clean_start/clean_session false: the broker kept the subscription and the command
    config = MqttConfig(port=mosquitto.port, protocol=protocol)
    second = Publisher(config, DEVICE, Outbox(tmp_path / "second.db"), on_command=handlers.table())
    second.start()
    try:
        if protocol == 5:
            assert requester.reply_for(b"offline")["id"] == "while-offline"
        else:
            wait_until(lambda: bool(requester.replies_on(f"{TOPIC}/stats/reply")), 10, "the 3.1.1 reply")
        assert handlers.calls == [("stats", {})]
    finally:
        second.stop()
        second.outbox.close()
        requester.close()
