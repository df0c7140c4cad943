"""Small real things for the daemon tests: a tiny ONNX classifier package (built with onnx.helper, so it
loads in milliseconds), a config writer, and a paho subscriber that records what the broker delivers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TINY_LABELS = ["red", "green", "blue", "gray"]


def _tiny_model_bytes(weights: np.ndarray, bias: np.ndarray, batch: int | str = 1) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, len(TINY_LABELS)])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_tiny_package(
    out_dir: Path,
    *,
    version: str = "1.0.0",
    gain: float = 4.0,
    corrupt: str | None = None,
    sequence: int = 0,
    sign_key: bytes | None = None,
    batch: int | str = 1,
) -> Path:
    """A classification package whose logits are the mean R, G, B of the frame (plus a constant 'gray').

    `gain` changes the weights, hence the artifact's sha256 (an "old" and a "new" model). `corrupt` makes
    a broken package: "golden" (golden outputs that the model does not reproduce) or "hash" (an artifact
    whose bytes no longer match the manifest). `batch="N"` gives it a dynamic batch axis.
    """
    import onnxruntime as ort

    from edge.package import Golden, Manifest, TensorSpec, describe_file, utc_now, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((3, len(TINY_LABELS)), np.float32)
    weights[0, 0] = weights[1, 1] = weights[2, 2] = gain
    bias = np.array([0, 0, 0, gain * 0.45], np.float32)
    model_bytes = _tiny_model_bytes(weights, bias, batch)
    (out_dir / "model.onnx").write_bytes(model_bytes)
    (out_dir / "labels.txt").write_text("\n".join(TINY_LABELS) + "\n")

    rng = np.random.default_rng(0)
    golden_in = rng.random((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    golden_out = session.run(None, {"input": golden_in})[0]
    if corrupt == "golden":
        golden_out = golden_out + 1.0
    (out_dir / "golden").mkdir(exist_ok=True)
    np.savez(out_dir / "golden" / "inputs.npz", input=golden_in)
    np.savez(out_dir / "golden" / "outputs.npz", logits=golden_out)

    artifact = describe_file(out_dir, "model.onnx")
    manifest = Manifest.model_validate(
        {
            "schema": "edge.package/1",
            "name": "tiny-colour",
            "version": version,
            "created": utc_now(),
            "task": "classification",
            "artifacts": [{**artifact, "format": "onnx", "precision": "fp32"}],
            "inputs": [
                TensorSpec(
                    name="input",
                    shape=[batch, 3, 32, 32],
                    layout="NCHW",
                    color="RGB",
                    resize="stretch",
                    mean=[0, 0, 0],
                    std=[255, 255, 255],
                ).model_dump(exclude_none=True)
            ],
            "outputs": [{"name": "logits", "shape": [batch, len(TINY_LABELS)], "dtype": "float32"}],
            "postprocess": {"type": "classification", "softmax": True, "top_k": 2},
            "labels": "labels.txt",
            "golden": Golden(
                inputs="golden/inputs.npz", outputs="golden/outputs.npz", tolerance={"atol": 1e-3}
            ).model_dump(),
            "sequence": sequence,
        }
    )
    write_manifest(out_dir, manifest, sign_key=sign_key)
    if corrupt == "hash":
        with (out_dir / "model.onnx").open("r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\0\0\0\0")
    return out_dir


def write_config(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(fields, default=str)), sort_keys=False))
    return path


class Subscriber:
    """A separate paho client recording every message on `topic` (QoS 1, its own persistent session)."""

    def __init__(self, port: int, topic: str, client_id: str = "test-subscriber", qos: int = 1):
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=qos)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"subscription to {topic} not acknowledged within 10 s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def payloads(self, suffix: str = "") -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float, suffix: str = ""
    ) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]
                if predicate(found):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def subscribed(port: int, topic: str, client_id: str = "test-subscriber") -> Iterator[Subscriber]:
    """A `Subscriber` for the length of the block, closed however the block ends."""
    sub = Subscriber(port, topic, client_id=client_id)
    try:
        yield sub
    finally:
        sub.close()


@contextmanager
def running_daemon(config: Any, notifier: Any = None) -> Iterator[Any]:
    """`Daemon.from_config(config)` started and running on a thread for the length of the block, then
    stopped (it must stop within 30 s)."""
    from edge.daemon import Daemon

    daemon = Daemon.from_config(config, notifier=notifier)
    daemon.start()
    runner = threading.Thread(target=daemon.run, name="daemon-run", daemon=True)
    runner.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        runner.join(30)
        assert not runner.is_alive(), "daemon did not stop within 30 s"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_sensor_package(out_dir: Path, window: int = 16, channels: int = 2) -> Path:
    """A raw-output package whose output is the per-channel mean of a (window, channels) sensor window."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge.package import Manifest, describe_file, utc_now, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1], keepdims=0)],
        "sensor-mean",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, window, channels])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, channels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (out_dir / "model.onnx").write_bytes(model.SerializeToString())
    golden_in = np.random.default_rng(1).standard_normal((1, window, channels)).astype(np.float32)
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (out_dir / "golden").mkdir(exist_ok=True)
    np.savez(out_dir / "golden" / "inputs.npz", window=golden_in)
    np.savez(out_dir / "golden" / "outputs.npz", mean=session.run(None, {"window": golden_in})[0])
    manifest = Manifest.model_validate(
        {
            "schema": "edge.package/1",
            "name": "sensor-mean",
            "version": "1.0.0",
            "created": utc_now(),
            "task": "raw",
            "artifacts": [{**describe_file(out_dir, "model.onnx"), "format": "onnx", "precision": "fp32"}],
            "inputs": [
                {"name": "window", "shape": [1, window, channels], "dtype": "float32", "layout": "NTC"}
            ],
            "outputs": [{"name": "mean", "shape": [1, channels], "dtype": "float32"}],
            "postprocess": {"type": "raw"},
            "golden": {
                "inputs": "golden/inputs.npz",
                "outputs": "golden/outputs.npz",
                "tolerance": {"atol": 1e-4},
            },
        }
    )
    write_manifest(out_dir, manifest)
    return out_dir


