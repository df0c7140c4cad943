"""edge.client: typed messages, the gap/duplicate tracker, and subscribe() against a real mosquitto."""

from __future__ import annotations

import json
import time

import pytest

from edge.client import (
    Event,
    GapTracker,
    MessageError,
    Prediction,
    Status,
    parse_message,
    parse_prediction,
    subscribe,
)
from tests.broker import Mosquitto
from tests.sink_helpers import Fleet, new_boot, prediction


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


BOOT = "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


def test_a_prediction_parses_into_its_typed_fields() -> None:
    body = json.dumps(prediction("cam-01", BOOT, 17)).encode()
    message = parse_message("edge/cam-01/predictions", body)
    assert isinstance(message, Prediction)
    assert (message.device_id, message.boot_id, message.seq) == ("cam-01", BOOT, 17)
    assert (message.model_name, message.model_version, message.result_type) == (
        "tiny-colour",
        "1.0.0",
        "classification",
    )
    assert message.captured_at is not None and abs(message.captured_at - time.time()) < 5
    assert message.latency_ms["inference"] == 0.5


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.pop("seq"), "edge/cam-01/predictions: seq: missing (not in payload)"),
        (lambda p: p.update(seq="7"), "edge/cam-01/predictions: seq: expected int, got str '7'"),
        (lambda p: p.update(seq=True), "edge/cam-01/predictions: seq: expected int, got bool True"),
        (lambda p: p.update(seq=0), "edge/cam-01/predictions: seq: must be >= 1, got 0"),
        (
            lambda p: p["model"].pop("version"),
            "edge/cam-01/predictions: model.version: missing (not in model)",
        ),
        (
            lambda p: p.update(ts="yesterday"),
            "edge/cam-01/predictions: ts: not an RFC 3339 time: 'yesterday'",
        ),
        (
            lambda p: p.update(device_id="cam-02"),
            "edge/cam-01/predictions: device_id: 'cam-02' is not the topic's 'cam-01'",
        ),
    ],
)
def test_a_bad_prediction_is_one_line_naming_topic_and_field(mutate: object, expected: str) -> None:
    body = prediction("cam-01", BOOT, 17)
    mutate(body)  # type: ignore[operator]
    with pytest.raises(MessageError) as info:
        parse_message("edge/cam-01/predictions", json.dumps(body))
    assert str(info.value) == expected


def test_payloads_that_are_not_json_objects_and_unknown_topics_are_refused() -> None:
    with pytest.raises(MessageError, match=r"^edge/a/predictions: payload is not JSON"):
        parse_prediction(b"{nope", "edge/a/predictions")
    with pytest.raises(MessageError, match=r"payload is a JSON list, not an object"):
        parse_prediction(b"[1]", "edge/a/predictions")
    with pytest.raises(MessageError, match=r"not UTF-8"):
        parse_prediction(b"\xff\xfe", "edge/a/predictions")
    with pytest.raises(MessageError, match=r"'cmd/reload' is not predictions, status or events"):
        parse_message("edge/a/cmd/reload", b"{}")
    with pytest.raises(MessageError, match=r"not under the topic prefix 'edge'"):
        parse_message("other/a/status", b"{}")


def test_status_and_events_parse() -> None:
    status = parse_message(
        "edge/cam-01/status",
        json.dumps(
            {
                "state": "online",
                "device_id": "cam-01",
                "ts": "2026-11-23T10:00:00.123Z",
                "since": "2026-11-23T10:00:00.000Z",
                "model": {"name": "m", "version": "2"},
            }
        ),
    )
    assert isinstance(status, Status) and status.online and status.model["version"] == "2"
    event = parse_message(
        "edge/cam-01/events",
        json.dumps(
            {
                "event": "model_swapped",
                "device_id": "cam-01",
                "ts": "2026-11-23T10:00:00.123Z",
                "data": {"to": "v2"},
            }
        ),
    )
    assert isinstance(event, Event) and event.event == "model_swapped" and event.data == {"to": "v2"}
    objects = parse_message("edge/cam-01/events/objects", json.dumps({"type": "new", "track_id": 3}))
    assert isinstance(objects, Event) and objects.event == "new" and objects.device_id == "cam-01"


def test_gap_tracker_counts_missing_ranges_after_the_grace_period_and_duplicates() -> None:
    clock = Clock()
    tracker = GapTracker(grace_s=5.0, clock=clock)
    for seq in (1, 2, 3, 7, 8, 12):
        assert tracker.add("cam", BOOT, seq)
    assert tracker.gaps() == []  # still within the grace period: late arrivals are normal
    clock.now += 5.0
    assert [(g.from_seq, g.to_seq) for g in tracker.gaps()] == [(4, 6), (9, 11)]
    assert tracker.missing() == 6
    assert tracker.add("cam", BOOT, 5)  # splits a hole: both halves keep its age
    assert [(g.from_seq, g.to_seq) for g in tracker.gaps()] == [(4, 4), (6, 6), (9, 11)]
    for seq in (4, 6, 9, 10):
        tracker.add("cam", BOOT, seq)
    assert not tracker.add("cam", BOOT, 7) and not tracker.add("cam", BOOT, 12)
    assert [(g.from_seq, g.to_seq) for g in tracker.gaps()] == [(11, 11)]
    tracker.add("cam", BOOT, 11)
    assert tracker.gaps() == [] and tracker.duplicates == 2 and tracker.received == 12
    tracker.add("cam", BOOT, 20)  # a new hole is young again
    assert tracker.gaps() == []
    clock.now += 5.0
    assert [(g.from_seq, g.to_seq) for g in tracker.gaps()] == [(13, 19)]
    (stats,) = tracker.streams()
    assert (stats.first_seq, stats.last_seq, stats.received, stats.duplicates) == (1, 20, 13, 2)


