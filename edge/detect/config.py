"""Config models for tracked objects, zones, snapshots and Home Assistant discovery (docs/contracts.md).

The daemon's config takes `tracking`, `snapshots` and `homeassistant` at the top level and `name` and
`zones` on each source. Unknown keys are errors, like everywhere in the config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# A name that is one MQTT topic level, an HA object id part and a file name: no '/', '+', '#', spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WHOLE_FRAME = "all"  # the zone every object is in: `{source}/all/{label}` counts the whole frame


def check_name(value: str, what: str) -> str:
    """A source, zone or label name used as a topic level: letters, digits, '_', '.', '-' (1-64)."""
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"{what} {value!r}: use 1-64 letters, digits, '_', '.' or '-' (it is an MQTT topic level)"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(_Strict):
    """Boxes across frames become objects with stable `track_id`s (IoU association, ByteTrack-style)."""

    enabled: bool = False
    min_hits: int = Field(default=2, ge=1, description="frames an object is matched in before it is new")
    max_age_s: float = Field(default=2.0, gt=0, description="unseen this long (frame time): the object ended")
    iou_threshold: float = Field(default=0.2, gt=0, le=1, description="least IoU of a box with a track")
    high_score: float = Field(
        default=0.5, ge=0, le=1, description="detections at or above it start tracks; below only continue"
    )
    low_score: float = Field(default=0.1, ge=0, le=1, description="detections below it are ignored")
    update_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="least time between `update` events of one object (zone changes: at once)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> TrackingConfig:
        if self.low_score > self.high_score:
            raise ValueError(f"low_score {self.low_score} is above high_score {self.high_score}")
        return self


Point = Annotated[list[float], Field(min_length=2, max_length=2)]


def _points_alone(value: object) -> object:
    """`gate: [[x, y], ...]` is short for `gate: {points: [[x, y], ...]}`."""
    return {"points": value} if isinstance(value, list) else value


class ZoneConfig(_Strict):
    """A polygon in normalised frame coordinates (0..1, x right, y down); an object is in the zone when
    the bottom centre of its box is (where it stands), as in Frigate."""

    points: list[Point] = Field(min_length=3)
    objects: list[str] | None = Field(default=None, description="labels counted in this zone (default: all)")
    min_area: float = Field(default=0.0, ge=0, le=1, description="least box area, as a share of the frame")
    min_score: float | dict[str, float] = Field(
        default=0.0, description="least score to enter, one for all labels or per label"
    )

    @field_validator("points")
    @classmethod
    def _normalised(cls, points: list[list[float]]) -> list[list[float]]:
        for i, (x, y) in enumerate(points):
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise ValueError(f"point {i} [{x}, {y}] is outside 0..1 (coordinates are normalised)")
        return points

    @field_validator("min_score")
    @classmethod
    def _scores(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        scores = value.values() if isinstance(value, dict) else [value]
        if any(not 0.0 <= s <= 1.0 for s in scores):
            raise ValueError("scores are in 0..1")
        return value


def check_zone_names(zones: dict[str, ZoneConfig]) -> dict[str, ZoneConfig]:
    """Zone names are topic levels, and `all` is the whole frame."""
    for name in zones:
        check_name(name, "zone")
        if name == WHOLE_FRAME:
            raise ValueError(f"zone '{WHOLE_FRAME}' is the whole frame already; pick another name")
    return zones


ZonesConfig = Annotated[
    dict[str, Annotated[ZoneConfig, BeforeValidator(_points_alone)]],
    Field(description="zone name -> polygon [[x, y], ...] or {points, objects, min_area, min_score}"),
]
"""The per-source `zones:` mapping; `SourceZones` checks its names."""


def source_name(index: int, name: str | None) -> str:
    """A source's topic level: its `name`, else `source{index}` (its place in `sources`)."""
    return name if name is not None else f"source{index}"


class SourceZones(_Strict):
    """What a source adds for tracked objects: `name` (a topic level) and `zones`. The daemon's source
    config takes the same two fields with the same checks (`check_name`, `check_zone_names`)."""

    name: str | None = Field(
        default=None, description="the source's topic level (default: source0, source1, ...)"
    )
    zones: ZonesConfig = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "name")

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: dict[str, ZoneConfig]) -> dict[str, ZoneConfig]:
        return check_zone_names(value)


class SnapshotConfig(_Strict):
    """The best frame of each tracked object as a JPEG, kept in a bounded directory and published
    retained on `{source}/{label}/snapshot`."""

    enabled: bool = False
    dir: Path = Path("/var/lib/edge-infer/snapshots")
    max_bytes: int = Field(default=64 << 20, ge=1 << 16, description="oldest files removed beyond it")
    crop: bool = Field(default=False, description="the box and a margin around it instead of the whole frame")
    max_side: int = Field(default=640, ge=32, le=8192, description="longest side in pixels (scaled down)")
    quality: int = Field(default=80, ge=10, le=100, description="JPEG quality")
    max_image_bytes: int = Field(
        default=256 << 10, ge=4096, description="quality is lowered until a JPEG fits (MQTT brokers cap size)"
    )
    min_interval_s: float = Field(
        default=1.0, ge=0, description="least time between two snapshots of one object"
    )
    draw_box: bool = True
    max_per_frame: int = Field(
        default=2, ge=1, description="JPEGs encoded per frame at most (the rest wait for a later frame)"
    )


class HomeAssistantConfig(_Strict):
    """MQTT discovery: retained config messages under `{prefix}/...` (removed with empty payloads)."""

    enabled: bool = False
    prefix: str = Field(default="homeassistant", description="Home Assistant's discovery prefix")
    labels: list[str] | None = Field(
        default=None, description="labels that get entities (default: every label of the model)"
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"{value!r}: a topic without wildcards or leading/trailing '/'")
        return value