def make_detection_package(out_dir: Path) -> Path:
    """A detection package (`boxes` format: normalized xyxy + class scores) that sees one 'person' in the
    left half of every frame and a 'car' at the bottom right, whatever the frame (a still scene)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge.package import Manifest, describe_file, utc_now, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = np.array([[[0.1, 0.2, 0.4, 0.9], [0.6, 0.6, 0.95, 0.95]]], np.float32)
    scores = np.array([[[0.9, 0.02], [0.03, 0.8]]], np.float32)
    nodes = [
        # zero times the image: an output that depends on the input as a real model's does
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["boxes_c", "nothing"], ["boxes"]),
        helper.make_node("Add", ["scores_c", "nothing"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "still-scene",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 2, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 2]),
        ],
        initializer=[
            numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
            numpy_helper.from_array(boxes, "boxes_c"),
            numpy_helper.from_array(scores, "scores_c"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (out_dir / "model.onnx").write_bytes(model.SerializeToString())
    (out_dir / "labels.txt").write_text("person\ncar\n")
    golden_in = np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    out_boxes, out_scores = session.run(None, {"input": golden_in})
    (out_dir / "golden").mkdir(exist_ok=True)
    np.savez(out_dir / "golden" / "inputs.npz", input=golden_in)
    np.savez(out_dir / "golden" / "outputs.npz", boxes=out_boxes, scores=out_scores)
    manifest = Manifest.model_validate(
        {
            "schema": "edge.package/1",
            "name": "still-scene",
            "version": "1.0.0",
            "created": utc_now(),
            "task": "detection",
            "artifacts": [{**describe_file(out_dir, "model.onnx"), "format": "onnx", "precision": "fp32"}],
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "dtype": "float32",
                    "layout": "NCHW",
                    "color": "RGB",
                    "resize": "stretch",
                    "mean": [0, 0, 0],
                    "std": [255, 255, 255],
                }
            ],
            "outputs": [
                {"name": "boxes", "shape": [1, 2, 4], "dtype": "float32"},
                {"name": "scores", "shape": [1, 2, 2], "dtype": "float32"},
            ],
            "postprocess": {"type": "detection", "format": "boxes", "score_threshold": 0.5},
            "labels": "labels.txt",
            "golden": {
                "inputs": "golden/inputs.npz",
                "outputs": "golden/outputs.npz",
                "tolerance": {"atol": 1e-4},
            },
        }
    )
    write_manifest(out_dir, manifest)
    return out_dir


def tracked_clip_config(tmp_path: Path, port: int, device_id: str, **overrides: Any) -> dict[str, Any]:
    """A daemon config (as a dict) with every object feature on: the still-scene detector of
    `make_detection_package` on `labelled_clip()` as source `driveway` with a `gate` zone, tracking,
    snapshots and Home Assistant discovery; state under `tmp_path`."""
    from tests.assets_media import labelled_clip

    package = make_detection_package(tmp_path / "models" / "still")
    config: dict[str, Any] = {
        "device_id": device_id,
        "profile": "x86-64-avx2",
        "model": str(package),
        "sources": [
            {
                "type": "video",
                "uri": str(labelled_clip().path),
                "realtime": False,
                "loop": False,
                "fps": 50,
                "name": "driveway",
                # the person's bottom centre (0.25, 0.9) is in the gate; the car's (0.775, 0.95) is not
                "zones": {"gate": [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]},
            }
        ],
        "tracking": {"enabled": True, "min_hits": 2, "max_age_s": 1.0},
        "snapshots": {"enabled": True, "dir": str(tmp_path / "snapshots"), "min_interval_s": 0.0},
        "homeassistant": {"enabled": True},
        "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
        "outbox": {"path": str(tmp_path / "state" / "outbox.db")},
        "metrics": None,
    }
    return {**config, **overrides}


class InferClient:
    """An application asking the device: MQTT 5 (response topic + correlation data) or 3.1.1."""

    def __init__(self, port: int, protocol: int, infer_topic: str) -> None:
        self.infer_topic = infer_topic
        self.replies: list[tuple[bytes | None, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.topic = f"app/{uuid.uuid4().hex[:8]}/replies"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.cond:
            self.replies.append((correlation, json.loads(msg.payload)))
            self.cond.notify_all()

    def send(
        self,
        payload: bytes,
        content_type: str | None = None,
        correlation: bytes | None = None,
        topic: str | None = None,
    ) -> None:
        props = None
        if self.client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.topic
            if correlation is not None:
                props.CorrelationData = correlation
            if content_type:
                props.ContentType = content_type
        self.client.publish(topic or self.infer_topic, payload, qos=1, properties=props).wait_for_publish(10)

    def wait(self, count: int, timeout: float = 20) -> list[tuple[bytes | None, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.replies) < count and time.monotonic() < deadline:
                self.cond.wait(0.2)
            return list(self.replies)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