def test_gap_tracker_keeps_boots_apart_and_handles_seqs_below_the_first() -> None:
    clock = Clock()
    tracker = GapTracker(grace_s=0.0, clock=clock)
    other = new_boot()
    tracker.add("cam", BOOT, 10)
    tracker.add("cam", other, 11)  # a restart: seq continues under a new boot_id, no gap
    assert tracker.gaps() == []
    tracker.add("cam", BOOT, 7)  # arrives late, from before the first one seen
    assert [(g.boot_id, g.from_seq, g.to_seq) for g in tracker.gaps()] == [(BOOT, 8, 9)]
    tracker.add("cam", BOOT, 9)
    tracker.add("cam", BOOT, 8)
    assert tracker.gaps() == []


def test_subscribe_yields_typed_messages_across_a_broker_restart(mosquitto: Mosquitto) -> None:
    fleet = Fleet(mosquitto.port)
    fleet.status("cam-01", "online", model={"name": "tiny-colour", "version": "1.0.0"})
    boot = new_boot()
    with subscribe("127.0.0.1", mosquitto.port, client_id="app-1", grace_s=0.0) as sub:
        retained = sub.get(timeout=5)
        assert isinstance(retained, Status) and retained.online  # the retained status comes first
        fleet.publish("cam-01", boot, range(1, 51))
        fleet.send("cam-01/predictions", b"garbage")
        got = [sub.get(timeout=5) for _ in range(50)]
        assert [m.seq for m in got if isinstance(m, Prediction)] == list(range(1, 51))
        fleet.close()
        mosquitto.restart()  # persistence on: the session survives, paho reconnects by itself
        fleet = Fleet(mosquitto.port)
        deadline = time.monotonic() + 15
        while sub.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sub.connects >= 2
        fleet.publish("cam-01", boot, [51, 52, 55, 52])
        # QoS 1 is at least once: what was in flight when the broker stopped may come again (duplicates)
        after: list[int] = []
        deadline = time.monotonic() + 10
        while len(after) < 4 and time.monotonic() < deadline:
            message = sub.get(timeout=1)
            if isinstance(message, Prediction) and message.seq > 50:
                after.append(message.seq)
        assert after == [51, 52, 55, 52]
        assert sub.invalid >= 1  # the garbage was skipped, counted (again if it came again)
        assert [(g.from_seq, g.to_seq) for g in sub.tracker.gaps()] == [(53, 54)]
        assert sub.tracker.duplicates >= 1
    fleet.close()


def test_a_persistent_subscriber_gets_what_was_published_while_it_was_away(mosquitto: Mosquitto) -> None:
    boot = new_boot()
    fleet = Fleet(mosquitto.port)
    with subscribe("127.0.0.1", mosquitto.port, client_id="app-2", kinds=("predictions",)) as sub:
        fleet.publish("cam-01", boot, [1])
        assert isinstance(sub.get(timeout=5), Prediction)
    fleet.publish("cam-01", boot, range(2, 12))  # nobody connected: the broker queues them
    with subscribe("127.0.0.1", mosquitto.port, client_id="app-2", kinds=("predictions",)) as sub:
        got = [sub.get(timeout=5) for _ in range(10)]
        assert sorted(m.seq for m in got if isinstance(m, Prediction)) == list(range(2, 12))
    fleet.close()


def test_strict_subscription_raises_on_a_bad_message(mosquitto: Mosquitto) -> None:
    fleet = Fleet(mosquitto.port)
    with subscribe("127.0.0.1", mosquitto.port, strict=True) as sub:
        fleet.send("cam-01/events", b'{"event": 3}')
        with pytest.raises(MessageError, match=r"^edge/cam-01/events: event: expected str, got int$"):
            sub.get(timeout=5)
    fleet.close()


def test_subscribers_in_one_group_share_the_predictions_and_each_sees_every_status(
    mosquitto: Mosquitto,
) -> None:
    fleet = Fleet(mosquitto.port)
    boot = new_boot()
    subs = [subscribe("127.0.0.1", mosquitto.port, client_id=f"member-{i}", group="apps") for i in range(2)]
    try:
        fleet.status("cam-01", "online")
        fleet.publish("cam-01", boot, range(1, 201))
        seen: list[list[int]] = [[], []]
        statuses = [0, 0]
        deadline = time.monotonic() + 10
        while len(seen[0]) + len(seen[1]) < 200 and time.monotonic() < deadline:
            for i, sub in enumerate(subs):
                message = sub.get(timeout=0.05)
                if isinstance(message, Prediction):
                    seen[i].append(message.seq)
                elif isinstance(message, Status):
                    statuses[i] += 1
        for i, sub in enumerate(subs):  # a status may still be queued behind the predictions
            while statuses[i] == 0 and (message := sub.get(timeout=1)) is not None:
                statuses[i] += isinstance(message, Status)
        assert sorted(seen[0] + seen[1]) == list(range(1, 201))  # split, none twice
        assert seen[0] and seen[1]
        assert statuses == [1, 1]  # status is not shared: each member keeps every device's state
    finally:
        for sub in subs:
            sub.close()
        fleet.close()
