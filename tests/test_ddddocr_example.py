"""The example detector end to end: ddddocr's real YOLOX-style text detector converted to int8 with
`--postprocess` and held to its gate on frames with text rendered onto real photos it was not
calibrated on, then served with `open_model` and tracked across a clip of moving text."""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.cli import main
from edge import open_model
from edge.detect import ObjectPipeline, SourceInfo, TrackingConfig
from edge.package import load_package
from examples import ddddocr_det


@pytest.mark.slow
def test_ddddocr_detector_to_int8_within_its_gate_then_tracked(tmp_path: Path, cache_dir: Path) -> None:
    model = ddddocr_det.fetch_model(cache_dir / "ddddocr")
    calib = ddddocr_det.write_folder(
        tmp_path / "calib", ddddocr_det.text_frames(48, 1, ddddocr_det.PHOTOS[:4])
    )
    held_out = ddddocr_det.write_folder(
        tmp_path / "eval", ddddocr_det.text_frames(32, 2, ddddocr_det.PHOTOS[4:])
    )
    out = tmp_path / "pkg"
    args = ddddocr_det.convert_command(model, out, calib, held_out)[3:]  # without `python -m converters.cli`
    assert main(args) == 0
    manifest = load_package(out).manifest
    metrics = manifest.metrics
    assert metrics["gate"]["passed"] and metrics["gate"]["metric"] == "box_map50_vs_fp32"
    assert metrics["fp32"]["map50_vs_fp32"] == 1.0 and metrics["int8"]["map50_vs_fp32"] >= 0.97
    assert 0 < metrics["int8"]["map50_at_threshold"] <= 1 and 0 < metrics["int8"]["map50_ranked"] <= 1
    assert metrics["latency_ratio_int8_fp32"] < 1.0 and metrics["size_ratio_int8_fp32"] < 0.3
    assert manifest.postprocess.model_dump()["format"] == "yolox"

    clip = ddddocr_det.moving_text_clip(15)
    events, most = [], 0
    with open_model(out) as served:
        pipeline = ObjectPipeline(TrackingConfig(min_hits=2, max_age_s=0.6), SourceInfo("cam"))
        for i, frame in enumerate(clip):
            result = served.infer(frame[..., ::-1])  # open_model takes RGB
            rows = result["detections"]
            assert isinstance(rows, list)
            most = max(most, len(rows))
            events += [m.json() for m in pipeline.process(result, i * 0.2) if m.kind == "event"]
    assert most >= 4  # it finds the characters of "GATE 42"
    new = [e["track_id"] for e in events if e["type"] == "new"]
    end = [e["track_id"] for e in events if e["type"] == "end"]
    assert sorted(new) == sorted(end) and len(set(new)) == len(new)  # every object ends, once
    assert len(new) <= most + 3  # ids are stable while the text moves: no new object per frame

    # The same package in the daemon, on the clip as a video file: tracked objects as a subscriber sees them.
    import cv2
    import numpy as np

    from edge.config import DaemonConfig
    from tests.broker import Mosquitto
    from tests.daemon_helpers import running_daemon, subscribed, wait_until

    video = tmp_path / "moving-text.avi"
    height, width = clip[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (width, height))
    for frame in clip:
        writer.write(frame)
    writer.release()
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        config = DaemonConfig.model_validate(
            {
                "device_id": "text-cam",
                "profile": "auto",
                "model": str(out),
                "source": {"type": "video", "uri": str(video), "realtime": False, "loop": False, "fps": 5,
                           "name": "door", "zones": {"sign": [[0.0, 0.0], [1.0, 0.0], [1.0, 0.7], [0.0, 0.7]]}},
                "tracking": {"enabled": True, "min_hits": 2, "max_age_s": 0.6},
                "snapshots": {"enabled": True, "dir": str(tmp_path / "snapshots")},
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "qos": 1},
                "outbox": {"path": str(tmp_path / "state" / "outbox.db")},
                "metrics": None,
            }
        )  # fmt: skip
        with subscribed(broker.port, "edge/text-cam/#", client_id="ddddocr-sub") as sub:
            with running_daemon(config) as daemon:
                assert wait_until(daemon.sources_done.is_set, 60)
            assert sub.wait_for(lambda es: any(e.get("type") == "end" for e in es), 20, "/events/objects")
            daemon_events = sub.payloads("/events/objects")
            tracked = [
                d for m in sub.payloads("/predictions") for d in m["result"]["detections"] if "track_id" in d
            ]
            snapshots = [p for t, p, _ in sub.messages if t.endswith("/snapshot")]
    finally:
        broker.stop()
    started = {e["track_id"] for e in daemon_events if e["type"] == "new"}
    ended = {e["track_id"] for e in daemon_events if e["type"] == "end"}
    assert started and started == ended and tracked
    assert any("sign" in e["zones"] for e in daemon_events if e["type"] == "end")
    assert snapshots and cv2.imdecode(np.frombuffer(snapshots[0], np.uint8), cv2.IMREAD_COLOR) is not None
