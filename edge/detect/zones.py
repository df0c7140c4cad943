"""Zones: polygons in normalised frame coordinates. An object is in a zone when the bottom centre of its
box (where it stands on the ground) is inside the polygon or on its edge, as in Frigate; a zone may
admit only some labels and ask for a least box area and score before an object enters it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.detect.config import ZoneConfig


def bottom_centre(box: Sequence[float]) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2.0, float(box[3])


def point_in_polygon(x: float, y: float, polygon: np.ndarray) -> bool:
    """Even-odd ray casting; a point on an edge or a vertex counts as inside."""
    xs, ys = polygon[:, 0], polygon[:, 1]
    xs2, ys2 = np.roll(xs, -1), np.roll(ys, -1)
    # On an edge: collinear with it and within its bounding box.
    cross = (xs2 - xs) * (y - ys) - (ys2 - ys) * (x - xs)
    within = (np.minimum(xs, xs2) - 1e-12 <= x) & (x <= np.maximum(xs, xs2) + 1e-12)
    within &= (np.minimum(ys, ys2) - 1e-12 <= y) & (y <= np.maximum(ys, ys2) + 1e-12)
    if bool(np.any((np.abs(cross) <= 1e-12) & within)):
        return True
    straddles = (ys > y) != (ys2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = xs + (y - ys) * (xs2 - xs) / (ys2 - ys)
    return bool(np.count_nonzero(straddles & (x < x_cross)) % 2 == 1)


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: np.ndarray  # [K, 2] normalised x, y
    objects: frozenset[str] | None = None
    min_area: float = 0.0
    min_score: float | Mapping[str, float] = 0.0

    @classmethod
    def from_config(cls, name: str, config: ZoneConfig) -> Zone:
        objects = frozenset(config.objects) if config.objects is not None else None
        polygon = np.asarray(config.points, dtype=np.float64)
        return cls(name, polygon, objects, config.min_area, config.min_score)

    def admits(self, label: str) -> bool:
        return self.objects is None or label in self.objects

    def passes_filters(self, box: Sequence[float], label: str, score: float) -> bool:
        area = max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))
        least = self.min_score.get(label, 0.0) if isinstance(self.min_score, Mapping) else self.min_score
        return area >= self.min_area and score >= least

    def contains(self, box: Sequence[float]) -> bool:
        return point_in_polygon(*bottom_centre(box), self.polygon)


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
