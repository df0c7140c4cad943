"""The daemon's side of tracked objects: one `ObjectPipeline` per source (tracker -> zones -> events ->
snapshots), Home Assistant discovery, and the fps/latency the discovery sensors read from `status`.

The daemon calls `process` once per detection result, before it builds the prediction (so detections
carry their `track_id`), and sends what comes back: `event` messages through the outbox, `count`,
`snapshot` and `discovery` messages published retained.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge.arrays import Array
from edge.detect.config import HomeAssistantConfig, SnapshotConfig, TrackingConfig, ZoneConfig, source_name
from edge.detect.events import Message, ObjectPipeline, SourceInfo
from edge.detect.homeassistant import DeviceInfo, SourceEntities, StatusStats, discovery_messages
from edge.detect.snapshots import Snapshots
from edge.detect.zones import Zones
from edge.jsontypes import JSONObject


@dataclass(frozen=True)
class ObjectSource:
    """What the service needs of one configured source."""

    uri: str  # public (redacted): what frames carry
    name: str | None
    zones: dict[str, ZoneConfig]


class ObjectService:
    """Tracked objects for every source of one daemon; thread-safe per source (workers may race)."""

    def __init__(
        self,
        tracking: TrackingConfig,
        snapshots: SnapshotConfig,
        homeassistant: HomeAssistantConfig,
        *,
        topic_prefix: str,
        device_id: str,
        sources: Sequence[ObjectSource],
        labels: Sequence[str],
    ) -> None:
        self.homeassistant = homeassistant
        self.labels = list(labels)
        self.device_id = device_id
        self.topic_prefix = topic_prefix
        base = f"{topic_prefix}/{device_id}"
        self._pipelines: dict[str, tuple[ObjectPipeline, threading.Lock]] = {}
        self._entities: list[SourceEntities] = []
        for index, source in enumerate(sources):
            name = source_name(index, source.name)
            pipeline = ObjectPipeline(
                tracking,
                SourceInfo(name, source.uri),
                Zones.from_config(source.zones),
                snapshots=Snapshots(snapshots, name) if snapshots.enabled else None,
                topic_base=base,
            )
            self._pipelines[source.uri] = (pipeline, threading.Lock())
            self._entities.append(SourceEntities(name, tuple(source.zones)))
        self.stats = StatusStats()

    def startup_messages(self, model_name: str, model_version: str) -> list[Message]:
        """Retained zero counts per source, zone and label."""
        return [m for pipeline, _ in self._pipelines.values() for m in pipeline.initial_messages(self.labels)]

    def discovery(self, model_name: str, model_version: str) -> list[Message]:
        """The Home Assistant discovery configs of this config (none when it is off)."""
        if not self.homeassistant.enabled:
            return []
        device = DeviceInfo(self.topic_prefix, self.device_id, model_name, model_version)
        return discovery_messages(self.homeassistant, device, self._entities, self.labels)

    def process(self, uri: str, result: JSONObject, ts: float, frame: Array | None) -> list[Message]:
        """One result of the source at `uri` (frames captured at `ts`); adds `track_id`s in place."""
        entry = self._pipelines.get(uri)
        if entry is None:
            return []
        pipeline, lock = entry
        with lock:
            return pipeline.process(result, ts, frame)

    def observe(self, inference_ms: float) -> None:
        self.stats.observe(time.time(), inference_ms)

    def close(self) -> list[Message]:
        """The sources stopped: `end` every object, counts back to 0."""
        now = time.time()
        found: list[Message] = []
        for pipeline, lock in self._pipelines.values():
            with lock:
                found += pipeline.close(now)
        return found
