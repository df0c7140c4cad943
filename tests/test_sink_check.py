"""The sink's fast schema check never accepts what the shipped JSON Schema refuses, and accepts what
the daemon really publishes (so the fast path is the one taken)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
from hypothesis import given
from hypothesis import strategies as st

from edge.publish.payload import prediction_schema
from edge.sink.check import plainly_valid
from tests.fuzz.strategies import mutated
from tests.fuzz.support import fuzz_settings
from tests.sink_helpers import prediction

VALIDATOR = jsonschema.Draft202012Validator(prediction_schema())
BOOT = "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


def _detection() -> dict[str, Any]:
    doc = prediction("cam-01", BOOT, 5)
    doc["result"] = {
        "type": "detection",
        "detections": [{"label": "cat", "index": 15, "score": 0.8, "box": [0.1, 0.2, 0.5, 0.9]}],
    }
    return doc


def _other() -> dict[str, Any]:
    doc = prediction("cam-01", BOOT, 6)
    doc["result"] = {"type": "regression", "values": [1.5]}
    return doc


DOCUMENTS = [prediction("cam-01", BOOT, 4), _detection(), _other()]


def test_what_the_daemon_publishes_takes_the_fast_path() -> None:
    for doc in DOCUMENTS:
        assert VALIDATOR.is_valid(doc)
        assert plainly_valid(doc)


def test_known_refusals() -> None:
    for change in (
        lambda d: d.update(seq=0),
        lambda d: d.update(seq=True),
        lambda d: d.update(boot_id=BOOT.upper()),
        lambda d: d.update(extra=1),
        lambda d: d["model"].update(sha256="0" * 63),
        lambda d: d["latency_ms"].update(inference=-1),
        lambda d: d["latency_ms"].pop("inference"),
        lambda d: d["result"]["top_k"][0].pop("score"),
        lambda d: d["result"].update(type=""),
        lambda d: d.update(ts="2026-11-23T10:00:00Z"),
    ):
        doc = copy.deepcopy(DOCUMENTS[0])
        change(doc)
        assert not plainly_valid(doc) and not VALIDATOR.is_valid(doc)
    doc = copy.deepcopy(DOCUMENTS[0])
    doc["runtime"]["batch"] = 4  # served in a batch of 4
    assert plainly_valid(doc) and VALIDATOR.is_valid(doc)
    doc["runtime"]["batch"] = 1  # a batch of one is said by leaving it out
    assert not plainly_valid(doc) and not VALIDATOR.is_valid(doc)
    doc = _detection()
    doc["result"]["detections"][0]["track_id"] = 3  # a tracked object's id
    assert plainly_valid(doc) and VALIDATOR.is_valid(doc)
    for wrong in (0, "3", 1.5, True):
        doc["result"]["detections"][0]["track_id"] = wrong
        assert not plainly_valid(doc) and not VALIDATOR.is_valid(doc), wrong
    doc["result"]["detections"][0]["tracked"] = 1  # unevaluatedProperties: false
    assert not plainly_valid(doc) and not VALIDATOR.is_valid(doc)
    doc["result"]["detections"][0] = {"label": "cat", "index": 1, "score": 0.5, "box": [0, 0, 1, 1.5]}
    assert not plainly_valid(doc) and not VALIDATOR.is_valid(doc)


@fuzz_settings(300)
@given(st.sampled_from(range(len(DOCUMENTS))).flatmap(lambda i: mutated(DOCUMENTS[i])))
def test_the_fast_check_accepts_nothing_the_schema_refuses(case: tuple[dict[str, Any], list[str]]) -> None:
    doc, notes = case
    if plainly_valid(doc):
        assert VALIDATOR.is_valid(doc), notes
