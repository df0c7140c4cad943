"""Object events of one source: tracks become `new`, `update` and `end` events on `events/objects`, and
retained counts per zone and label on `{source}/{zone}/{label}` (Frigate's topic shape), plus snapshots.

`ObjectPipeline` is the seam for the daemon: one per source, fed every detection result of that source
with the frame's capture time (and the frame, for snapshots); it returns `Message`s for the daemon to
send - `event` ones through the durable outbox, the retained ones (`count`, `snapshot`) straight to the
broker - and writes `track_id` into the result's detections.

Event payload (JSON):
  {"type": "new|update|end", "id", "track_id", "label", "score", "best_score", "box", "first_seen",
   "last_seen", "zones": [entered, in order], "current_zones": [...], "snapshot": topic or null,
   "source": {"name", "uri"}, "ts"}
- `new`: when a track is confirmed (matched in `min_hits` frames);
- `update`: at once when the object enters or leaves a zone; otherwise when its best score rose, at
  most every `update_interval_s` of frame time;
- `end`: when it has been unseen for `max_age_s` (or the source stopped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edge.detect.config import WHOLE_FRAME, TrackingConfig
from edge.detect.snapshots import Snapshots
from edge.detect.tracker import Detection, Track, Tracker, TrackerUpdate
from edge.detect.zones import Zones
from edge.jsontypes import JSONObject
from edge.publish.payload import rfc3339

EVENTS_TOPIC = "events/objects"
MessageKind = Literal["event", "count", "snapshot", "discovery"]


@dataclass(frozen=True)
class Message:
    """One MQTT message to send. `topic` is under `{prefix}/{device}/` unless `absolute` (discovery)."""

    topic: str
    payload: bytes
    retained: bool
    kind: MessageKind
    absolute: bool = False

    def full_topic(self, base: str) -> str:
        return self.topic if self.absolute else f"{base}/{self.topic}"

    def json(self) -> JSONObject:
        value = json.loads(self.payload)
        assert isinstance(value, dict)
        return value


def _json(body: JSONObject) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def count_topic(source: str, zone: str, label: str) -> str:
    return f"{source}/{zone}/{label}"


@dataclass(frozen=True)
class SourceInfo:
    name: str
    uri: str = ""

    def as_json(self) -> JSONObject:
        return {"name": self.name, "uri": self.uri}


@dataclass
class _Object:
    track: Track
    entered: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    updated_at: float = 0.0  # frame time of its last event
    published_best: float = 0.0  # best score its last event carried
    snapshot: str | None = None  # retained topic of its latest snapshot


class ObjectEvents:
    """Events and counts from a tracker's updates (one source)."""

    def __init__(
        self,
        source: SourceInfo,
        zones: Zones,
        *,
        update_interval_s: float = 5.0,
        snapshots: Snapshots | None = None,
        topic_base: str = "",
    ) -> None:
        self.source = source
        self.zones = zones
        self.update_interval_s = update_interval_s
        self.snapshots = snapshots
        self.topic_base = topic_base  # `{prefix}/{device}`: events name snapshot topics in full
        self._objects: dict[int, _Object] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (zone, label) -> count last published

    def initial_counts(self, labels: Iterable[str]) -> list[Message]:
        """Retained zeros for every zone and label, so subscribers (Home Assistant) start from 0."""
        messages = []
        for zone in (WHOLE_FRAME, *self.zones.names):
            for label in labels:
                if (zone, label) not in self._counts:
                    self._counts[(zone, label)] = 0
                    messages.append(self._count_message(zone, label, 0))
        return messages

    def update(self, tracked: TrackerUpdate, ts: float, frame: np.ndarray | None = None) -> list[Message]:
        messages: list[Message] = []
        if self.snapshots is not None:
            self.snapshots.begin_frame()
        newly = {id(t) for t in tracked.confirmed}
        for track in tracked.active:
            obj = self._objects.get(track.track_id)
            if obj is None:
                obj = self._objects[track.track_id] = _Object(track)
            zones_changed = self._place(obj)
            snapshot = self._snapshot(obj, frame, messages)
            if id(track) in newly:
                messages.append(self._event("new", obj, ts))
            elif zones_changed or (
                (track.best_score > obj.published_best or snapshot)
                and ts - obj.updated_at >= self.update_interval_s
            ):
                messages.append(self._event("update", obj, ts))
        for track in tracked.ended:
            messages.extend(self._end(track, ts))
        messages.extend(self._count_changes())
        return messages

    def end_all(self, tracks: Sequence[Track], ts: float) -> list[Message]:
        messages = [m for track in tracks for m in self._end(track, ts)]
        return messages + self._count_changes()

    def _end(self, track: Track, ts: float) -> list[Message]:
        obj = self._objects.pop(track.track_id, None)
        if obj is None:
            return []
        if self.snapshots is not None:
            self.snapshots.forget(track.track_id)
        return [self._event("end", obj, ts)]

    def _place(self, obj: _Object) -> bool:
        track = obj.track
        current = self.zones.current(track.box.tolist(), track.label, track.score, obj.current)
        changed = current != obj.current
        obj.current = current
        for name in current:
            if name not in obj.entered:
                obj.entered.append(name)
        return changed

    def _snapshot(self, obj: _Object, frame: np.ndarray | None, messages: list[Message]) -> bool:
        track = obj.track
        if self.snapshots is None or frame is None:
            return False
        if obj.snapshot is not None and track.score < track.best_score:
            return False  # it has a snapshot, and this frame is not its best
        shot = self.snapshots.offer(
            track.track_id, track.label, track.score, track.box.tolist(), frame, track.first_seen
        )
        if shot is None:
            return False
        topic = self.snapshots.topic(track.label)
        obj.snapshot = f"{self.topic_base}/{topic}" if self.topic_base else topic
        messages.append(Message(topic, shot.jpeg, True, "snapshot"))
        return True

    def _event(self, kind: str, obj: _Object, ts: float) -> Message:
        track = obj.track
        obj.updated_at = ts
        obj.published_best = track.best_score
        body: JSONObject = {
            "type": kind,
            "id": f"{self.source.name}-{int(track.first_seen * 1000)}-{track.track_id}",
            "track_id": track.track_id,
            "label": track.label,
            "score": round(track.score, 6),
            "best_score": round(track.best_score, 6),
            "box": [round(float(v), 6) for v in track.box],
            "first_seen": rfc3339(track.first_seen),
            "last_seen": rfc3339(track.last_seen),
            "zones": list(obj.entered),
            "current_zones": [] if kind == "end" else list(obj.current),
            "snapshot": obj.snapshot,
            "source": self.source.as_json(),
            "ts": rfc3339(ts),
        }
        return Message(EVENTS_TOPIC, _json(body), False, "event")

    def _count_changes(self) -> list[Message]:
        counts: dict[tuple[str, str], int] = {}
        for obj in self._objects.values():
            label = obj.track.label
            counts[(WHOLE_FRAME, label)] = counts.get((WHOLE_FRAME, label), 0) + 1
            for zone in obj.current:
                counts[(zone, label)] = counts.get((zone, label), 0) + 1
        messages = []
        for key in sorted(set(counts) | {k for k, v in self._counts.items() if v}):
            value = counts.get(key, 0)
            if self._counts.get(key) != value:
                self._counts[key] = value
                messages.append(self._count_message(*key, value))
        return messages

    def _count_message(self, zone: str, label: str, value: int) -> Message:
        return Message(count_topic(self.source.name, zone, label), str(value).encode(), True, "count")


