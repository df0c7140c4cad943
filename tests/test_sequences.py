"""Stateful models on request: Triton's sequence fields (`sequence_id`, `sequence_start`, `sequence_end`)
over MQTT and the Open Inference Protocol, served by a real daemon, real mosquitto and real ORT sessions.
The accumulator package (tests/test_stateful.py) answers the running sum of its stream, so every number
says whose state a request continued."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge.config import DaemonConfig
from edge.publish.payload import prediction_schema
from edge.publish.sequences import SequenceError, SequenceFlags, SequenceTable, StreamTurns, parse_sequence
from tests.broker import Mosquitto
from tests.daemon_helpers import InferClient, running_daemon, wait_until
from tests.test_stateful import accumulator_package

DEVICE = "acc-req"
TOPIC = f"edge/{DEVICE}/infer"
POOL_TOPIC = "edge/pool/accs/infer"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"sequence_start": True}, "sequence_id", "sequence_start needs sequence_id"),
        ({"sequence_id": 0}, "sequence_id", "positive integer or a string"),
        ({"sequence_id": ""}, "sequence_id", "positive integer or a string"),
        ({"sequence_id": True}, "sequence_id", "positive integer or a string"),
        ({"sequence_id": "x" * 129}, "sequence_id", "1-128 characters"),
        ({"sequence_id": "a", "sequence_end": "yes"}, "sequence_end", "sequence_end must be true or false"),
    ],
)
def test_bad_sequence_fields_name_the_field(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SequenceError, match=message) as caught:
        parse_sequence(fields)
    assert caught.value.field == field


def test_sequence_fields_parse_and_ids_become_strings() -> None:
    assert parse_sequence({"text": "x"}) is None
    assert parse_sequence({"sequence_id": 42, "sequence_start": True}) == SequenceFlags("42", True, False)
    with pytest.raises(SequenceError) as caught:
        parse_sequence({"sequence_end": True}, "parameters.")
    assert caught.value.field == "parameters.sequence_id"


def test_a_sequence_opens_at_its_start_closes_at_its_end_or_when_idle_and_is_bounded() -> None:
    now = [0.0]
    closed: list[str] = []
    table = SequenceTable(idle_s=10, max_open=2, on_close=closed.append, clock=lambda: now[0])
    with pytest.raises(SequenceError, match="'a' is not open") as caught:
        table.admit(SequenceFlags("a"))
    assert caught.value.field == "sequence_start"
    table.admit(SequenceFlags("a", start=True))
    table.admit(SequenceFlags("b", start=True))
    with pytest.raises(SequenceError, match="2 sequences are open"):
        table.admit(SequenceFlags("c", start=True))
    table.admit(SequenceFlags("a", start=True))  # a restart of an open sequence is not a new one
    now[0] = 5
    table.admit(SequenceFlags("a"))
    assert table.is_open("sequence:a") and len(table) == 2
    table.admit(SequenceFlags("a", end=True))
    assert not table.is_open("sequence:a") and closed == []  # its last run forgets the state
    now[0] = 10  # b was last continued at 0: closed as idle, its state forgotten at once
    table.admit(SequenceFlags("c", start=True))
    assert closed == ["sequence:b"] and table.expired == 1 and len(table) == 1
    with pytest.raises(SequenceError, match="idle for more than 10 s"):
        table.admit(SequenceFlags("b"))


def test_a_streams_runs_keep_the_order_their_jobs_were_taken_in_whichever_thread_runs_them() -> None:
    turns = StreamTurns()
    first, second = turns.issue("s"), turns.issue("s")
    other = turns.issue("t")
    ran: list[str] = []

    def run(number: int, name: str) -> None:
        turns.wait("s", number)
        ran.append(name)
        turns.done("s", number)

    late = threading.Thread(target=run, args=(second, "second"))
    late.start()  # the later job's thread comes first: it must wait
    time.sleep(0.2)
    assert ran == []
    turns.wait("t", other)  # another stream is not held up
    turns.done("t", other)
    run(first, "first")
    late.join(5)
    assert ran == ["first", "second"]
    assert turns.issue("s") == 0  # every run done: the stream is forgotten


def _config(tmp_path: Path, port: int) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(accumulator_package(tmp_path / "models" / "v1")),
            "workers": 2,  # two replicas: a sequence's runs must still go in order
            "requests": {"enabled": True, "rate_per_s": 1000, "burst": 1000, "sequence_idle_s": 1.5,
                         "max_sequences": 3},
            "pool": {"name": "accs"},
            "http": {"port": 0},
            "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )  # fmt: skip


def _window(value: float) -> list[list[float]]:
    return [[value] * 4]


def _ask(app: InferClient, body: dict[str, Any], name: str, topic: str | None = None) -> None:
    app.send(json.dumps(body).encode(), correlation=name.encode(), topic=topic)


def _answers(app: InferClient, count: int) -> dict[str, dict[str, Any]]:
    replies = app.wait(count)
    assert len(replies) >= count, replies
    return {correlation.decode(): body for correlation, body in replies if correlation is not None}


def _total(answer: dict[str, Any]) -> float:
    return float(np.asarray(answer["result"]["outputs"][0]["data"]).ravel()[0])


def _http(daemon: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon._http.port}/v2/models/accumulator/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_requests_carry_their_sequences_state_and_requests_without_one_start_from_zero(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    schema = prediction_schema()
    with running_daemon(_config(tmp_path, mosquitto.port)) as daemon:
        assert wait_until(lambda: daemon.publisher.connected, 10)
        time.sleep(0.3)  # the infer subscriptions follow the connection
        app = InferClient(mosquitto.port, mqtt.MQTTv5, TOPIC)
        try:
            # two sequences interleaved and sent at once, served by two workers: each its own running sum
            for step in range(3):
                for name, value in (("a", 1.0), ("b", 10.0)):
                    body: dict[str, Any] = {"inputs": {"x": _window(value)}, "sequence_id": name}
                    body.update(sequence_start=step == 0, sequence_end=name == "b" and step == 2)
                    _ask(app, body, f"{name}{step}")
            _ask(app, {"inputs": {"x": _window(5.0)}}, "alone1")
            answers = _answers(app, 7)
            assert [_total(answers[f"a{i}"]) for i in range(3)] == [2.0, 4.0, 6.0]
            assert [_total(answers[f"b{i}"]) for i in range(3)] == [20.0, 40.0, 60.0]
            assert _total(answers["alone1"]) == 10.0  # no sequence: zero state in ...
            for answer in answers.values():
                jsonschema.validate(answer, schema)
            assert answers["a1"]["request"] == {"sequence_id": "a"}

            _ask(app, {"inputs": {"x": _window(5.0)}}, "alone2")
            _ask(app, {"inputs": {"x": _window(1.0)}, "sequence_id": "b"}, "b-after-end")
            _ask(app, {"inputs": {"x": _window(1.0)}, "sequence_id": "a", "sequence_start": True}, "a-again")
            _ask(
                app,
                {"inputs": {"x": _window(1.0)}, "sequence_id": "p", "sequence_start": True},
                "pool",
                POOL_TOPIC,
            )
            answers = _answers(app, 11)
            assert _total(answers["alone2"]) == 10.0  # ... and nothing kept for the next one
            assert answers["b-after-end"]["field"] == "sequence_start"
            assert "'b' is not open" in answers["b-after-end"]["error"]
            assert _total(answers["a-again"]) == 2.0  # a start resets an open sequence
            assert answers["pool"]["field"] == "sequence_id" and "not to the pool" in answers["pool"]["error"]

            # the Open Inference Protocol names the same fields in `parameters`
            status, first = _http(
                daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_id": 7, "sequence_start": True}}
            )
            assert status == 200 and first["outputs"][0]["data"][0] == 6.0
            status, second = _http(daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_id": 7}})
            assert status == 200 and second["outputs"][0]["data"][0] == 12.0
            status, bad = _http(daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_end": True}})
            assert status == 400 and bad["field"] == "parameters.sequence_id"
            status, _ = _http(
                daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_id": "x", "sequence_start": True}}
            )
            assert status == 200
            status, full = _http(
                daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_id": "y", "sequence_start": True}}
            )
            assert status == 400 and "3 sequences are open" in full["error"]  # a, 7 and x
            assert daemon.stats()["sequences"]["open"] == 3

            time.sleep(1.6)  # every sequence now idle for longer than sequence_idle_s
            status, late = _http(daemon, {"inputs": [_tensor(3.0)], "parameters": {"sequence_id": 7}})
            assert status == 400 and late["field"] == "sequence_start" and "idle" in late["error"]
            assert daemon.stats()["sequences"] == {"open": 0, "expired": 3}
        finally:
            app.close()


def _tensor(value: float) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}
