"""The prediction payload (docs/contracts.md) against the JSON Schema shipped in the package."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edge.publish.outbox import Outbox
from edge.publish.payload import build_prediction, prediction_schema, rfc3339

VALIDATOR = jsonschema.Draft202012Validator(prediction_schema())


def sample(result: dict[str, Any]) -> dict[str, Any]:
    return build_prediction(
        device_id="cam-01",
        boot_id=str(uuid.uuid4()),
        ts=1795428000.1234,
        source={"uri": "rtsp://cam/stream", "frame": 42, "captured_at": 1795428000.1111},
        model={"name": "mobilenet", "version": "1.0", "sha256": hashlib.sha256(b"model").hexdigest()},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 9.1, "preprocess": 0.8, "inference": 6.2, "postprocess": 0.1},
        result=result,
    )


CLASSIFICATION = {"type": "classification", "top_k": [{"label": "tabby", "index": 281, "score": 0.71}]}
DETECTION = {
    "type": "detection",
    "detections": [{"label": "cat", "index": 15, "score": 0.9, "box": [0.1, 0.2, 0.5, 0.75]}],
}


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(prediction_schema())
    assert prediction_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_rfc3339_has_milliseconds_and_z() -> None:
    assert rfc3339(1795428000.1234) == "2026-11-23T10:00:00.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize("result", [CLASSIFICATION, DETECTION, {"type": "anomaly", "score": 0.3}])
def test_outbox_payload_validates(tmp_path: Path, result: dict[str, Any]) -> None:
    payload = sample(result)
    assert list(payload) == [
        "schema", "device_id", "boot_id", "seq", "ts", "source", "model", "runtime", "latency_ms", "result",
    ]  # fmt: skip
    assert payload["seq"] is None  # assigned once, by the outbox
    assert not VALIDATOR.is_valid(payload)
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.add(payload)
        stored = json.loads(outbox.pending(1)[0][1])
    VALIDATOR.validate(stored)
    assert stored["seq"] == 1 and stored["ts"] == "2026-11-23T10:00:00.123Z"
    assert stored["source"]["captured_at"] == "2026-11-23T10:00:00.111Z"


def broken(path: str, value: Any, base: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    doc["seq"] = 3
    target = doc
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[keys[-1]]
    elif isinstance(target, list):
        target[int(keys[-1])] = value
    else:
        target[keys[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "base"),
    [
        ("schema", "edge.prediction/2", CLASSIFICATION),
        ("seq", 0, CLASSIFICATION),
        ("ts", "2026-11-23T10:00:00Z", CLASSIFICATION),
        ("ts", "2026-11-23T10:00:00.123+01:00", CLASSIFICATION),
        ("boot_id", "not-a-uuid", CLASSIFICATION),
        ("model.sha256", "abc", CLASSIFICATION),
        ("source.frame", -1, CLASSIFICATION),
        ("latency_ms.inference", -1.0, CLASSIFICATION),
        ("latency_ms.inference", KeyError, CLASSIFICATION),
        ("extra", 1, CLASSIFICATION),
        ("result.top_k", KeyError, CLASSIFICATION),
        ("result.top_k.0.index", "281", CLASSIFICATION),
        ("result.detections.0.box", [0.1, 0.2, 1.5, 0.5], DETECTION),
        ("result.detections.0.box", [0.1, 0.2, 0.5], DETECTION),
        ("result.detections.0.label", KeyError, DETECTION),
        ("result.detections.0.colour", "red", DETECTION),
    ],
)
def test_schema_rejects(path: str, value: Any, base: dict[str, Any]) -> None:
    good = sample(base)
    good["seq"] = 3
    VALIDATOR.validate(good)
    assert not VALIDATOR.is_valid(broken(path, value, sample(base)))
