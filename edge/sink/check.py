"""A fast, conservative check of `edge.prediction/1`, written out from the JSON Schema.

jsonschema's generic validator costs ~200 us per prediction, most of a sink's budget. `plainly_valid`
answers True only for payloads the schema accepts (it is stricter: `1.0` as an integer, a newline before
`$` in a pattern, NaN are left to jsonschema); anything else goes to jsonschema, which has the last word
and writes the reason. tests/test_sink_check.py holds the two to that on generated payloads.
"""

from __future__ import annotations

import math
import re
from typing import Any

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_SHA = re.compile(r"[0-9a-f]{64}")
_TOP = frozenset(
    ("schema", "device_id", "boot_id", "seq", "ts", "source", "model", "runtime", "latency_ms", "result")
)
_SOURCE = frozenset(("uri", "frame", "captured_at"))
_MODEL = frozenset(("name", "version", "sha256"))
_RUNTIME = frozenset(("backend", "provider"))
_RUNTIME_BATCHED = _RUNTIME | {"batch"}  # served in a batch of `batch` (the daemon's `batching`)
_LATENCY = frozenset(("capture_to_publish", "preprocess", "inference", "postprocess"))
_CLASSIFICATION = frozenset(("type", "top_k"))
_DETECTION = frozenset(("type", "detections"))
_DETECTED = frozenset(("label", "index", "score", "box", "track_id"))


def _int(value: Any, minimum: int) -> bool:
    return type(value) is int and value >= minimum


def _number(value: Any) -> bool:
    return (type(value) is int or (type(value) is float and math.isfinite(value))) and value == value


def _text(value: Any) -> bool:
    return type(value) is str and len(value) > 0


def _time(value: Any) -> bool:
    return type(value) is str and _TIME.fullmatch(value) is not None


def _labelled(item: Any) -> bool:
    return (
        type(item) is dict
        and type(item.get("label")) is str
        and _int(item.get("index"), 0)
        and "score" in item
        and _number(item["score"])
    )


def _result(result: Any) -> bool:
    if type(result) is not dict or not _text(result.get("type")):
        return False
    kind = result["type"]
    if kind == "classification":
        top_k = result.get("top_k")
        return result.keys() == _CLASSIFICATION and type(top_k) is list and all(_labelled(i) for i in top_k)
    if kind == "detection":
        detections = result.get("detections")
        if result.keys() != _DETECTION or type(detections) is not list:
            return False
        for item in detections:
            if not _labelled(item) or not item.keys() <= _DETECTED:
                return False
            if "track_id" in item and not _int(item["track_id"], 1):
                return False
            box = item.get("box")
            if type(box) is not list or len(box) != 4:
                return False
            if not all(_number(v) and 0 <= v <= 1 for v in box):
                return False
        return True
    return True  # other result types: the schema asks only for a non-empty `type`


def plainly_valid(data: Any) -> bool:
    """True only if `data` matches edge.prediction/1 (False: ask jsonschema)."""
    if type(data) is not dict or data.keys() != _TOP:
        return False
    source, model, runtime, latency = data["source"], data["model"], data["runtime"], data["latency_ms"]
    return (
        data["schema"] == "edge.prediction/1"
        and type(data["schema"]) is str
        and _text(data["device_id"])
        and type(data["boot_id"]) is str
        and _UUID.fullmatch(data["boot_id"]) is not None
        and _int(data["seq"], 1)
        and _time(data["ts"])
        and type(source) is dict
        and source.keys() == _SOURCE
        and _text(source["uri"])
        and _int(source["frame"], 0)
        and _time(source["captured_at"])
        and type(model) is dict
        and model.keys() == _MODEL
        and _text(model["name"])
        and _text(model["version"])
        and type(model["sha256"]) is str
        and _SHA.fullmatch(model["sha256"]) is not None
        and type(runtime) is dict
        and (runtime.keys() == _RUNTIME or (runtime.keys() == _RUNTIME_BATCHED and _int(runtime["batch"], 2)))
        and _text(runtime["backend"])
        and _text(runtime["provider"])
        and type(latency) is dict
        and latency.keys() >= _LATENCY
        and all(_number(v) and v >= 0 for v in latency.values())
        and _result(data["result"])
    )
