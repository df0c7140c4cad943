"""Inference on request over HTTP: the Open Inference Protocol (KServe v2 REST) and POST /infer, served
by aiohttp in a real daemon with a real ONNX Runtime session and a real broker behind it."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import onnxruntime as ort
import pytest

from edge.config import DaemonConfig
from edge.daemon import Daemon
from edge.publish.payload import prediction_schema
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, subscribed, wait_until

DEVICE = "cam-http"
TOKEN = "s3cret-token-for-tests-0123"


def _daemon(tmp_path: Path, port: int, **http: Any) -> Daemon:
    package = make_tiny_package(tmp_path / "models" / "v1")
    config = DaemonConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": "x86-64-avx2",
            "model": str(package),
            "http": {"port": 0, **http},
            "requests": {"rate_per_s": 100, "burst": 100},
            "mqtt": {"host": "127.0.0.1", "port": port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    return Daemon.from_config(config)


@pytest.fixture
def serving(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Daemon]:
    daemon = _daemon(tmp_path, mosquitto.port)
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        runner.join(30)


def _call(
    daemon: Daemon,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
    **headers: str,
) -> tuple[int, dict[str, Any]]:
    assert daemon._http is not None
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon._http.port}{path}",
        data=body,
        headers={"Content-Type": content_type, **headers} if body is not None else headers,
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _red_tensor() -> np.ndarray:
    tensor = np.full((1, 3, 32, 32), 0.1, np.float32)
    tensor[0, 0] = 0.9
    return tensor


def test_open_inference_protocol_health_metadata_and_tensors(serving: Daemon, tmp_path: Path) -> None:
    assert _call(serving, "/v2/health/live") == (200, {"live": True})
    assert _call(serving, "/v2/health/ready") == (200, {"ready": True})
    status, server = _call(serving, "/v2")
    assert status == 200 and server["name"] == "edge-infer"
    status, metadata = _call(serving, "/v2/models/tiny-colour")
    assert status == 200, metadata
    assert metadata["versions"] == ["1.0.0"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [1, 4]}]
    assert _call(serving, "/v2/models/tiny-colour/ready")[0] == 200
    assert _call(serving, "/v2/models/other")[0] == 404

    tensor = _red_tensor()
    body = {
        "id": "req-7",
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": tensor.ravel().tolist()}
        ],
    }
    status, answer = _call(serving, "/v2/models/tiny-colour/infer", json.dumps(body).encode())
    assert status == 200, answer
    assert (
        answer["id"] == "req-7"
        and answer["model_name"] == "tiny-colour"
        and answer["model_version"] == "1.0.0"
    )
    [logits] = answer["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32" and logits["shape"] == [1, 4]
    expected = ort.InferenceSession(str(tmp_path / "models" / "v1" / "model.onnx")).run(
        None, {"input": tensor}
    )[0]
    np.testing.assert_allclose(np.asarray(logits["data"]).reshape(1, 4), expected, rtol=1e-6)
    assert answer["parameters"]["seq"] >= 1

    wrong = {"inputs": [{**body["inputs"][0], "datatype": "INT64"}]}
    status, error = _call(serving, "/v2/models/tiny-colour/infer", json.dumps(wrong).encode())
    assert status == 400 and error["field"] == "inputs[0].datatype" and "FP32" in error["error"]
    short = {"inputs": [{**body["inputs"][0], "data": [1.0, 2.0]}]}
    status, error = _call(serving, "/v2/models/tiny-colour/infer", json.dumps(short).encode())
    assert status == 400 and error["field"] == "inputs[0].data"
    # sequences are for stateful models: asking a stateless one to carry state is an error, not ignored
    sequenced = {**body, "parameters": {"sequence_id": "s1", "sequence_start": True}}
    status, error = _call(serving, "/v2/models/tiny-colour/infer", json.dumps(sequenced).encode())
    assert status == 400 and error["field"] == "sequence_id" and "keeps no state" in error["error"]


def test_post_infer_takes_an_image_and_answers_the_prediction_payload(
    serving: Daemon, mosquitto: Mosquitto
) -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = (10, 240, 10)  # green in BGR too
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    with subscribed(mosquitto.port, f"edge/{DEVICE}/predictions", client_id="http-sub") as sub:
        status, payload = _call(serving, "/infer", jpeg.tobytes(), "image/jpeg")
        assert status == 200, payload
        jsonschema.Draft202012Validator(prediction_schema()).validate(payload)
        assert payload["source"]["uri"] == "http:infer" and payload["result"]["top_k"][0]["label"] == "green"
        # the same prediction is stored and published like any other
        assert sub.wait_for(lambda ms: any(m["seq"] == payload["seq"] for m in ms), 10)
    status, error = _call(serving, "/infer", b"not an image", "image/png")
    assert status == 400 and error["field"] == "body"
    status, error = _call(serving, "/infer", b"{}", "application/json")
    assert status == 415 and error["field"] == "content_type"
    status, error = _call(serving, "/infer", b"\0" * (17 << 20), "image/png")
    assert status == 413 and "http.max_bytes" in error["error"]


def test_off_loopback_a_bearer_token_is_required(tmp_path: Path, mosquitto: Mosquitto) -> None:
    with pytest.raises(ValueError, match="addr 0.0.0.0 is not loopback: give token_file"):
        DaemonConfig.model_validate(
            {"device_id": "x", "model": "/m", "http": {"addr": "0.0.0.0"}, "mqtt": {"port": 1}}
        )
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    daemon = _daemon(tmp_path, mosquitto.port, addr="0.0.0.0", token_file=str(token))
    daemon.start()
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert _call(daemon, "/v2/health/ready")[0] == 200  # probes stay open
        status, error = _call(daemon, "/v2/models/tiny-colour")
        assert status == 401 and "bearer token" in error["error"]
        assert _call(daemon, "/v2/models/tiny-colour", Authorization="Bearer wrong")[0] == 401
        assert _call(daemon, "/v2/models/tiny-colour", Authorization=f"Bearer {TOKEN}")[0] == 200
    finally:
        daemon.request_stop()
        runner.join(30)
    assert wait_until(lambda: not runner.is_alive(), 5)
