"""The prediction payload `edge.prediction/1` (docs/contracts.md; JSON Schema in edge/schemas/prediction.schema.json)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_ID = "edge.prediction/1"
CONTENT_TYPE = "application/json"


def rfc3339(ts: float | datetime | str) -> str:
    """RFC 3339 UTC with milliseconds and `Z`, e.g. 2026-11-23T10:00:00.123Z (strings pass through)."""
    if isinstance(ts, str):
        return ts
    moment = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, tz=timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_prediction(
    *,
    device_id: str,
    boot_id: str,
    ts: float | datetime | str,
    source: dict[str, Any],
    model: dict[str, Any],
    runtime: dict[str, Any],
    latency_ms: dict[str, float],
    result: dict[str, Any],
    seq: int | None = None,
) -> dict[str, Any]:
    """One prediction message. `seq` stays None until `Outbox.add` assigns it at persist time.

    `source` is `{uri, frame, captured_at}` with `captured_at` as epoch seconds or RFC 3339 text.
    """
    return {
        "schema": SCHEMA_ID,
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": seq,
        "ts": rfc3339(ts),
        "source": {
            "uri": str(source["uri"]),
            "frame": int(source["frame"]),
            "captured_at": rfc3339(source["captured_at"]),
        },
        "model": {"name": model["name"], "version": str(model["version"]), "sha256": model["sha256"]},
        "runtime": {
            "backend": runtime["backend"],
            "provider": runtime["provider"],
            **({"batch": int(runtime["batch"])} if "batch" in runtime else {}),
        },
        "latency_ms": {key: round(float(value), 3) for key, value in latency_ms.items()},
        "result": result,
    }


@lru_cache(maxsize=1)
def prediction_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped in the package."""
    text = resources.files("edge").joinpath("schemas/prediction.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
