"""MQTT command payloads (edge/publish/commands.py): any bytes are a command or an error reply.

The pure property runs `parse_command` on random bytes, JSON of random shape, NaN/Infinity and
oversized payloads; the broker property sends hostile payloads through a real mosquitto to a real
`Publisher` and checks that each gets one error reply and that no handler ran.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.publish.commands import (
    COMMAND_NAMES,
    MAX_COMMAND_BYTES,
    Command,
    CommandRejected,
    dispatch,
    parse_command,
    rejection_reply,
)
from edge.publish.mqtt import Publisher
from tests.broker import Mosquitto
from tests.fuzz.support import TEST_TIMEOUT_S, assert_clear_error, fuzz_settings, no_hang
from tests.test_commands import TOPIC, Handlers, Requester, start_publisher
from tests.test_mqtt_publisher import wait_until

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
NAMES = st.one_of(st.sampled_from(COMMAND_NAMES), st.text("abcxyz_-.", min_size=1, max_size=10))
PAYLOADS = st.one_of(
    st.binary(max_size=256),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5).map(
        lambda value: json.dumps(value).encode()
    ),
    st.sampled_from(
        [
            b'{"id": NaN}',
            b'{"a": Infinity}',
            b'{"id": -Infinity, "x": 1}',
            b"[" * 30000,
            b'{"a":' * 20000,
            b"1" * 5000,
            b'{"id": ' + b"9" * 4000 + b"}",
            b"\xef\xbb\xbf{}",
            '{"a": 1}'.encode("utf-16"),
            b'{"a": "\\ud800"}',
            b" ",
            b"{}" + b" " * (MAX_COMMAND_BYTES - 1),
            b"x" * (MAX_COMMAND_BYTES + 1),
        ]
    ),
)


def strict_json(raw: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"reply holds {name}: not JSON")

    return json.loads(raw, parse_constant=refuse)


@fuzz_settings(200)
@given(NAMES, PAYLOADS, st.booleans(), st.one_of(st.none(), st.just("me/replies")))
@example("stats", b"[" * 30000, False, None).via("regression: deep nesting raised RecursionError, no reply")
@example("stats", b'{"id": NaN}', False, None).via(
    "regression: NaN id echoed back made the reply invalid JSON"
)
def test_any_payload_is_a_command_or_a_clear_rejection(
    name: str, payload: bytes, retained: bool, response_topic: str | None
) -> None:
    topic = f"{TOPIC}/{name}"
    calls: list[dict[str, Any]] = []
    handlers = {known: (lambda args, _n=known: calls.append(args) or {"ran": _n}) for known in COMMAND_NAMES}
    with no_hang():
        try:
            command = parse_command(topic, payload, retained=retained, response_topic=response_topic)
        except CommandRejected as exc:
            assert_clear_error(exc, topic)
            reply = strict_json(rejection_reply(exc))
            assert reply["ok"] is False and reply["command"] == name and reply["error"]
            assert exc.reply.topic == (response_topic or f"{topic}/reply")
            return
    assert not retained and len(payload) <= MAX_COMMAND_BYTES
    if command is None:
        assert payload == b""
        return
    assert isinstance(command, Command) and command.name in COMMAND_NAMES
    assert isinstance(command.args, dict) and "id" not in command.args
    reply = strict_json(dispatch(command, handlers))
    assert reply["ok"] is True and calls == [command.args]


def test_oversized_is_rejected_before_parsing() -> None:
    with pytest.raises(CommandRejected) as info:
        parse_command(f"{TOPIC}/stats", b"{" + b" " * MAX_COMMAND_BYTES + b"}")
    assert_clear_error(info.value, f"{TOPIC}/stats", "limit")


# -- through a real broker ----------------------------------------------------------------------------


class Rig:
    def __init__(self, broker: Mosquitto, publisher: Publisher, handlers: Handlers, requester: Requester):
        self.broker, self.publisher, self.handlers, self.requester = broker, publisher, handlers, requester


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir: Path = tmp_path_factory.mktemp("fuzz-commands")
    broker = Mosquitto(workdir / "broker").start()
    handlers = Handlers()
    publisher = start_publisher(broker, workdir, 5, handlers)
    requester = Requester(broker.port, paho.MQTTv5)
    try:
        yield Rig(broker, publisher, handlers, requester)
    finally:
        requester.close()
        publisher.stop(1.0)
        broker.stop()


BAD_PAYLOADS = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda raw: not raw.strip().startswith(b"{")),
    JSON_VALUES.filter(lambda value: not isinstance(value, dict)).map(
        lambda value: json.dumps(value).encode()
    ),
    st.sampled_from([b'{"id": NaN}', b"[" * 30000, b"x" * (MAX_COMMAND_BYTES + 1), b'{"a": 1', b"{}{}"]),
)


@fuzz_settings(40, costly=True)
@given(st.sampled_from(["reload", "stats"]), BAD_PAYLOADS)
def test_hostile_payloads_through_the_broker_get_an_error_and_change_nothing(
    rig: Rig, name: str, payload: bytes
) -> None:
    rejected_before = rig.publisher.stats["commands_rejected"]
    correlation = uuid.uuid4().bytes
    rig.requester.send(name, payload, correlation)
    reply = rig.requester.reply_for(correlation)
    assert reply["ok"] is False and reply["command"] == name and "\n" not in reply["error"]
    wait_until(
        lambda: rig.publisher.stats["commands_rejected"] == rejected_before + 1, 10, "the rejection count"
    )
    assert rig.handlers.calls == [], "a rejected command ran a handler"
