"""Inference on request over MQTT (`{prefix}/{device}/infer`): real mosquitto, real JPEG/PNG decoding,
a real ONNX Runtime session; MQTT 5 response topic + correlation data, and 3.1.1 `reply_to`."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge.config import DaemonConfig
from edge.daemon import Daemon
from edge.publish.payload import prediction_schema
from edge.publish.requests import RateLimiter, RequestRejected, parse_infer_request
from tests.broker import Mosquitto
from tests.daemon_helpers import InferClient, make_tiny_package, wait_until

DEVICE = "cam-req"
TOPIC = f"edge/{DEVICE}/infer"


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:] = rgb[::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def _parse(payload: bytes, **kw: Any) -> Any:
    defaults: dict[str, Any] = {"content_type": None, "response_topic": None, "correlation_data": None}
    return parse_infer_request(TOPIC, payload, max_bytes=4096, **{**defaults, **kw})


def test_bad_requests_are_answered_with_the_field_and_unanswerable_ones_say_so() -> None:
    route = {"response_topic": "app/replies"}
    cases = [
        (b"not json", route, "payload", "neither JSON nor a typed image"),
        (b"[1]", route, "payload", "must be a JSON object"),
        (b'{"image_b64": "@@@"}', route, "image_b64", "not base64"),
        (
            json.dumps({"image_b64": base64.b64encode(b"plain text").decode()}).encode(),
            route,
            "image_b64",
            "not a JPEG",
        ),
        (b'{"text": "a", "inputs": {}}', route, "text", "exactly one of"),
        (b'{"imagee": "x"}', route, "imagee", "unknown field"),
        (b'{"texts": [1]}', route, "texts", "a list of strings"),
        (b"x" * 5000, route, "payload", "limit is 4096 (requests.max_bytes)"),
        (b"\xff\xd8 not really", {**route, "content_type": "image/jpeg"}, "payload", "not a JPEG"),
        (b'{"text": "a", "sequence_end": true}', route, "sequence_id", "sequence_end needs sequence_id"),
    ]
    for payload, kw, field, text in cases:
        with pytest.raises(RequestRejected) as caught:
            _parse(payload, **kw)
        assert caught.value.field == field and text in str(caught.value), (payload[:30], str(caught.value))
        assert caught.value.reply is not None and caught.value.reply.topic == "app/replies"
        assert json.loads(caught.value.body())["field"] == field
    with pytest.raises(RequestRejected, match="reply_to") as caught:
        _parse(b'{"text": "hello"}')
    assert caught.value.reply is None  # nowhere to answer: the publisher counts it
    legacy = _parse(b'{"text": "hi", "reply_to": "app/r", "correlation_id": 7}')
    assert legacy.reply.topic == "app/r" and legacy.correlation_id == 7 and legacy.texts == ["hi"]
    with pytest.raises(RequestRejected, match="reply_to") as caught:
        _parse(b'{"text": "hi", "reply_to": "app/#"}')


def test_the_rate_limit_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", now=0.0)  # per client
    assert not limiter.allow("a", now=0.2) and limiter.allow("a", now=0.55)


@pytest.fixture
def serving(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Daemon]:
    make_tiny_package(tmp_path / "models" / "v1")
    config = DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(tmp_path / "models" / "v1"),
            "requests": {"enabled": True, "max_bytes": 65536, "rate_per_s": 5, "burst": 20},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    daemon = Daemon.from_config(config)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: daemon.publisher.connected, 10)
        time.sleep(0.3)  # the infer subscription follows the connection
        yield daemon
    finally:
        daemon.request_stop()
        runner.join(30)


def test_images_over_mqtt5_are_answered_to_the_response_topic_with_their_correlation_data(
    serving: Daemon, mosquitto: Mosquitto
) -> None:
    app = InferClient(mosquitto.port, mqtt.MQTTv5, TOPIC)
    try:
        colours = {b"r-1": (250, 10, 10), b"g-2": (10, 250, 10), b"b-3": (10, 10, 250)}
        for correlation, rgb in colours.items():
            app.send(_jpeg(rgb), "image/jpeg", correlation)
        _, png = cv2.imencode(".png", np.full((20, 20, 3), (10, 250, 10), np.uint8))  # green in BGR too
        app.send(png.tobytes(), "image/png", b"png-4")
        replies = dict(app.wait(4))
    finally:
        app.close()
    assert set(replies) == {b"r-1", b"g-2", b"b-3", b"png-4"}
    validator = jsonschema.Draft202012Validator(prediction_schema())
    expected = {b"r-1": "red", b"g-2": "green", b"b-3": "blue", b"png-4": "green"}
    for correlation, reply in replies.items():
        validator.validate(reply)
        assert reply["source"]["uri"] == "mqtt:infer" and reply["seq"] >= 1
        assert reply["result"]["top_k"][0]["label"] == expected[correlation], reply["result"]


def test_mqtt311_requests_name_reply_to_and_get_their_correlation_id_back(
    serving: Daemon, mosquitto: Mosquitto
) -> None:
    app = InferClient(mosquitto.port, mqtt.MQTTv311, TOPIC)
    try:
        image = base64.b64encode(_jpeg((250, 10, 10))).decode()
        app.send(json.dumps({"image_b64": image, "reply_to": app.topic, "correlation_id": "q-1"}).encode())
        tensor = np.full((1, 3, 32, 32), 0.9, np.float32)
        tensor[0, 1:] = 0.1  # mostly red, already normalised
        app.send(
            json.dumps(
                {"inputs": {"input": tensor.tolist()}, "reply_to": app.topic, "correlation_id": 2}
            ).encode()
        )
        app.send(
            json.dumps({"inputs": {"input": [[1, 2]]}, "reply_to": app.topic, "correlation_id": 3}).encode()
        )
        app.send(json.dumps({"text": "hello", "reply_to": app.topic, "correlation_id": 4}).encode())
        replies = {body.get("request", body).get("correlation_id"): body for _, body in app.wait(4)}
    finally:
        app.close()
    assert replies["q-1"]["result"]["top_k"][0]["label"] == "red"
    assert replies[2]["result"]["top_k"][0]["label"] == "red"
    assert replies[3]["field"] == "inputs" and "shape [1, 2]" in replies[3]["error"], replies[3]
    assert replies[4]["field"] == "text" and "not text" in replies[4]["error"]


def test_a_request_with_nowhere_to_answer_is_counted_and_a_flood_is_rate_limited(
    serving: Daemon, mosquitto: Mosquitto
) -> None:
    app = InferClient(mosquitto.port, mqtt.MQTTv311, TOPIC)
    try:
        app.send(json.dumps({"image_b64": base64.b64encode(_jpeg((1, 2, 3))).decode()}).encode())
        assert wait_until(lambda: serving.publisher.stats["requests_unanswerable"] == 1, 10)
        body = json.dumps(
            {"image_b64": base64.b64encode(_jpeg((250, 10, 10))).decode(), "reply_to": app.topic}
        )
        for _ in range(30):  # burst 20, then 5/s
            app.send(body.encode())
        replies = [reply for _, reply in app.wait(30)]
    finally:
        app.close()
    limited = [r for r in replies if "rate limit" in r.get("error", "")]
    served = [r for r in replies if "result" in r]
    assert len(replies) == 30 and 20 <= len(served) <= 25 and len(limited) == 30 - len(served)
    assert limited[0]["field"] == "payload" and "at most 5 requests/s per client" in limited[0]["error"]
