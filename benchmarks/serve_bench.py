"""Throughput and serving, measured in one run against a private mosquitto:

1. batching and workers: 4 file sources read flat out into one daemon, `batching.max_size` 4 vs 1 and
   `workers` 2 (the threads split) vs 1, run in
   alternating blocks (predictions/s and capture-to-publish p50/p99 for both; target >= 1.25x for the
   int8 example);
2. requests: `{prefix}/{device}/infer` at a fixed rate (default 50/s for 60 s) with real JPEG photo
   crops over MQTT 5 (response topic + correlation data): lost, unmatched, request-to-reply p50/p99;
   the same over HTTP (`POST /infer`);
3. a pool of 3 daemons on one broker at half that rate for half as long, one SIGKILLed and restarted
   mid-run: the share each served and what went unanswered.

    python benchmarks/serve_bench.py [--package PKG] [--blocks 3] [--block-seconds 8] [--rate 50] [--seconds 60]
    python benchmarks/serve_bench.py --text [--package PKG] [--rate 20] [--seconds 60]

`--text`: only (2), with `{"text": ...}` requests (unseen English sentences) to a text package (default:
all-MiniLM-L6-v2 converted once with `edge-convert` into $EDGE_CACHE/serve_bench), and the RSS of the
process the daemon runs in (this one, beside the MQTT client) before the daemon and at the end.

The package needs a dynamic batch axis (`edge-convert` exports one); default: EfficientNet-Lite0 int8
converted once into $EDGE_CACHE/serve_bench (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}; {os.cpu_count()} cores; {' '.join(wanted) or 'no avx2'}"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def ensure_package(cache: Path) -> Path:
    """EfficientNet-Lite0 int8 with a dynamic batch axis, converted once."""
    from edge.demo import write_photo_crops

    package = cache / "serve_bench" / "efficientnet-lite0-int8"
    if (package / "manifest.json").is_file():
        return package
    calib = write_photo_crops(cache / "demo" / "calib", 64, seed=1)
    evaluation = write_photo_crops(cache / "demo" / "eval", 48, seed=2)
    command = [
        sys.executable, "-m", "converters.cli", f"{REPO / 'examples' / 'efficientnet_lite0.py'}:build",
        "--out", str(package), "--calib", str(calib), "--eval", str(evaluation),
        "--input-shape", "1,3,224,224", "--mean", "127,127,127", "--std", "128,128,128",
        "--task", "classification", "-q",
    ]  # fmt: skip
    print(f"converting once: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return package


class Collector:
    """Predictions as a subscriber receives them."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"serve-bench-{uuid.uuid4().hex[:6]}"
        )
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("benchmark subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.received.append(json.loads(message.payload))

    def take(self) -> list[dict[str, Any]]:
        with self.lock:
            taken, self.received = self.received, []
        return taken

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_block(config: Any, seconds: float, collector: Collector) -> dict[str, float]:
    from edge.daemon import Daemon

    daemon = Daemon.from_config(config)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.predictions < 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # past the decoders' start-up
        time.sleep(0.5)
        collector.take()
        first, started = daemon.predictions, time.perf_counter()
        time.sleep(seconds)
        made, elapsed = daemon.predictions - first, time.perf_counter() - started
        received = collector.take()
    finally:
        daemon.request_stop()
        runner.join(60)
    latency = [m["latency_ms"]["capture_to_publish"] for m in received]
    batches = [m["runtime"].get("batch", 1) for m in received]
    return {
        "fps": made / elapsed,
        "p50": _pct(latency, 50),
        "p99": _pct(latency, 99),
        "mean_batch": float(np.mean(batches)) if batches else float("nan"),
    }


def batching(package: Path, tmp: Path, port: int, blocks: int, seconds: float, profile: str) -> None:
    from edge.config import DaemonConfig
    from edge.demo import make_demo_clip

    clips = [make_demo_clip(tmp / f"cam-{i}.avi", fps=25.0, seconds_each=1.0) for i in range(4)]
    base = {
        "device_id": "serve-bench",
        "profile": profile,
        "model": str(package),
        "sources": [{"type": "video", "uri": str(c), "realtime": False, "loop": True} for c in clips],
        "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
        "metrics": None,
        "frame_queue": 8,
    }
    threads = os.cpu_count() or 2
    variants = {
        "batch 1": {**base, "threads": threads, "outbox": {"path": str(tmp / "b1.db")}},
        "batch 4": {
            **base,
            "threads": threads,
            "outbox": {"path": str(tmp / "b4.db")},
            "batching": {"max_size": 4, "max_delay_ms": 5},
        },
        # the same cores as two sessions of threads/2 each, one frame per call
        "workers 2": {**base, "threads": threads, "workers": 2, "outbox": {"path": str(tmp / "w2.db")}},
    }
    collector = Collector(port, "edge/serve-bench/predictions")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    try:
        for block in range(blocks):
            order = list(variants) if block % 2 == 0 else list(reversed(variants))  # alternate the order
            for name in order:
                results[name].append(
                    run_block(DaemonConfig.model_validate(variants[name]), seconds, collector)
                )
                r = results[name][-1]
                print(
                    f"  block {block + 1} {name}: {r['fps']:.1f} predictions/s, capture->publish p50 "
                    f"{r['p50']:.1f} ms p99 {r['p99']:.1f} ms, mean batch {r['mean_batch']:.2f}",
                    flush=True,
                )
    finally:
        collector.close()
    ratios = [b4["fps"] / b1["fps"] for b1, b4 in zip(results["batch 1"], results["batch 4"], strict=True)]
    worker_ratios = [
        w["fps"] / b1["fps"] for b1, w in zip(results["batch 1"], results["workers 2"], strict=True)
    ]
    for name, rows in results.items():
        print(
            f"{name}: median {np.median([r['fps'] for r in rows]):.1f} predictions/s, capture->publish "
            f"p50 {np.median([r['p50'] for r in rows]):.1f} ms, p99 {np.median([r['p99'] for r in rows]):.1f} ms"
        )
    print(
        f"batching 4 sources, max_size 4 / max_size 1 throughput: median {np.median(ratios):.2f}x "
        f"(blocks: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 1.25x)"
    )
    print(
        f"workers: 2 sessions of {max(1, threads // 2)} thread(s) / 1 session of {threads}: median "
        f"{np.median(worker_ratios):.2f}x (blocks: {', '.join(f'{r:.2f}' for r in worker_ratios)})"
    )


def ensure_text_package(cache: Path) -> Path:
    """all-MiniLM-L6-v2 int8 (the recipe the gate picks), converted once."""
    from tests.assets_text import calib_eval_sentences, minilm_folder, write_lines

    package = cache / "serve_bench" / "minilm-int8"
    if (package / "manifest.json").is_file():
        return package
    calib, evaluation = calib_eval_sentences(300, 200)
    command = [
        sys.executable, "-m", "converters.cli", str(minilm_folder(cache)), "--out", str(package),
        "--task", "embedding", "--calib", str(write_lines(cache / "serve_bench" / "calib.txt", calib)),
        "--eval", str(write_lines(cache / "serve_bench" / "eval.txt", evaluation)), "-q",
    ]  # fmt: skip
    print(f"converting once: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO, check=False)  # exit 1 (gate missed) still writes the package
    return package


def _rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def requests(
    package: Path,
    tmp: Path,
    port: int,
    rate: float,
    seconds: float,
    profile: str,
    bodies: list[tuple[bytes, str | None]] | None = None,
) -> None:
    """`bodies`: (payload, MQTT 5 content type or None for JSON); default JPEG photo crops."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge.config import DaemonConfig
    from edge.daemon import Daemon

    if bodies is None:
        bodies = [(body, "image/jpeg") for body in _jpeg_crops(tmp)]
    rss_before, _ = _rss_mib()
    config = DaemonConfig.model_validate(
        {
            "device_id": "serve-bench",
            "profile": profile,
            "model": str(package),
            "requests": {"enabled": True, "rate_per_s": rate * 2, "burst": int(rate * 2)},
            "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
            "outbox": {"path": str(tmp / "requests.db")},
            "metrics": None,
        }
    )
    daemon = Daemon.from_config(config)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    sent: dict[bytes, float] = {}
    replies: dict[bytes, float] = {}
    errors: list[dict[str, Any]] = []
    lock = threading.Lock()
    topic = f"bench/{uuid.uuid4().hex[:8]}/replies"

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        now = time.perf_counter()
        correlation = bytes(message.properties.CorrelationData)
        body = json.loads(message.payload)
        with lock:
            if "error" in body:
                errors.append(body)
            replies[correlation] = now

    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    app.on_subscribe = lambda *a: subscribed.set()
    app.on_message = on_message
    app.connect("127.0.0.1", port)
    app.loop_start()
    app.subscribe(topic, qos=1)
    subscribed.wait(10)
    try:
        while not daemon.publisher.connected:
            time.sleep(0.05)
        time.sleep(0.5)
        count = int(rate * seconds)
        started = time.perf_counter()
        for index in range(count):
            due = started + index / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            body, content_type = bodies[index % len(bodies)]
            if content_type is not None:
                props.ContentType = content_type
            correlation = f"r{index}".encode()
            props.CorrelationData = correlation
            with lock:
                sent[correlation] = time.perf_counter()
            app.publish("edge/serve-bench/infer", body, qos=1, properties=props)
        deadline = time.monotonic() + 30
        while len(replies) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.loop_stop()
        app.disconnect()
        daemon.request_stop()
        runner.join(60)
    waits = [(replies[c] - sent[c]) * 1e3 for c in sent if c in replies]
    unmatched = [c for c in replies if c not in sent]
    print(
        f"requests: {len(sent)} sent at {rate:g}/s over {seconds:g} s, {len(replies)} answered, "
        f"{len(sent) - len(set(sent) & set(replies))} lost, {len(unmatched)} unmatched, {len(errors)} errors; "
        f"request->reply p50 {_pct(waits, 50):.1f} ms, p99 {_pct(waits, 99):.1f} ms"
    )
    rss, peak = _rss_mib()
    print(
        f"RSS of the process serving (daemon + MQTT client): {rss_before:.0f} MiB before the daemon, {rss:.0f} MiB at the end, peak {peak:.0f} MiB"
    )


def _jpeg_crops(tmp: Path) -> list[bytes]:
    import cv2

    from edge.demo import write_photo_crops

    bodies = []
    for path in sorted(write_photo_crops(tmp / "crops", 32, seed=3).glob("*.png")):
        ok, data = cv2.imencode(".jpg", cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        bodies.append(data.tobytes())
    return bodies


def http_requests(package: Path, tmp: Path, port: int, rate: float, seconds: float, profile: str) -> None:
    """POST /infer with JPEG bodies at `rate`/s (a sender thread per request in flight)."""
    import concurrent.futures
    import urllib.request

    from edge.config import DaemonConfig
    from edge.daemon import Daemon

    bodies = _jpeg_crops(tmp)
    config = DaemonConfig.model_validate(
        {
            "device_id": "serve-bench-http",
            "profile": profile,
            "model": str(package),
            "http": {"port": 0},
            "requests": {"rate_per_s": rate * 2, "burst": int(rate * 2)},
            "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
            "outbox": {"path": str(tmp / "http.db")},
            "metrics": None,
        }
    )
    daemon = Daemon.from_config(config)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    assert daemon._http is not None
    url = f"http://127.0.0.1:{daemon._http.port}/infer"

    def post(body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
                return response.status, (time.perf_counter() - started) * 1e3
        except Exception:
            return 0, (time.perf_counter() - started) * 1e3

    results: list[tuple[int, float]] = []
    try:
        count = int(rate * seconds)
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            futures = []
            started = time.perf_counter()
            for index in range(count):
                time.sleep(max(0.0, started + index / rate - time.perf_counter()))
                futures.append(pool.submit(post, bodies[index % len(bodies)]))
            results = [f.result() for f in futures]
    finally:
        daemon.request_stop()
        runner.join(60)
    ok = [ms for status, ms in results if status == 200]
    print(
        f"http: {len(results)} POST /infer at {rate:g}/s over {seconds:g} s, {len(ok)} answered 200, "
        f"{len(results) - len(ok)} failed; request->response p50 {_pct(ok, 50):.1f} ms, p99 {_pct(ok, 99):.1f} ms"
    )


def pool(package: Path, tmp: Path, port: int, rate: float, seconds: float, profile: str) -> None:
    """3 daemons (processes) in one pool; one SIGKILLed a third of the way in and restarted at two thirds:
    the share each served, and whether any request went unanswered."""
    import collections
    import signal

    import paho.mqtt.client as mqtt
    import yaml
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    bodies = _jpeg_crops(tmp)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    configs: dict[str, Path] = {}
    for name in ("pool-a", "pool-b", "pool-c"):
        config = {
            "device_id": name,
            "profile": profile,
            "model": str(package),
            "pool": {"name": "bench"},
            "threads": 1,
            "requests": {"rate_per_s": rate * 2, "burst": int(rate * 2)},
            "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
            "outbox": {"path": str(tmp / f"{name}.db")},
            "metrics": None,
        }
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))

    def start(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(configs[name])],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    answers: dict[bytes, str] = {}
    lock = threading.Lock()
    topic = f"bench/{uuid.uuid4().hex[:8]}/pool"

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        body = json.loads(message.payload)
        with lock:
            answers[bytes(message.properties.CorrelationData)] = str(body.get("device_id", "error"))

    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    app.on_subscribe = lambda *a: subscribed.set()
    app.on_message = on_message
    app.connect("127.0.0.1", port)
    app.loop_start()
    app.subscribe(topic, qos=1)
    subscribed.wait(10)
    for name in configs:
        procs[name] = start(name)
    time.sleep(8)  # three daemons load their model and subscribe
    count = int(rate * seconds)
    try:
        started = time.perf_counter()
        for index in range(count):
            time.sleep(max(0.0, started + index / rate - time.perf_counter()))
            if index == count // 3:
                procs["pool-b"].send_signal(signal.SIGKILL)
                procs["pool-b"].wait()
            if index == 2 * count // 3:
                procs["pool-b"] = start("pool-b")
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            props.ContentType = "image/jpeg"
            props.CorrelationData = f"p{index}".encode()
            app.publish("edge/pool/bench/infer", bodies[index % len(bodies)], qos=1, properties=props)
        deadline = time.monotonic() + 60
        while len(answers) < count and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        app.loop_stop()
        app.disconnect()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    shares = collections.Counter(answers.values())
    print(
        f"pool: {count} requests at {rate:g}/s over {seconds:g} s to 3 daemons, pool-b SIGKILLed at 1/3 and "
        f"restarted at 2/3: {len(answers)} answered, {count - len(answers)} lost; served by "
        + ", ".join(f"{name} {shares[name]}" for name in sorted(shares))
    )


def text_requests(args: argparse.Namespace, cache: Path) -> int:
    from tests.assets_text import calib_eval_sentences
    from tests.broker import Mosquitto

    package = args.package or ensure_text_package(cache)
    _, unseen = calib_eval_sentences(10, 800)
    bodies: list[tuple[bytes, str | None]] = [(json.dumps({"text": t}).encode(), None) for t in unseen[400:]]
    print(f"host: {cpu_flags()}; package {package}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "broker", persistence=False).start()
        try:
            requests(package, tmp, broker.port, args.rate, args.seconds, args.profile, bodies)
        finally:
            broker.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-requests", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--text", action="store_true", help="text requests to a text package (see above)")
    args = parser.parse_args()

    from edge.package import load_package
    from tests.broker import Mosquitto

    if args.text:
        return text_requests(args, cache)
    package = args.package or ensure_package(cache)
    shape = load_package(package).manifest.inputs[0].shape
    if isinstance(shape[0], int):
        print(
            f"{package}: input shape {shape} has a fixed batch; convert it again for a batch axis",
            file=sys.stderr,
        )
        return 2
    print(f"host: {cpu_flags()}; package {package} (input {shape})", flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "broker", persistence=False).start()
        try:
            if not args.skip_batching:
                batching(package, tmp, broker.port, args.blocks, args.block_seconds, args.profile)
            if not args.skip_requests:
                requests(package, tmp, broker.port, args.rate, args.seconds, args.profile)
                http_requests(package, tmp, broker.port, args.rate, args.seconds, args.profile)
                pool(package, tmp, broker.port, args.rate / 2, args.seconds / 2, args.profile)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
