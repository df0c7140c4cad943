"""Tracker, zones and object events on boxes decoded by the runtime's own detection decoders from
synthetic heads: objects move across frames, and the ids, events and counts they give are asserted."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from edge.detect import ObjectPipeline, SourceInfo, SourceZones, TrackingConfig, Zones
from edge.detect.config import HomeAssistantConfig, SnapshotConfig, ZoneConfig
from edge.detect.service import ObjectService, ObjectSource
from edge.detect.tracker import Detection, Tracker, assign_greedy, iou_matrix
from edge.detect.zones import Zone, point_in_polygon
from edge.tasks.base import DecoderContext
from edge.tasks.detection import YoloConfig, YoloxConfig

LABELS = ("person", "car")
INPUT = 320


def yolo_head(objects: list[tuple[float, float, float, float, int, float]], rows: int = 64) -> np.ndarray:
    """A [1, rows, 4+C] YOLO head (cxcywh input pixels) holding `objects` (cx, cy, w, h normalised,
    class, score) and background rows of low score."""
    head = np.zeros((1, rows, 4 + len(LABELS)), dtype=np.float32)
    head[0, :, :4] = [INPUT / 2, INPUT / 2, 10, 10]
    head[0, :, 4:] = 0.01
    for i, (cx, cy, w, h, cls, score) in enumerate(objects):
        head[0, i, :4] = [cx * INPUT, cy * INPUT, w * INPUT, h * INPUT]
        head[0, i, 4 + cls] = score
    return head


@pytest.fixture(scope="module")
def decode():  # the runtime's YOLO decoder, with NMS
    config = YoloConfig(type="detection", score_threshold=0.1)
    return config.decoder(DecoderContext(labels=LABELS, input_hw=(INPUT, INPUT)))


def test_iou_matrix_and_greedy_assignment() -> None:
    a = np.array([[0, 0, 1, 1], [2, 2, 3, 3]], dtype=float)
    b = np.array([[2, 2, 3, 3], [0, 0, 0.5, 1], [5, 5, 6, 6]], dtype=float)
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 1] == pytest.approx(0.5) and iou[1, 0] == pytest.approx(1.0) and iou[0, 2] == 0
    assert sorted(assign_greedy(iou, 0.3)) == [(0, 1), (1, 0)]
    assert assign_greedy(iou, 0.6) == [(1, 0)]


def test_ids_are_stable_while_objects_move_and_cross(decode) -> None:
    tracker = Tracker(TrackingConfig(enabled=True, min_hits=2, max_age_s=1.0))
    seen: dict[str, set[int]] = {"left": set(), "right": set()}
    for frame in range(20):
        t = frame * 0.2  # 5 fps
        x = 0.2 + 0.03 * frame  # one walks right, the other left: they pass each other
        result = decode([yolo_head([(x, 0.5, 0.1, 0.3, 0, 0.9), (1 - x, 0.52, 0.1, 0.3, 0, 0.85)])], None)
        dets = [Detection.from_result(row) for row in result["detections"]]
        update = tracker.update(dets, t)
        if frame == 0:
            assert update.track_ids == [None, None]  # tentative until min_hits
            continue
        assert all(i is not None for i in update.track_ids)
        for det, tid in zip(dets, update.track_ids, strict=True):
            centre = (det.box[0] + det.box[2]) / 2
            # before they meet, the track that started left is the one further left
            if frame < 9:
                seen["left" if centre < 0.5 else "right"].add(tid)
    assert len(seen["left"]) == 1 and len(seen["right"]) == 1 and seen["left"] != seen["right"]


def test_a_weak_detection_keeps_a_track_alive_and_a_weak_one_alone_starts_nothing() -> None:
    tracker = Tracker(TrackingConfig(min_hits=1, high_score=0.5, low_score=0.1))
    first = tracker.update([Detection((0.1, 0.1, 0.3, 0.5), 0.9, "person")], 0.0)
    (tid,) = first.track_ids
    weak = tracker.update([Detection((0.11, 0.1, 0.31, 0.5), 0.2, "person")], 0.1)
    assert weak.track_ids == [tid]  # stage 2: the partly hidden person keeps its id
    alone = tracker.update([Detection((0.7, 0.7, 0.8, 0.9), 0.2, "person")], 0.2)
    assert alone.track_ids == [None] and len(tracker.tracks) == 1
    slow = Tracker(TrackingConfig(min_hits=2, high_score=0.5, low_score=0.1))
    slow.update([Detection((0.1, 0.1, 0.3, 0.5), 0.9, "person")], 0.0)
    assert slow.update([Detection((0.1, 0.1, 0.3, 0.5), 0.2, "person")], 0.1).track_ids == [
        None
    ]  # no confirm


def test_labels_never_share_a_track_and_max_age_is_frame_time() -> None:
    tracker = Tracker(TrackingConfig(min_hits=1, max_age_s=1.0))
    a = tracker.update([Detection((0.1, 0.1, 0.3, 0.5), 0.9, "person")], 10.0)
    b = tracker.update([Detection((0.1, 0.1, 0.3, 0.5), 0.9, "car")], 10.1)
    assert a.track_ids[0] != b.track_ids[0]
    assert tracker.update([], 10.9).ended == []  # 0.9 s unseen: still live
    ended = tracker.update([], 11.2).ended  # 1.2 s unseen person (10.0) and 1.1 s car (10.1)
    assert sorted(t.label for t in ended) == ["car", "person"]


def test_tentative_tracks_that_miss_a_frame_are_dropped() -> None:
    tracker = Tracker(TrackingConfig(min_hits=3))
    tracker.update([Detection((0.1, 0.1, 0.3, 0.5), 0.9, "person")], 0.0)
    update = tracker.update([], 0.1)
    assert update.ended == [] and tracker.tracks == []


def test_point_in_polygon_counts_edges_and_concave_shapes() -> None:
    square = np.array([[0.1, 0.5], [0.4, 0.5], [0.4, 0.9], [0.1, 0.9]])
    assert point_in_polygon(0.2, 0.6, square)
    assert point_in_polygon(0.4, 0.7, square)  # on an edge
    assert point_in_polygon(0.1, 0.9, square)  # a vertex
    assert not point_in_polygon(0.5, 0.6, square)
    ell = np.array([[0, 0], [1, 0], [1, 0.2], [0.2, 0.2], [0.2, 1], [0, 1]])
    assert point_in_polygon(0.1, 0.8, ell) and not point_in_polygon(0.6, 0.6, ell)


def test_zone_uses_the_bottom_centre_and_filters_on_entry() -> None:
    zone = Zone.from_config(
        "gate",
        ZoneConfig(
            points=[[0.1, 0.5], [0.4, 0.5], [0.4, 0.9], [0.1, 0.9]], min_area=0.01, min_score={"person": 0.6}
        ),
    )
    zones = Zones([zone])
    head_in_zone_feet_out = (0.2, 0.55, 0.3, 0.95)  # the box's top is inside, its bottom centre is not
    assert zones.current(head_in_zone_feet_out, "person", 0.9) == []
    standing = (0.2, 0.4, 0.3, 0.8)
    assert zones.current(standing, "person", 0.9) == ["gate"]
    assert zones.current(standing, "person", 0.5) == []  # below its label's min_score
    assert zones.current(standing, "car", 0.1) == ["gate"]  # no min_score for cars
    assert zones.current((0.2, 0.79, 0.21, 0.8), "car", 0.9) == []  # smaller than min_area
    assert zones.current(standing, "person", 0.5, inside=["gate"]) == ["gate"]  # already in: stays


def test_zone_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"zones\.gate\.points"):
        SourceZones.model_validate({"zones": {"gate": [[0, 0], [1, 0]]}})
    with pytest.raises(ValidationError, match="outside 0..1"):
        SourceZones.model_validate({"zones": {"gate": [[0, 0], [2, 0], [1, 1]]}})
    with pytest.raises(ValidationError, match="whole frame"):
        SourceZones.model_validate({"zones": {"all": [[0, 0], [1, 0], [1, 1]]}})
    with pytest.raises(ValidationError, match="topic level"):
        SourceZones.model_validate({"name": "drive/way"})
    with pytest.raises(ValidationError, match="extra"):
        SourceZones.model_validate({"zones": {"gate": {"points": [[0, 0], [1, 0], [1, 1]], "colour": 1}}})
    with pytest.raises(ValidationError, match="low_score"):
        TrackingConfig(low_score=0.6, high_score=0.5)


def _events(messages):
    return [m.json() for m in messages if m.kind == "event"]


def test_pipeline_gives_new_update_end_with_stable_ids_and_zone_counts(decode) -> None:
    """A person walks from the left edge through the gate zone and leaves; a car stays put; the
    daemon's seam (`ObjectPipeline.process`) is fed the decoder's results frame by frame."""
    source = SourceZones.model_validate(
        {"name": "driveway", "zones": {"gate": [[0.4, 0.0], [0.6, 0.0], [0.6, 1.0], [0.4, 1.0]]}}
    )
    tracking = TrackingConfig(enabled=True, min_hits=2, max_age_s=1.0, update_interval_s=100.0)
    pipeline = ObjectPipeline(
        tracking,
        SourceInfo("driveway", "file:clip.mp4"),
        Zones.from_config(source.zones),
        topic_base="edge/cam-01",
    )
    initial = pipeline.initial_messages(LABELS)
    assert {m.topic for m in initial} == {
        f"driveway/{zone}/{label}" for zone in ("all", "gate") for label in LABELS
    } and all(m.payload == b"0" and m.retained for m in initial)
    events, counts, results = [], [], []
    for frame in range(32):
        t = 100.0 + frame * 0.2
        objects = [(0.8, 0.7, 0.2, 0.2, 1, 0.8)]  # the car
        if frame < 24:  # 0.04 of the frame per frame: 1 m/s at 5 fps on a 25 m wide view
            objects.insert(0, (0.04 + 0.04 * frame, 0.5, 0.1, 0.3, 0, 0.6 + 0.01 * frame))
        result = decode([yolo_head(objects)], None)
        messages = pipeline.process(result, t)
        results.append(json.loads(json.dumps(result)))
        events += _events(messages)
        counts += [(m.topic, int(m.payload)) for m in messages if m.kind == "count"]
        assert all(m.retained for m in messages if m.kind == "count")
        assert all(not m.retained and m.topic == "events/objects" for m in messages if m.kind == "event")
    person = [e for e in events if e["label"] == "person"]
    car = [e for e in events if e["label"] == "car"]
    assert [e["type"] for e in person] == ["new", "update", "update", "end"]  # enters, then leaves, the gate
    assert len({e["track_id"] for e in person}) == 1 and {e["track_id"] for e in car} != {
        person[0]["track_id"]
    }
    assert person[1]["current_zones"] == ["gate"] and person[2]["current_zones"] == []
    assert person[-1]["zones"] == ["gate"] and person[-1]["best_score"] == pytest.approx(0.83, abs=1e-4)
    assert person[0]["source"] == {"name": "driveway", "uri": "file:clip.mp4"}
    assert person[0]["first_seen"] < person[-1]["last_seen"] and person[-1]["snapshot"] is None
    # end comes max_age_s after the last sighting (frame 23 at t=104.6): at the first frame beyond 105.6
    assert person[-1]["ts"].startswith("1970-01-01T00:01:45.8")
    assert [e["type"] for e in car] == ["new"]
    assert ("driveway/gate/person", 1) in counts and counts.count(("driveway/gate/person", 0)) == 1
    assert counts[-1] == ("driveway/all/person", 0)
    tracked = [d for r in results[1:] for d in r["detections"]]
    assert all("track_id" in d for d in tracked)  # detections of confirmed tracks carry their id
    assert "track_id" not in results[0]["detections"][0]
    closed = pipeline.close(110.0)
    assert [e["type"] for e in _events(closed)] == ["end"] and ("driveway/all/car", 0) in [
        (m.topic, int(m.payload)) for m in closed if m.kind == "count"
    ]


def test_update_is_rate_limited_by_frame_time(decode) -> None:
    pipeline = ObjectPipeline(TrackingConfig(min_hits=1, update_interval_s=1.0), SourceInfo("cam"))
    kinds = []
    for frame in range(11):  # the score rises every frame for 2 s at 5 fps
        result = decode([yolo_head([(0.5, 0.5, 0.2, 0.2, 0, 0.5 + 0.02 * frame)])], None)
        kinds += [e["type"] for e in _events(pipeline.process(result, frame * 0.2))]
    assert kinds == ["new", "update", "update"]  # at t=1.0 and t=2.0, not on every better score


def test_yolox_raw_heads_track_too() -> None:
    """The yolox decoder (raw grid outputs with strides) feeds the same pipeline."""
    config = YoloxConfig(type="detection", format="yolox", strides=[8, 16, 32], score_threshold=0.3)
    decode = config.decoder(DecoderContext(labels=("text",), input_hw=(64, 64)))
    cells = (64 // 8) ** 2 + (64 // 16) ** 2 + (64 // 32) ** 2
    pipeline = ObjectPipeline(TrackingConfig(min_hits=2), SourceInfo("cam"))
    ids = []
    for frame in range(4):
        head = np.zeros((1, cells, 6), dtype=np.float32)
        cell = 2 * 8 + 1 + frame  # stride-8 grid cell (row 2, column 1+frame)
        head[0, cell] = [0.5, 0.5, np.log(2.0), np.log(2.0), 0.9, 1.0]
        result = pipeline_result = decode([head], None)
        pipeline.process(pipeline_result, frame * 0.2)
        ids += [d.get("track_id") for d in result["detections"]]
    assert ids[0] is None and len(set(ids[1:])) == 1 and ids[1] is not None


def test_a_prediction_with_track_ids_validates_against_the_shipped_schema(decode) -> None:
    import jsonschema

    from edge.publish.payload import build_prediction, prediction_schema

    pipeline = ObjectPipeline(TrackingConfig(min_hits=1), SourceInfo("cam"))
    result = decode([yolo_head([(0.5, 0.5, 0.2, 0.2, 0, 0.9)])], None)
    pipeline.process(result, 0.0)
    assert result["detections"][0]["track_id"] == 1
    payload = build_prediction(
        device_id="cam-01",
        boot_id="12345678-1234-1234-1234-123456789abc",
        ts=0.0,
        source={"uri": "file:x", "frame": 1, "captured_at": 0.0},
        model={"name": "m", "version": "1", "sha256": "0" * 64},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 2.0, "preprocess": 0.1, "inference": 1.0, "postprocess": 0.1},
        result=result,
        seq=1,
    )
    validator = jsonschema.Draft202012Validator(prediction_schema())
    validator.validate(payload)
    result["detections"][0]["track_id"] = 0
    assert not validator.is_valid(payload)


def _service() -> ObjectService:
    return ObjectService(
        TrackingConfig(enabled=True, min_hits=2, max_age_s=1.0),
        SnapshotConfig(),
        HomeAssistantConfig(),
        topic_prefix="edge",
        device_id="cam-01",
        sources=[ObjectSource("file:clip.mp4", "driveway", {})],
        labels=LABELS,
    )


def test_racing_workers_reach_the_tracker_in_frame_order(decode) -> None:
    """Two inference workers: a later frame may finish first. The service holds it until every frame
    taken before it was tracked, so the track is confirmed on frame 1 and frame 0 has no id."""
    service = _service()
    results = [decode([yolo_head([(0.1 + 0.02 * i, 0.5, 0.1, 0.3, 0, 0.9)])], None) for i in range(8)]
    for index in range(8):
        service.taken("file:clip.mp4", index)
    finished: list[int] = []

    def work(index: int) -> None:
        service.process("file:clip.mp4", results[index], 100.0 + 0.2 * index, None, index)
        finished.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in reversed(range(8))]  # the latest first
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(10)
    assert finished == list(range(8))
    assert "track_id" not in results[0]["detections"][0]
    assert len({r["detections"][0]["track_id"] for r in results[1:]}) == 1


def test_a_frame_whose_inference_failed_does_not_hold_up_the_next() -> None:
    service = _service()
    for index in range(3):
        service.taken("file:clip.mp4", index)
    service.process("file:clip.mp4", {"detections": []}, 100.0, None, 0)
    service.skip("file:clip.mp4", 1)  # its inference failed: no result will come
    later = threading.Thread(
        target=service.process, args=("file:clip.mp4", {"detections": []}, 100.4, None, 2)
    )
    later.start()
    later.join(2.0)  # well within ORDER_WAIT_S: it did not wait for frame 1
    assert not later.is_alive()
