"""Zones: polygons in normalised frame coordinates. An object is in a zone when the bottom centre of its
box (where it stands on the ground) is inside the polygon or on its edge, as in Frigate; a zone may
admit only some labels and ask for a least box area and score before an object enters it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from edge.detect.config import ZoneConfig


def bottom_centre(box: Sequence[float]) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2.0, float(box[3])


Polygon = tuple[tuple[float, float], ...]
EPS = 1e-12


def point_in_polygon(x: float, y: float, polygon: Polygon | np.ndarray) -> bool:
    """Even-odd ray casting; a point on an edge or a vertex counts as inside. Plain Python: for the few
    vertices of a zone it is ~20x faster than numpy's per-call overhead."""
    points = [(float(p[0]), float(p[1])) for p in polygon] if isinstance(polygon, np.ndarray) else polygon
    inside = False
    x1, y1 = points[-1]
    for x2, y2 in points:
        cross = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        if (
            -EPS <= cross <= EPS
            and (x1 - EPS <= x <= x2 + EPS or x2 - EPS <= x <= x1 + EPS)
            and (y1 - EPS <= y <= y2 + EPS or y2 - EPS <= y <= y1 + EPS)
        ):
            return True  # on this edge
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
        x1, y1 = x2, y2
    return inside


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: Polygon  # normalised (x, y) vertices
    objects: frozenset[str] | None = None
    min_area: float = 0.0
    min_score: float | Mapping[str, float] = 0.0

    @classmethod
    def from_config(cls, name: str, config: ZoneConfig) -> Zone:
        objects = frozenset(config.objects) if config.objects is not None else None
        polygon = tuple((float(x), float(y)) for x, y in config.points)
        return cls(name, polygon, objects, config.min_area, config.min_score)

    def admits(self, label: str) -> bool:
        return self.objects is None or label in self.objects

    def passes_filters(self, box: Sequence[float], label: str, score: float) -> bool:
        area = max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))
        least = self.min_score.get(label, 0.0) if isinstance(self.min_score, Mapping) else self.min_score
        return area >= self.min_area and score >= least

    def contains(self, box: Sequence[float]) -> bool:
        x, y = bottom_centre(box)
        left, top, right, bottom = self.bounds
        return left <= x <= right and top <= y <= bottom and point_in_polygon(x, y, self.polygon)

    @cached_property
    def bounds(self) -> tuple[float, float, float, float]:
        xs, ys = [p[0] for p in self.polygon], [p[1] for p in self.polygon]
        return min(xs) - EPS, min(ys) - EPS, max(xs) + EPS, max(ys) + EPS


class Zones:
    """The zones of one source."""

    def __init__(self, zones: Sequence[Zone] = ()) -> None:
        self.zones = tuple(zones)

    @classmethod
    def from_config(cls, config: Mapping[str, ZoneConfig]) -> Zones:
        return cls([Zone.from_config(name, zone) for name, zone in config.items()])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(z.name for z in self.zones)

    def current(
        self, box: Sequence[float], label: str, score: float, inside: Sequence[str] = ()
    ) -> list[str]:
        """The zones an object with this box is in now. Filters apply when it enters: an object already
        `inside` a zone stays in it while its bottom centre does, as in Frigate."""
        return [
            z.name
            for z in self.zones
            if z.admits(label)
            and z.contains(box)
            and (z.name in inside or z.passes_filters(box, label, score))
        ]
