"""The daemon's side of tracked objects: one `ObjectPipeline` per source (tracker -> zones -> events ->
snapshots), Home Assistant discovery, and the fps/latency the discovery sensors read from `status`.

The daemon calls `process` once per detection result, before it builds the prediction (so detections
carry their `track_id`), and sends what comes back: `event` messages through the outbox, `count`,
`snapshot` and `discovery` messages published retained. With several inference workers a later frame
can finish first; the daemon says which frames it took from its queue (`taken`, in queue order), and
each source's results reach the tracker in that order (`InOrder`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from edge.arrays import Array
from edge.detect.config import HomeAssistantConfig, SnapshotConfig, TrackingConfig, ZoneConfig, source_name
from edge.detect.events import Message, ObjectPipeline, SourceInfo
from edge.detect.homeassistant import DeviceInfo, SourceEntities, StatusStats, discovery_messages
from edge.detect.snapshots import Snapshots
from edge.detect.zones import Zones
from edge.jsontypes import JSONObject

ORDER_WAIT_S = 5.0  # a frame waits this long at most for an earlier one (a hung worker must not stop it)


class InOrder:
    """Lets one source's results through one at a time, in the order their frames were taken from the
    queue: a tracker fed frame 11 before frame 10 would age tracks backwards and split them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: set[int] = set()

    def taken(self, index: int) -> None:
        with self._cond:
            self._waiting.add(index)

    def done(self, index: int) -> None:
        with self._cond:
            self._waiting.discard(index)
            self._cond.notify_all()

    @contextmanager
    def turn(self, index: int, timeout: float = ORDER_WAIT_S) -> Iterator[None]:
        """Held while frame `index` is processed: entered once no earlier taken frame is still waiting."""
        with self._cond:
            self._cond.wait_for(lambda: min(self._waiting, default=index) >= index, timeout)
            try:
                yield
            finally:
                self._waiting.discard(index)
                self._cond.notify_all()


@dataclass(frozen=True)
class ObjectSource:
    """What the service needs of one configured source."""

    uri: str  # public (redacted): what frames carry
    name: str | None
    zones: dict[str, ZoneConfig]


class ObjectService:
    """Tracked objects for every source of one daemon; thread-safe, and in frame order per source
    (workers may race)."""

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
        self._pipelines: dict[str, tuple[ObjectPipeline, InOrder]] = {}
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
            self._pipelines[source.uri] = (pipeline, InOrder())
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

    def taken(self, uri: str, index: int) -> None:
        """Frame `index` of the source at `uri` left the queue for a worker (call in queue order)."""
        entry = self._pipelines.get(uri)
        if entry is not None:
            entry[1].taken(index)

    def skip(self, uri: str, index: int) -> None:
        """A taken frame that will have no result (its inference failed): later ones need not wait."""
        entry = self._pipelines.get(uri)
        if entry is not None:
            entry[1].done(index)

    def process(
        self, uri: str, result: JSONObject, ts: float, frame: Array | None, index: int | None = None
    ) -> list[Message]:
        """One result of the source at `uri` (frame `index`, captured at `ts`); adds `track_id`s in place.
        Waits for the taken frames before `index` to be processed first."""
        entry = self._pipelines.get(uri)
        if entry is None:
            return []
        pipeline, order = entry
        with order.turn(-1 if index is None else index):
            return pipeline.process(result, ts, frame)

    def observe(self, inference_ms: float) -> None:
        self.stats.observe(time.time(), inference_ms)

    def close(self) -> list[Message]:
        """The sources stopped: `end` every object, counts back to 0."""
        now = time.time()
        found: list[Message] = []
        for pipeline, order in self._pipelines.values():
            with order.turn(-1, timeout=0):
                found += pipeline.close(now)
        return found
