"""Tracked objects in the daemon: track ids in the predictions, `new`/`end` events, retained zone counts,
snapshots that decode, Home Assistant discovery — against a real mosquitto and a real clip."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import DaemonConfig
from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import (
    make_detection_package,
    running_daemon,
    subscribed,
    tracked_clip_config,
    wait_until,
)

DEVICE = "yard-cam"


@pytest.mark.parametrize("workers", [1, 2])
def test_objects_are_tracked_counted_snapshotted_and_announced(
    tmp_path: Path, mosquitto: Mosquitto, workers: int
) -> None:
    # two workers race: a source's frames must still reach its tracker in order
    config = DaemonConfig.model_validate(
        tracked_clip_config(tmp_path, mosquitto.port, DEVICE, workers=workers)
    )
    with subscribed(mosquitto.port, "#", client_id="objects-sub") as sub:
        with running_daemon(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 60), daemon.stats()

        def on(topic: str) -> list[bytes]:
            return [payload for t, payload, _ in sub.messages if t == topic]

        base = f"edge/{DEVICE}"
        assert wait_until(lambda: len([p for p in on(f"{base}/events/objects") if b'"end"' in p]) == 2, 10)
    predictions = [json.loads(p) for p in on(f"{base}/predictions")]
    tracked = [d for m in predictions for d in m["result"]["detections"] if "track_id" in d]
    assert tracked and {d["label"] for d in tracked} == {"person", "car"}
    assert len({(d["label"], d["track_id"]) for d in tracked}) == 2  # one stable id per object

    events = [json.loads(p) for p in on(f"{base}/events/objects")]
    kinds = {(e["type"], e["label"]) for e in events}
    assert {("new", "person"), ("new", "car"), ("end", "person"), ("end", "car")} <= kinds
    person_end = next(e for e in events if e["type"] == "end" and e["label"] == "person")
    assert "gate" in person_end["zones"] and person_end["snapshot"] == f"{base}/driveway/person/snapshot"

    counts = [json.loads(p) for p in on(f"{base}/driveway/gate/person")]
    assert max(counts) == 1 and counts[-1] == 0  # counted while there, 0 once the source ended
    assert not [c for c in on(f"{base}/driveway/gate/car") if json.loads(c) != 0]  # the car never entered

    [snapshot, *_] = on(f"{base}/driveway/person/snapshot")
    image = cv2.imdecode(np.frombuffer(snapshot, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.size > 0
    assert list((tmp_path / "snapshots").rglob("*.jpg"))

    discovery = {t: json.loads(p) for t, p, retained in sub.messages if t.startswith("homeassistant/") and p}
    assert any(t.endswith("/config") and "camera" in t for t in discovery), sorted(discovery)
    assert all(
        c["availability"][0]["topic"] == f"{base}/status" for c in discovery.values() if "availability" in c
    )


def test_home_assistant_entities_follow_the_config_and_go_when_discovery_is_off(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    package = make_detection_package(tmp_path / "models" / "still")

    def config(zones: dict[str, list[list[float]]], homeassistant: bool) -> DaemonConfig:
        source = {
            "type": "video",
            "uri": str(labelled_clip().path),
            "fps": 25,
            "name": "driveway",
            "zones": zones,
        }
        return DaemonConfig.model_validate(
            {
                "device_id": DEVICE,
                "profile": "x86-64-avx2",
                "model": str(package),
                "source": source,
                "tracking": {"enabled": True},
                "homeassistant": {"enabled": homeassistant},
                "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
                "outbox": {"path": str(tmp_path / "state" / "outbox.db")},
                "metrics": None,
            }
        )

    gate = {"gate": [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]}
    with subscribed(mosquitto.port, "homeassistant/#", client_id="ha-sub") as sub:
        with running_daemon(config(gate, True)):
            assert wait_until(lambda: any(b"gate" in t.encode() for t, _, _ in sub.messages), 10)
        announced = {t for t, p, _ in sub.messages if p}
        gate_topics = {t for t in announced if "_gate_" in t}
        assert gate_topics, sorted(announced)
        sub.messages.clear()
        with running_daemon(config({}, True)):  # the zone is gone from the config: so are its entities
            assert wait_until(lambda: {t for t, p, _ in sub.messages if not p} == gate_topics, 10), (
                sub.messages
            )
        sub.messages.clear()
        with running_daemon(config({}, False)):  # discovery off: every entity it announced is removed
            assert wait_until(lambda: {t for t, p, _ in sub.messages if not p} == announced - gate_topics, 10)
    assert not (tmp_path / "state" / "homeassistant.json").exists()


@pytest.mark.parametrize("outage", ["frozen", "restarted"])
def test_object_events_made_while_the_broker_is_away_arrive_when_it_returns(
    tmp_path: Path, mosquitto: Mosquitto, outage: str
) -> None:
    """Events go through a durable outbox of their own (events.db beside outbox.db), with a seq of their
    own: the predictions' seq stays contiguous."""
    package = make_detection_package(tmp_path / "models" / "still")
    source = {"type": "video", "uri": str(labelled_clip().path), "realtime": False, "loop": False, "fps": 50}
    config = DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(package),
            "source": source,
            "tracking": {"enabled": True, "min_hits": 2},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "reconnect_max_s": 1},
            "outbox": {"path": str(tmp_path / "state" / "outbox.db")},
            "metrics": None,
            "exit_on_source_end": False,  # still running when the broker is back
        }
    )
    base = f"edge/{DEVICE}"
    with subscribed(mosquitto.port, f"{base}/#", client_id="events-sub") as sub:
        with running_daemon(config) as daemon:
            assert wait_until(lambda: daemon.publisher.connected, 10)
            if outage == "frozen":
                mosquitto.pause()  # takes publishes into its socket, acknowledges nothing
            else:
                mosquitto.stop()  # gone (it keeps the subscriber's session on disk)
            assert wait_until(daemon.sources_done.is_set, 30)
            assert daemon.events_outbox is not None and daemon.events_outbox.depth >= 2  # the `new`s wait
            assert daemon.stats()["events_outbox"]["depth"] == daemon.events_outbox.depth
            assert (tmp_path / "state" / "events.db").is_file()
            if outage == "frozen":
                mosquitto.resume()
            else:
                mosquitto.start()
            assert sub.wait_for(
                lambda es: len([e for e in es if e.get("type") == "new"]) == 2, 30, "/events/objects"
            )
        assert sub.wait_for(
            lambda es: len([e for e in es if e.get("type") == "end"]) == 2, 30, "/events/objects"
        )
    events = sub.payloads("/events/objects")
    seqs = sorted({e["seq"] for e in events})
    assert seqs == list(range(1, len(seqs) + 1))  # the events' own sequence, nothing missing
    predictions = sorted({m["seq"] for m in sub.payloads("/predictions")})
    assert predictions == list(
        range(predictions[0], predictions[0] + len(predictions))
    )  # no seq taken by events
