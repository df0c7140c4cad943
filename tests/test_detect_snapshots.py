"""Snapshots are real JPEGs (decoded back with OpenCV) of real photos, with the box drawn where the
object is, cropped and capped as configured, kept in a bounded directory."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.detect import ObjectPipeline, SnapshotConfig, SourceInfo, TrackingConfig
from edge.detect.snapshots import Snapshots, SnapshotStore, encode_jpeg


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())  # 512x512 RGB


def _decode(jpeg: bytes) -> np.ndarray:
    assert jpeg[:2] == b"\xff\xd8"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_jpeg_decodes_with_the_box_drawn_in_red_and_the_frame_untouched(photo: np.ndarray) -> None:
    before = photo.copy()
    box = (0.25, 0.1, 0.75, 0.9)
    jpeg, width, height = encode_jpeg(photo, box, "person 0.91", max_side=1024, color="RGB")
    image = _decode(jpeg)
    assert (width, height) == (512, 512) == image.shape[1::-1]
    edge = image[200:300, 128]  # on the box's left side (x = 0.25 * 512), BGR
    assert np.median(edge[:, 2]) > 200 and np.median(edge[:, 1]) < 80
    assert np.array_equal(photo, before)  # the caller's frame is not drawn on
    # elsewhere the picture is the photo (JPEG-close)
    original = cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)
    assert np.abs(image[100:200, 400:500].astype(int) - original[100:200, 400:500]).mean() < 10
    # the daemon's frames are BGR (OpenCV): the same picture comes out
    assert encode_jpeg(original, box, "person 0.91", max_side=1024)[0] == jpeg


def test_crop_and_size_caps(photo: np.ndarray) -> None:
    jpeg, width, height = encode_jpeg(photo, (0.5, 0.5, 0.7, 0.9), "", crop=True, max_side=4096)
    assert _decode(jpeg).shape[:2] == (height, width)
    assert width < 160 and height < 320  # the box (102x205 px) and 25 % around it, not the frame
    _, width, height = encode_jpeg(photo, None, max_side=128)
    assert max(width, height) == 128
    big = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)  # noise: hard to compress
    jpeg, _, _ = encode_jpeg(big, None, max_side=1280, quality=95, max_bytes=150_000)
    assert len(jpeg) <= 150_000 and _decode(jpeg).shape == (720, 1280, 3)


def test_store_removes_the_oldest_beyond_max_bytes_including_an_earlier_runs(tmp_path: Path) -> None:
    old = tmp_path / "person-1-1.jpg"
    old.write_bytes(b"x" * 40_000)
    os.utime(old, (1, 1))
    store = SnapshotStore(tmp_path, max_bytes=100_000)
    for i in range(3):
        store.write(f"car-{i}.jpg", b"y" * 30_000)
    assert not old.exists() and store.removed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car-0.jpg", "car-1.jpg", "car-2.jpg"]
    store.write("car-3.jpg", b"z" * 30_000)
    assert not (tmp_path / "car-0.jpg").exists() and store.total_bytes <= 100_000


def test_an_object_gets_one_file_holding_its_best_frame_at_most_once_per_interval(
    tmp_path: Path, photo: np.ndarray
) -> None:
    shots = Snapshots(SnapshotConfig(enabled=True, dir=tmp_path, min_interval_s=1.0), "cam")
    box = (0.3, 0.2, 0.6, 0.8)
    assert shots.offer(7, "person", 0.5, box, photo, 10.0, now=0.0) is not None
    assert shots.offer(7, "person", 0.9, box, photo, 10.0, now=0.5) is None  # too soon
    assert shots.offer(7, "person", 0.4, box, photo, 10.0, now=2.0) is None  # not better
    best = shots.offer(7, "person", 0.9, box, photo, 10.0, now=2.0)
    assert best is not None and best.path is not None
    assert list((tmp_path / "cam").iterdir()) == [best.path]
    assert best.path.read_bytes() == best.jpeg and shots.topic("person") == "cam/person/snapshot"


def test_pipeline_publishes_the_snapshot_retained_and_the_end_event_names_it(
    tmp_path: Path, photo: np.ndarray
) -> None:
    shots = Snapshots(SnapshotConfig(enabled=True, dir=tmp_path, min_interval_s=0.0), "yard", color="RGB")
    pipeline = ObjectPipeline(
        TrackingConfig(min_hits=2, max_age_s=0.5),
        SourceInfo("yard"),
        snapshots=shots,
        topic_base="edge/cam-01",
    )
    messages = []
    for frame in range(8):
        dets = (
            [{"label": "person", "index": 0, "score": 0.7, "box": [0.3, 0.2, 0.6, 0.8]}] if frame < 3 else []
        )
        messages += pipeline.process({"type": "detection", "detections": dets}, frame * 0.2, photo)
    snapshots = [m for m in messages if m.kind == "snapshot"]
    assert snapshots and all(m.retained and m.topic == "yard/person/snapshot" for m in snapshots)
    assert _decode(snapshots[-1].payload).shape == (512, 512, 3)
    end = [m.json() for m in messages if m.kind == "event"][-1]
    assert end["type"] == "end" and end["snapshot"] == "edge/cam-01/yard/person/snapshot"


def test_a_crowd_costs_at_most_max_per_frame_encodes_per_frame_and_everyone_gets_one(
    tmp_path: Path, photo: np.ndarray
) -> None:
    config = SnapshotConfig(enabled=True, dir=tmp_path, max_per_frame=2, min_interval_s=100.0)
    pipeline = ObjectPipeline(
        TrackingConfig(min_hits=1), SourceInfo("yard"), snapshots=Snapshots(config, "yard", color="RGB")
    )
    dets = [
        {"label": "person", "index": 0, "score": 0.9, "box": [0.1 * i, 0.1, 0.1 * i + 0.08, 0.5]}
        for i in range(5)
    ]
    per_frame = []
    for frame in range(4):
        rows = [dict(d, score=d["score"] - 0.01 * frame) for d in dets]  # every score falls a little
        messages = pipeline.process({"type": "detection", "detections": rows}, frame * 0.2, photo)
        per_frame.append(sum(1 for m in messages if m.kind == "snapshot"))
    assert per_frame == [2, 2, 1, 0]  # everyone gets one, though none of the later frames is its best
    assert len(list((tmp_path / "yard").iterdir())) == 5
