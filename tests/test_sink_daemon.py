"""A real daemon (tiny ONNX model, a real clip) publishing into a real edge-sink: every prediction the
daemon made is a row, its status is the device's state, and the client library sees the same stream."""

from __future__ import annotations

import threading
from pathlib import Path

from edge.client import Prediction, subscribe
from edge.config import DaemonConfig
from edge.daemon import Daemon
from edge.sink.config import load_sink_config
from edge.sink.service import Sink
from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, wait_until
from tests.sink_helpers import pg_query, pg_schema, pg_url, sink_config


def test_a_daemons_predictions_all_land_in_postgresql(tmp_path: Path, mosquitto: Mosquitto) -> None:
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0).path
    make_tiny_package(tmp_path / "models" / "v1")
    config = DaemonConfig.model_validate(
        {
            "device_id": "cam-01",
            "profile": "x86-64-avx2",
            "model": str(tmp_path / "models" / "v1"),
            "source": {"type": "video", "realtime": False, "uri": str(clip), "fps": 50, "loop": False},
            "mqtt": {
                "host": "127.0.0.1",
                "port": mosquitto.port,
                "topic_prefix": "edge",
                "reconnect_max_s": 1.0,
            },
            "outbox": {"path": str(tmp_path / "state" / "outbox.db")},
            "metrics": None,
        }
    )
    with pg_schema() as schema:
        sink = Sink(load_sink_config(sink_config(tmp_path / "sink.yaml", mosquitto.port, pg_url(), schema)))
        sink.start()
        assert sink.wait_subscribed(10)
        with subscribe("127.0.0.1", mosquitto.port, kinds=("predictions",), grace_s=0.0) as sub:
            daemon = Daemon.from_config(config)
            daemon.start()
            thread = threading.Thread(target=daemon.run, daemon=True)
            thread.start()
            try:
                assert wait_until(daemon.sources_done.is_set, 60)
            finally:
                daemon.request_stop()
                thread.join(30)
            made = daemon.predictions
            assert made >= 40
            assert wait_until(lambda: sink.stored == made, 20), (sink.stored, made)
            seen = [m for m in iter(lambda: sub.get(timeout=2), None) if isinstance(m, Prediction)]
        state = lambda: pg_query(f'SELECT state, model_name, predictions FROM "{schema}".devices')  # noqa: E731
        assert wait_until(lambda: state() == [("offline", "tiny-colour", made)], 10), state()
        sink.stop()
        stored = pg_query(
            f"SELECT seq, result->'top_k'->0->>'label' FROM \"{schema}\".predictions ORDER BY seq"
        )
        assert [seq for seq, _ in stored] == list(range(stored[0][0], stored[0][0] + made))
        assert sorted((m.seq, m.result["top_k"][0]["label"]) for m in seen) == [tuple(r) for r in stored]
        assert sub.tracker.gaps() == [] and sub.tracker.duplicates == 0
