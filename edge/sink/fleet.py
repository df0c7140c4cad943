"""What the fleet page shows, read from the database (so it covers every sink of a group, not one).

`snapshot(storage)` returns plain JSON: the devices (state from the retained status, model, last seen,
counts), predictions/s and capture -> commit latency p50/p99 per 10 s over the last `window_s`, the last
predictions with a one-line summary of each result, the gaps and the dead-letter count.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from edge.client import parse_time
from edge.sink.storage import Storage

BUCKET_S = 10
WINDOW_S = 300
RECENT = 20
SAMPLE = 50_000  # latency percentiles come from the newest rows of the window, this many


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    try:
        return parse_time(str(value))
    except ValueError:
        return None


def _iso(value: Any) -> str | None:
    seconds = _epoch(value)
    if seconds is None:
        return None
    from edge.publish.payload import rfc3339

    return rfc3339(seconds)


def summarize(result: Any) -> str:
    """One line a person reads: the top label and score, the detections by label, speech or not, the
    recognised text, an embedding's size; other results by their type."""
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except ValueError:
            return "?"
    if not isinstance(result, dict):
        return "?"
    kind = result.get("type")
    if kind in ("classification", "text-classification") and result.get("top_k"):
        top = result["top_k"][0]
        return f"{top.get('label')} {float(top.get('score', 0)):.2f}"
    if kind == "detection":
        labels: dict[str, int] = {}
        for item in result.get("detections") or []:
            labels[str(item.get("label"))] = labels.get(str(item.get("label")), 0) + 1
        return ", ".join(f"{n} {label}" for label, n in sorted(labels.items())) or "no detections"
    if kind == "voice-activity" and "probability" in result:
        return f"{'speech' if result.get('speech') else 'no speech'} {float(result['probability']):.2f}"
    if kind == "text-recognition" and "text" in result:
        return repr(str(result["text"]))
    if kind == "embedding" and "dims" in result:
        return f"{result['dims']}-d vector"
    return str(kind)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def snapshot(storage: Storage, window_s: int = WINDOW_S) -> dict[str, Any]:
    pg = storage.kind == "postgresql"
    t = f'"{getattr(storage, "schema", "")}".' if pg else ""
    devices = [
        {
            "device_id": d,
            "state": state or "unknown",
            "model_name": name,
            "model_version": version,
            "since": _iso(since),
            "last_seen": _iso(seen),
            "last_seq": last_seq,
            "predictions": int(count or 0),
            "duplicates": int(dups or 0),
        }
        for d, state, name, version, since, seen, last_seq, count, dups in storage.query(
            f"SELECT device_id, state, model_name, model_version, status_since, last_seen, last_seq, "
            f"predictions, duplicates FROM {t}devices ORDER BY device_id"
        )
    ]
    now = time.time()
    since = now - window_s
    series: list[dict[str, Any]] = []
    counts: dict[float, int]
    if pg:
        counts = dict(
            storage.query(
                f"""SELECT floor(extract(epoch FROM received_at) / %s) * %s AS bucket, count(*)
                    FROM {t}predictions WHERE received_at > to_timestamp(%s) GROUP BY bucket""",
                (BUCKET_S, BUCKET_S, since),
            )
        )
        # percentiles over the newest rows only: a busy fleet's 5 minutes are millions of rows
        latency = {
            bucket: (p50, p99)
            for bucket, p50, p99 in storage.query(
                f"""SELECT floor(extract(epoch FROM received_at) / %s) * %s AS bucket,
                           percentile_cont(0.5) WITHIN GROUP (ORDER BY lat),
                           percentile_cont(0.99) WITHIN GROUP (ORDER BY lat)
                    FROM (SELECT received_at, extract(epoch FROM received_at - captured_at) AS lat
                          FROM {t}predictions WHERE received_at > to_timestamp(%s)
                          ORDER BY received_at DESC LIMIT %s) AS newest
                    GROUP BY bucket""",
                (BUCKET_S, BUCKET_S, since, SAMPLE),
            )
        }
        for bucket in sorted(counts):
            p50, p99 = latency.get(bucket, (None, None))
            series.append(
                {
                    "t": float(bucket),
                    "rate": int(counts[bucket]) / BUCKET_S,
                    "p50_ms": None if p50 is None else round(float(p50) * 1000, 1),
                    "p99_ms": None if p99 is None else round(float(p99) * 1000, 1),
                }
            )
    else:
        from edge.publish.payload import rfc3339

        rows = storage.query(
            "SELECT received_at, captured_at FROM predictions WHERE received_at > ? "
            "ORDER BY received_at DESC LIMIT ?",
            (rfc3339(since), SAMPLE),
        )
        counts = {
            float(bucket): int(count)
            for bucket, count in storage.query(
                "SELECT CAST(strftime('%s', received_at) AS INTEGER) / ? * ? AS bucket, count(*) "
                "FROM predictions WHERE received_at > ? GROUP BY bucket",
                (BUCKET_S, BUCKET_S, rfc3339(since)),
            )
        }
        buckets: dict[float, list[float]] = {}
        for received, captured in rows:  # SQLite has no percentile function: the newest rows, in Python
            r = _epoch(received)
            if r is None:
                continue
            bucket = (r // BUCKET_S) * BUCKET_S
            c = _epoch(captured)
            if c is not None:
                buckets.setdefault(bucket, []).append(r - c)
        for bucket in sorted(counts):
            latencies = buckets.get(bucket, [])
            series.append(
                {
                    "t": bucket,
                    "rate": counts[bucket] / BUCKET_S,
                    "p50_ms": round(_percentile(latencies, 0.5) * 1000, 1) if latencies else None,
                    "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1) if latencies else None,
                }
            )
    recent = [
        {
            "device_id": d,
            "seq": int(seq),
            "ts": _iso(ts),
            "model": f"{name} {version}",
            "summary": summarize(result),
        }
        for d, seq, ts, name, version, result in storage.query(
            f"SELECT device_id, seq, ts, model_name, model_version, result FROM {t}predictions "
            f"ORDER BY received_at DESC LIMIT {RECENT}"
        )
    ]
    gaps = [
        {"device_id": d, "boot_id": str(b), "from_seq": int(f), "to_seq": int(to)}
        for d, b, f, to in storage.query(
            f"SELECT device_id, boot_id, from_seq, to_seq FROM {t}gaps ORDER BY 1, 2, 3"
        )
    ]
    snapshots = [
        {"device_id": d, "source": source, "label": label, "received_at": _iso(received)}
        for d, source, label, received in storage.query(
            f"SELECT device_id, source, label, received_at FROM {t}snapshots ORDER BY 1, 2, 3"
        )
    ]
    (dead,) = storage.query(f"SELECT count(*) FROM {t}dead_letters")[0]
    return {
        "generated_at": _iso(now),
        "window_s": window_s,
        "bucket_s": BUCKET_S,
        "devices": devices,
        "series": series,
        "recent": recent,
        "gaps": gaps,
        "snapshots": snapshots,
        "dead_letters": int(dead),
    }


def snapshot_jpeg(storage: Storage, device_id: str, source: str, label: str) -> bytes | None:
    """The stored JPEG of one snapshot, or None."""
    pg = storage.kind == "postgresql"
    t = f'"{getattr(storage, "schema", "")}".' if pg else ""
    p = "%s" if pg else "?"
    found = storage.query(
        f"SELECT jpeg FROM {t}snapshots WHERE device_id = {p} AND source = {p} AND label = {p}",
        (device_id, source, label),
    )
    return bytes(found[0][0]) if found else None
