"""Home Assistant MQTT discovery: pure functions from the config to retained config messages.

One config message per entity on `{prefix}/{component}/{node_id}/{object_id}/config` (HA's discovery
topic), all tied to one HA device (`identifiers: ["edge_{device_id}"]`). An entity is removed by an
empty retained payload on its config topic: `removal_messages` gives those for a set of entities and
`stale_removals` for the entities an earlier config announced that this one no longer has.

Entities (unique ids are built from names only, so they stay the same across restarts):
- sensor `inference_ms` and `fps`: from the retained `status` topic's `stats` object;
- per source, zone (`all` = whole frame) and label: a count sensor on `{source}/{zone}/{label}` and an
  occupancy binary_sensor on the same topic (ON while the count is above 0);
- per source and label: a camera on `{source}/{label}/snapshot` (JPEG bytes).
Every entity is available while the device's retained `status` JSON says `"state": "online"`.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.detect.config import WHOLE_FRAME, HomeAssistantConfig
from edge.detect.events import Message, count_topic
from edge.jsontypes import JSONObject

STATUS_TEMPLATE = "{{ value_json.state }}"  # the daemon's status JSON: {"state": "online"|"offline", ...}
STATS_KEYS = {"inference_ms": ("Inference latency", "ms"), "fps": ("Frames per second", "fps")}


@dataclass(frozen=True)
class SourceEntities:
    """What one source exposes: its name (topic level) and zone names."""

    name: str
    zones: Sequence[str] = ()


@dataclass(frozen=True)
class DeviceInfo:
    topic_prefix: str  # the daemon's mqtt.topic_prefix
    device_id: str
    model_name: str = ""
    sw_version: str = ""

    @property
    def base(self) -> str:
        return f"{self.topic_prefix}/{self.device_id}"


def _object_id(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts))


def stats_template(key: str) -> str:
    """A value template that gives None (HA: unknown) while the status carries no stats (offline)."""
    return f"{{{{ value_json.stats.{key} if value_json.stats is defined and value_json.stats.{key} is defined else None }}}}"


def _device(device: DeviceInfo) -> JSONObject:
    body: JSONObject = {
        "identifiers": [f"edge_{device.device_id}"],
        "name": device.device_id,
        "manufacturer": "edge-infer",
        "model": device.model_name or "edge-infer",
    }
    if device.sw_version:
        body["sw_version"] = device.sw_version
    return body


def _common(device: DeviceInfo, unique_id: str, name: str) -> JSONObject:
    return {
        "name": name,
        "unique_id": unique_id,
        "device": _device(device),
        "availability": [
            {
                "topic": f"{device.base}/status",
                "value_template": STATUS_TEMPLATE,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "origin": {"name": "edge-infer", "sw_version": device.sw_version or "unknown"},
    }


@dataclass(frozen=True)
class Entity:
    component: str  # sensor, binary_sensor, camera
    unique_id: str
    config: JSONObject

    def topic(self, prefix: str, device_id: str) -> str:
        return f"{prefix}/{self.component}/{_object_id('edge', device_id)}/{self.unique_id}/config"


def entities(
    config: HomeAssistantConfig, device: DeviceInfo, sources: Sequence[SourceEntities], labels: Sequence[str]
) -> list[Entity]:
    """Every entity this device announces."""
    exposed = [label for label in labels if config.labels is None or label in config.labels]
    found: list[Entity] = []
    for key, (title, unit) in STATS_KEYS.items():
        uid = _object_id("edge", device.device_id, key)
        body = _common(device, uid, title)
        body.update(
            {
                "state_topic": f"{device.base}/status",
                "value_template": stats_template(key),
                "unit_of_measurement": unit,
                "state_class": "measurement",
                "entity_category": "diagnostic",
            }
        )
        found.append(Entity("sensor", uid, body))
    for source in sources:
        for label in exposed:
            for zone in (WHOLE_FRAME, *source.zones):
                where = source.name if zone == WHOLE_FRAME else f"{source.name} {zone}"
                topic = f"{device.base}/{count_topic(source.name, zone, label)}"
                uid = _object_id("edge", device.device_id, source.name, zone, label, "count")
                body = _common(device, uid, f"{where} {label} count")
                body.update({"state_topic": topic, "state_class": "measurement", "icon": "mdi:counter"})
                found.append(Entity("sensor", uid, body))
                uid = _object_id("edge", device.device_id, source.name, zone, label, "occupancy")
                body = _common(device, uid, f"{where} {label} occupancy")
                body.update(
                    {
                        "state_topic": topic,
                        "value_template": "{{ 'ON' if value | int(0) > 0 else 'OFF' }}",
                        "payload_on": "ON",
                        "payload_off": "OFF",
                        "device_class": "occupancy",
                    }
                )
                found.append(Entity("binary_sensor", uid, body))
            uid = _object_id("edge", device.device_id, source.name, label, "snapshot")
            body = _common(device, uid, f"{source.name} {label} snapshot")
            body["topic"] = f"{device.base}/{source.name}/{label}/snapshot"
            found.append(Entity("camera", uid, body))
    return found


def discovery_messages(
    config: HomeAssistantConfig, device: DeviceInfo, sources: Sequence[SourceEntities], labels: Sequence[str]
) -> list[Message]:
    """Retained config messages for every entity (publish them on connect; HA also re-reads retained)."""
    return [
        Message(
            e.topic(config.prefix, device.device_id),
            json.dumps(e.config, separators=(",", ":")).encode(),
            True,
            "discovery",
            absolute=True,
        )
        for e in entities(config, device, sources, labels)
    ]


def removal_messages(topics: Iterable[str]) -> list[Message]:
    """Empty retained payloads: HA removes the entities and the broker drops the retained configs."""
    return [Message(topic, b"", True, "discovery", absolute=True) for topic in topics]


def discovery_filter(prefix: str, device_id: str) -> str:
    """The topic filter matching every config this device announces: subscribe to it for a moment at
    start to learn (from the retained messages) what an earlier config announced, for `stale_removals`."""
    return f"{prefix}/+/{_object_id('edge', device_id)}/+/config"


def stale_removals(previous: Iterable[str], current: Sequence[Message]) -> list[Message]:
    """Removals for config topics announced before (`previous`, e.g. kept in a file) and gone now."""
    now = {m.topic for m in current}
    return removal_messages(sorted(set(previous) - now))


def announce(state_file: Path, current: Sequence[Message]) -> list[Message]:
    """What to publish so Home Assistant sees exactly `current`: removals for the configs announced before
    (their topics kept in `state_file`) that are gone now, then `current`. The file is rewritten; with
    nothing current (discovery turned off) it is removed, once its entities are."""
    previous: list[str] = []
    try:
        loaded = json.loads(state_file.read_text(encoding="utf-8"))
        previous = [str(t) for t in loaded.get("topics", [])] if isinstance(loaded, dict) else []
    except (OSError, ValueError):
        previous = []  # first start, or a damaged file: nothing known to remove
    topics = [m.topic for m in current]
    if topics:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        staging = state_file.with_suffix(".tmp")
        staging.write_text(json.dumps({"topics": topics}), encoding="utf-8")
        staging.replace(state_file)
    else:
        state_file.unlink(missing_ok=True)
    return [*stale_removals(previous, current), *current]


class StatusStats:
    """The `stats` object the fps and latency sensors read from the retained `status`:
    `{"fps": predictions per second, "inference_ms": median inference time}` over the last `window_s`.
    The daemon calls `observe` per prediction and puts `stats()` into its status every few seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, ts: float, inference_ms: float) -> None:
        self._samples.append((ts, inference_ms))
        self._trim(ts)

    def stats(self, now: float | None = None) -> JSONObject:
        if now is not None:
            self._trim(now)
        if not self._samples:
            return {"fps": 0.0, "inference_ms": None}
        times = sorted(ms for _, ms in self._samples)
        span = max(self._samples[-1][0] - self._samples[0][0], 1e-9)
        fps = (len(self._samples) - 1) / span if len(self._samples) > 1 else 0.0
        return {"fps": round(fps, 2), "inference_ms": round(times[len(times) // 2], 3)}

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
