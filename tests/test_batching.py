"""Frames from several sources grouped into one backend call: each item is still its own prediction,
equal to what it would be served alone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge.config import DaemonConfig
from edge.daemon import FrameQueue
from edge.package import load_package
from edge.profiles import resolve_profile
from edge.publish.payload import prediction_schema
from edge.session import open_session
from edge.sources.base import Frame
from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, running_daemon, subscribed, wait_until

DEVICE = "cam-batch"


def _frame(index: int) -> Frame:
    return Frame(np.zeros((2, 2, 3), np.uint8), index, time.time(), time.monotonic(), f"src-{index % 2}")


def test_a_batch_takes_what_is_queued_and_waits_at_most_the_delay_for_more() -> None:
    queue = FrameQueue(8)
    for index in range(3):
        queue.put(_frame(index))
    assert [job.frame.index for job in queue.get_batch(2, timeout=1, max_delay_s=1)] == [0, 1]
    started = time.monotonic()
    assert [job.frame.index for job in queue.get_batch(4, timeout=1, max_delay_s=0.2)] == [2]
    assert 0.15 < time.monotonic() - started < 1.0  # waited the delay, not the first item's timeout
    threading.Timer(0.05, lambda: queue.put(_frame(3))).start()
    threading.Timer(0.1, lambda: queue.put(_frame(4))).start()
    assert [job.frame.index for job in queue.get_batch(2, timeout=1, max_delay_s=1)] == [3, 4]  # joined late
    assert queue.get_batch(4, timeout=0.05, max_delay_s=1) == []


@pytest.mark.parametrize("batch", ["N", 1])
def test_batched_results_equal_the_results_served_one_by_one(tmp_path: Path, batch: int | str) -> None:
    package = load_package(make_tiny_package(tmp_path / "pkg", batch=batch))
    session = open_session(package, resolve_profile("x86-64-avx2").profile, backend="onnxruntime")
    try:
        assert session.batchable is (batch == "N")
        rng = np.random.default_rng(1)
        frames = [rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8) for i in range(5)]
        alone = [session.infer(frame)[0] for frame in frames]
        together = session.infer_batch(frames)
        assert len(together) == len(frames)
        for (result, timings), single in zip(together, alone, strict=True):
            assert [t["label"] for t in result["top_k"]] == [t["label"] for t in single["top_k"]]
            np.testing.assert_allclose(
                [t["score"] for t in result["top_k"]], [t["score"] for t in single["top_k"]], atol=1e-6
            )
            assert timings.inference > 0
    finally:
        session.close()


def test_the_daemon_batches_frames_from_every_source_and_publishes_each(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clip = labelled_clip()
    models = tmp_path / "models"
    make_tiny_package(models / "v1", batch="N")
    copies = [tmp_path / f"cam-{index}.mp4" for index in range(3)]
    for copy in copies:
        shutil.copy(clip.path, copy)
    sources = [{"type": "video", "uri": str(c), "realtime": False, "loop": False, "fps": 200} for c in copies]
    config = DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(models / "v1"),
            "sources": sources,
            "batching": {"max_size": 4, "max_delay_ms": 20},
            "frame_queue": 8,
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    with subscribed(mosquitto.port, f"edge/{DEVICE}/predictions", client_id="batch-sub") as sub:
        with running_daemon(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 60), daemon.stats()
        expected = 3 * clip.frame_count  # lossless file sources: nothing dropped
        assert sub.wait_for(lambda ms: len({m["seq"] for m in ms}) >= expected, 20), (
            len(sub.payloads()),
            daemon.predictions,
            json.dumps(daemon.stats()),
        )
    messages = sub.payloads()
    validator = jsonschema.Draft202012Validator(prediction_schema())
    for message in messages:
        validator.validate(message)
    batches = [m["runtime"].get("batch", 1) for m in messages]
    assert max(batches) >= 2, "no frames were ever grouped"
    assert all(1 <= b <= 4 for b in batches)
    # every frame of every clip arrived once; the cat frames are still the cat frames
    frames = sorted(m["source"]["frame"] for m in messages)
    assert frames == sorted(list(range(clip.frame_count)) * 3)
    by_frame: dict[int, set[str]] = {}
    for message in messages:
        by_frame.setdefault(message["source"]["frame"], set()).add(message["result"]["top_k"][0]["label"])
    assert all(len(labels) == 1 for labels in by_frame.values()), "a frame decided differently in a batch"


def test_batching_needs_a_queue_that_holds_a_batch() -> None:
    with pytest.raises(ValueError, match=r"frame_queue \(2\) must hold at least batching.max_size \(4\)"):
        DaemonConfig.model_validate(
            {"device_id": "x", "model": "/m", "source": {"type": "video"}, "frame_queue": 2, "batching": {}}
        )


def test_workers_each_run_their_own_copy_of_the_session_and_lose_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clip = labelled_clip()
    make_tiny_package(tmp_path / "models" / "v1")
    config = DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(tmp_path / "models" / "v1"),
            "sources": [{"type": "video", "uri": str(clip.path), "realtime": False, "loop": False}],
            "workers": 2,
            "threads": 2,
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    with subscribed(mosquitto.port, f"edge/{DEVICE}/predictions", client_id="workers-sub") as sub:
        with running_daemon(config) as daemon:
            assert daemon.active is not None and daemon.active.replica_count == 2
            assert [w.name for w in daemon._workers] == ["inference-0", "inference-1"]
            assert daemon.liveness().ok
            assert wait_until(daemon.sources_done.is_set, 60), daemon.stats()
        assert sub.wait_for(lambda ms: len({m["seq"] for m in ms}) >= clip.frame_count, 20)
    frames = sorted(m["source"]["frame"] for m in sub.payloads())
    assert frames == list(range(clip.frame_count))  # each frame once, whichever worker served it
