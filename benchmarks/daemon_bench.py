"""Daemon overhead, measured in one run against a private mosquitto:

1. throughput: the daemon on a file source at full speed vs a bare loop (pre -> backend -> post) over the
   same decoded frames, same package, same process (target >= 0.95x);
2. latency at 10 fps: capture-to-publish p99 (as the payload reports it, and as a subscriber receives it)
   vs inference p99 (target: <= inference p99 + 5 ms);
3. RSS of the running daemon (a separate `edge-infer run` process).

    python benchmarks/daemon_bench.py [--package PKG] [--seconds 10]

Default package: the demo's EfficientNet-Lite0 int8 (`edge-infer demo` builds it once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def decode_frames(clip: Path, limit: int) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    frames = []
    while len(frames) < limit:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def bare_loop(package_dir: Path, profile_name: str, frames: list[np.ndarray]) -> dict[str, float]:
    from edge.package import load_package
    from edge.profiles import resolve_profile
    from edge.session import open_session

    profile = resolve_profile(profile_name).profile
    session = open_session(load_package(package_dir), profile, backend=None, threads=None)
    try:
        assert session.image_pre is not None, "the daemon benchmark serves an image model"
        name = session.input_specs[0].name
        tensors = [session.image_pre(f)[0] for f in frames]
        started = time.perf_counter()
        for tensor in tensors:
            session.loaded.run({name: tensor})
        backend_only = len(tensors) / (time.perf_counter() - started)
        started = time.perf_counter()
        for frame in frames:
            session.infer(frame)
        pipeline = len(frames) / (time.perf_counter() - started)
        return {"backend_fps": backend_only, "pipeline_fps": pipeline, "provider": session.provider}  # type: ignore[dict-item]
    finally:
        session.close()


class Collector:
    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.received: list[tuple[float, dict[str, Any]]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda c, u, m: self.received.append((time.time(), json.loads(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("benchmark subscriber could not subscribe")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def daemon_full_speed(config: Any, seconds: float) -> dict[str, float]:
    """Predictions per second of a running daemon whose looping file source is read as fast as it goes."""
    from edge.daemon import Daemon

    daemon = Daemon.from_config(config)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while daemon.predictions < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # past the first frames (decoder start-up)
    first, started = daemon.predictions, time.perf_counter()
    frames_before = sum(s.stats.get("frames_in", 0) for s in daemon.sources)
    time.sleep(seconds)
    made, elapsed = daemon.predictions - first, time.perf_counter() - started
    frames_in = sum(s.stats.get("frames_in", 0) for s in daemon.sources) - frames_before
    daemon.request_stop()
    runner.join(60)
    return {"fps": made / elapsed, "predictions": made, "frames_in": frames_in}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    parser.add_argument("--package", type=Path, default=cache / "demo" / "efficientnet-lite0-int8")
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--frames", type=int, default=200, help="frames for the throughput comparison")
    parser.add_argument("--rounds", type=int, default=3, help="paired bare/daemon throughput rounds")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of the full-speed run and of the 10 fps run"
    )
    args = parser.parse_args()

    from edge.config import DaemonConfig
    from edge.demo import make_demo_clip
    from tests.broker import Mosquitto

    if not (args.package / "manifest.json").is_file():
        print(f"no package at {args.package}: run `edge-infer demo` once or pass --package", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # A clip long enough for the full-speed run: the demo photos, 50 frames each.
        clip = make_demo_clip(tmp / "clip.avi", fps=25.0, seconds_each=args.frames / 4 / 25.0)
        frames = decode_frames(clip, args.frames)
        models = tmp / "models"
        models.mkdir()
        (models / "current").symlink_to(args.package.absolute(), target_is_directory=True)
        broker = Mosquitto(tmp / "broker", persistence=False).start()
        try:
            base = {
                "device_id": "bench",
                "profile": args.profile,
                "model": str(models / "current"),
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "qos": 1},
                "metrics": None,
            }
            # The machine may be shared: alternate bare and daemon rounds and compare each pair.
            full_config = DaemonConfig.model_validate(
                {
                    **base,
                    "source": {"type": "video", "realtime": False, "uri": str(clip), "loop": True},
                    "outbox": {"path": str(tmp / "full.db")},
                }
            )
            rounds = []
            for _ in range(args.rounds):
                bare = bare_loop(models / "current", args.profile, frames)
                full = daemon_full_speed(full_config, args.seconds / args.rounds)
                rounds.append((bare, full))
                print(
                    f"  round: bare backend {bare['backend_fps']:.1f} fps, bare pre+backend+post "
                    f"{bare['pipeline_fps']:.1f} fps, daemon {full['fps']:.1f} fps "
                    f"({full['predictions']} predictions, {full['frames_in']} frames decoded)"
                )
            to_pipeline = float(np.median([f["fps"] / b["pipeline_fps"] for b, f in rounds]))
            to_backend = float(np.median([f["fps"] / b["backend_fps"] for b, f in rounds]))
            print(
                f"package {args.package.name} on {rounds[0][0]['provider']}, {len(frames)} frames of {clip.name}"
            )
            print(
                f"throughput (median of {args.rounds} paired rounds): daemon on a file at full speed, to MQTT QoS 1 "
                f"/ bare pre+backend+post loop = {to_pipeline:.3f} (target >= 0.95); "
                f"/ bare backend.run loop = {to_backend:.3f}"
            )

            config_path = tmp / "edge.yaml"
            config_path.write_text(
                json.dumps(
                    {
                        **base,
                        "source": {
                            "type": "video",
                            "realtime": False,
                            "uri": str(clip),
                            "fps": 10,
                            "loop": True,
                        },
                        "outbox": {"path": str(tmp / "paced.db")},
                    }
                )
            )
            collector = Collector(broker.port, "edge/bench/predictions")
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "run", "--config", str(config_path)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 60
                while not collector.received and time.monotonic() < deadline:
                    time.sleep(0.05)
                collector.received.clear()  # measure steady state only
                time.sleep(args.seconds)
                rss = rss_kib(proc.pid)
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                collector.close()
        finally:
            broker.stop()
        received = collector.received

        inference = [m["latency_ms"]["inference"] for _, m in received]
        pre_post = [m["latency_ms"]["preprocess"] + m["latency_ms"]["postprocess"] for _, m in received]
        to_outbox = [m["latency_ms"]["capture_to_publish"] for _, m in received]
        to_subscriber = [
            (t - datetime.fromisoformat(m["source"]["captured_at"].replace("Z", "+00:00")).timestamp()) * 1e3
            for t, m in received
        ]
        p99_inf = _percentile(inference, 99)
        p99_out = _percentile(to_outbox, 99)
        p99_sub = _percentile(to_subscriber, 99)
        print(f"latency at 10 fps over {args.seconds:.0f} s ({len(received)} predictions):")
        print(f"  inference p50 {_percentile(inference, 50):.2f} ms, p99 {p99_inf:.2f} ms")
        print(
            f"  capture->outbox (payload capture_to_publish) p50 {_percentile(to_outbox, 50):.2f} ms, "
            f"p99 {p99_out:.2f} ms: +{p99_out - p99_inf:.2f} ms over inference p99 (target <= +5)"
        )
        print(
            f"  of which pre+post-processing p50 {_percentile(pre_post, 50):.2f} ms, p99 {_percentile(pre_post, 99):.2f} ms"
        )
        print(
            f"  capture->subscriber (MQTT QoS 1 delivered) p50 {_percentile(to_subscriber, 50):.2f} ms, "
            f"p99 {p99_sub:.2f} ms: +{p99_sub - p99_inf:.2f} ms over inference p99"
        )
        print(f"RSS of the running daemon (edge-infer run, 10 fps): {rss / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
