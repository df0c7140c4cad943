"""The daemon with the real EfficientNet-Lite0 int8 package on a clip of real photos (slow: the package is
converted once per converter change, then cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import DaemonConfig
from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import Subscriber, wait_until
from tests.test_daemon import running

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.slow
def test_cat_frames_of_a_clip_are_classified_as_cats(
    tmp_path: Path, cache_dir: Path, mosquitto: Mosquitto
) -> None:
    from tests.assets_models import efficientnet_package

    package = efficientnet_package(cache_dir)
    models = tmp_path / "models"
    models.mkdir()
    (models / "current").symlink_to(package, target_is_directory=True)
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0)
    config = DaemonConfig.model_validate(
        {
            "device_id": "cam-cat",
            "profile": "x86-64-vnni",
            "model": str(models / "current"),
            "source": {"type": "video", "realtime": False, "uri": str(clip.path), "fps": 10, "loop": False},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    sub = Subscriber(mosquitto.port, "edge/cam-cat/predictions")
    try:
        with running(config) as daemon:
            assert wait_until(daemon.sources_done.is_set, 120)
        made = daemon.predictions
        assert made == clip.frame_count  # paced at the clip's rate: every frame is inferred
        assert sub.wait_for(lambda ms: len({m["seq"] for m in ms}) >= made, 30)
        predictions = {m["source"]["frame"]: m for m in sub.payloads()}
        cats = [f for f in predictions if clip.is_cat(f)]
        others = [f for f in predictions if not clip.is_cat(f)]
        assert cats and others
        top1 = {f: predictions[f]["result"]["top_k"][0]["index"] for f in predictions}
        cat_hits = sum(top1[f] in CAT_CLASSES for f in cats)
        false_cats = sum(top1[f] in CAT_CLASSES for f in others)
        assert cat_hits >= 0.9 * len(cats), {f: predictions[f]["result"]["top_k"][0] for f in cats}
        assert false_cats <= 0.1 * len(others)
    finally:
        sub.close()