class ObjectPipeline:
    """Tracker -> zones -> events -> snapshots for one source: the daemon's one call per result."""

    def __init__(
        self,
        tracking: TrackingConfig,
        source: SourceInfo,
        zones: Zones | None = None,
        *,
        snapshots: Snapshots | None = None,
        topic_base: str = "",
    ) -> None:
        self.tracker = Tracker(tracking)
        self.events = ObjectEvents(
            source,
            zones or Zones(),
            update_interval_s=tracking.update_interval_s,
            snapshots=snapshots,
            topic_base=topic_base,
        )

    def process(self, result: JSONObject, ts: float, frame: np.ndarray | None = None) -> list[Message]:
        """Track a detection result (`result["detections"]`, edge.tasks.detection) of the frame captured
        at `ts` (seconds; frame time drives max_age_s and update_interval_s). Adds `track_id` to the
        detections of confirmed tracks, in place. Results of other types pass through untouched."""
        rows = result.get("detections")
        if result.get("type") != "detection" or not isinstance(rows, list):
            return []
        detections = [Detection.from_result(row) for row in rows if isinstance(row, dict)]
        tracked = self.tracker.update(detections, ts)
        for row, track_id in zip(rows, tracked.track_ids, strict=False):
            if isinstance(row, dict) and track_id is not None:
                row["track_id"] = track_id
        return self.events.update(tracked, ts, frame)

    def initial_messages(self, labels: Iterable[str]) -> list[Message]:
        return self.events.initial_counts(labels)

    def close(self, ts: float) -> list[Message]:
        """The source stopped: `end` every object and bring the counts back to 0."""
        return self.events.end_all(self.tracker.end_all(), ts)
