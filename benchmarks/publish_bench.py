"""Outbox add() rate and QoS 1 drain rate from a pre-filled outbox to a local mosquitto it starts itself.

    python benchmarks/publish_bench.py [--messages 20000] [--window 500] [--qos 1] [--json]

Measured in one run: add() rate (each add is one SQLite WAL transaction, synchronous=NORMAL), then the
time from Publisher.start() to the outbox being empty (every message PUBACKed and deleted), and the
time until a separate subscriber has them all. Target from the issue: >= 5,000 msg/s at QoS 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.publish.mqtt import MqttConfig, Publisher
from edge.publish.outbox import Outbox
from edge.publish.payload import build_prediction
from tests.broker import Mosquitto

SUBSCRIBER = """
import sys, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, expected, qos = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
count = 0
done = threading.Event()
def on_message(*_):
    global count
    count += 1
    if count >= expected:
        done.set()
client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
client.on_message = on_message
client.on_subscribe = lambda *_: print("ready", flush=True)
client.connect("127.0.0.1", port)
client.subscribe("edge/bench/predictions", qos=qos)
client.loop_start()
done.wait(300)
print(count, flush=True)
"""


def sample(boot_id: str, frame: int) -> dict[str, object]:
    now = time.time()
    return build_prediction(
        device_id="bench",
        boot_id=boot_id,
        ts=now,
        source={"uri": "file:///clip.mp4", "frame": frame, "captured_at": now},
        model={"name": "mobilenet", "version": "1", "sha256": hashlib.sha256(b"m").hexdigest()},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 9.1, "preprocess": 0.8, "inference": 6.2, "postprocess": 0.1},
        result={"type": "classification", "top_k": [{"label": "tabby", "index": 281, "score": 0.71}]},
    )


def start_subscriber(port: int, expected: int, qos: int) -> subprocess.Popen[str]:
    """A separate process, so it does not compete with the publisher for the GIL."""
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, str(port), str(expected), str(qos)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
    return sub


def finish_subscriber(sub: subprocess.Popen[str], timeout: float) -> int:
    try:
        sub.wait(timeout)
    except subprocess.TimeoutExpired:
        sub.kill()
        sub.wait()
        return -1
    assert sub.stdout is not None
    return int(sub.stdout.readline().strip() or 0)


def bare_paho_rate(port: int, payloads: list[bytes], qos: int, window: int) -> tuple[float, float, int]:
    """The same messages through a plain paho client (no outbox, no acks to SQLite): the ceiling."""
    sub = start_subscriber(port, len(payloads), qos)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(window)
    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked >= len(payloads):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    start, cpu = time.perf_counter(), time.process_time()
    for payload in payloads:
        client.publish("edge/bench/predictions", payload, qos)
    done.wait(300)
    elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return elapsed, cpu_used, finish_subscriber(sub, 120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--protocol", type=int, default=5, choices=(5, 311))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    count = args.messages

    with tempfile.TemporaryDirectory(prefix="publish-bench-") as tmp:
        work = Path(tmp)
        boot = str(uuid.uuid4())
        outbox = Outbox(work / "outbox.db", max_bytes=1 << 30)
        samples = [sample(boot, frame) for frame in range(count)]
        start, cpu = time.perf_counter(), time.process_time()
        for payload in samples:
            outbox.add(payload)
        add_s, add_cpu = time.perf_counter() - start, time.process_time() - cpu
        payloads = [data for _, data in outbox.pending(count)]
        broker = Mosquitto(work / "broker", persistence=False).start()
        try:
            bare_s, bare_cpu, bare_received = bare_paho_rate(broker.port, payloads, args.qos, args.window)
            sub = start_subscriber(broker.port, count, args.qos)
            config = MqttConfig(
                port=broker.port, qos=args.qos, protocol=args.protocol, inflight_window=args.window
            )
            publisher = Publisher(config, "bench", outbox)
            start, cpu = time.perf_counter(), time.process_time()
            publisher.start()
            deadline = time.monotonic() + 300
            while outbox.depth and time.monotonic() < deadline:
                time.sleep(0.002)
            drained_s, drained_cpu = time.perf_counter() - start, time.process_time() - cpu
            received = finish_subscriber(sub, 120)
            stats = publisher.stats
            publisher.stop()
        finally:
            broker.stop()
            outbox.close()

    result = {
        "messages": count,
        "payload_bytes": len(payloads[0]),
        "qos": args.qos,
        "protocol": args.protocol,
        "window": args.window,
        "outbox_add_per_s": round(count / add_s),
        "outbox_add_cpu_us": round(add_cpu / count * 1e6, 1),
        "drain_acked_per_s": round(count / drained_s),
        "drain_cpu_us_per_msg": round(drained_cpu / count * 1e6, 1),
        "bare_paho_per_s": round(count / bare_s),
        "bare_paho_cpu_us_per_msg": round(bare_cpu / count * 1e6, 1),
        "drain_vs_bare_paho": round(bare_s / drained_s, 2),
        "received_by_subscriber": received,
        "bare_received_by_subscriber": bare_received,
        "acked": stats["acked"],
        "drain_ratio_to_5000_target": round(count / drained_s / 5000, 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    return 0 if received >= count and stats["acked"] == count else 1


if __name__ == "__main__":
    raise SystemExit(main())
