"""Detections users can act on: tracked objects, zones, object events, snapshots and Home Assistant
discovery. numpy only at import; OpenCV is imported when the first snapshot is encoded.

The daemon builds one `ObjectPipeline` per detection source and sends the `Message`s it returns."""

from edge.detect.config import (
    HomeAssistantConfig,
    SnapshotConfig,
    SourceZones,
    TrackingConfig,
    ZoneConfig,
    ZonesConfig,
)
from edge.detect.events import EVENTS_TOPIC, Message, ObjectEvents, ObjectPipeline, SourceInfo
from edge.detect.tracker import Detection, Track, Tracker, TrackerUpdate
from edge.detect.zones import Zone, Zones

__all__ = [
    "EVENTS_TOPIC",
    "Detection",
    "HomeAssistantConfig",
    "Message",
    "ObjectEvents",
    "ObjectPipeline",
    "SnapshotConfig",
    "SourceInfo",
    "SourceZones",
    "Track",
    "Tracker",
    "TrackerUpdate",
    "TrackingConfig",
    "Zone",
    "ZoneConfig",
    "Zones",
    "ZonesConfig",
]
