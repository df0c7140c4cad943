"""Snapshots: the best frame of a tracked object as a JPEG (box drawn, optionally cropped), at most one
per object every `min_interval_s`, scaled to `max_side` and re-encoded at lower quality until it fits
`max_image_bytes`; written to a directory kept under `max_bytes` by removing the oldest files.

OpenCV is imported when the first JPEG is encoded, never at import (edge stays light)."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edge.detect.config import SnapshotConfig
from edge.errors import ConfigError

log = logging.getLogger(__name__)
CROP_MARGIN = 0.25  # of the box's size, on each side
SUFFIX = ".jpg"
ColorOrder = Literal["BGR", "RGB"]


@dataclass(frozen=True)
class Snapshot:
    jpeg: bytes
    path: Path | None  # where it was written (None when writing failed)
    width: int
    height: int
    score: float


def encode_jpeg(
    frame: np.ndarray,
    box: Sequence[float] | None,
    label: str = "",
    *,
    crop: bool = False,
    max_side: int = 640,
    quality: int = 80,
    max_bytes: int = 256 << 10,
    draw_box: bool = True,
    color: ColorOrder = "BGR",
) -> tuple[bytes, int, int]:
    """An HxWx3 uint8 frame (BGR as OpenCV sources and the daemon hold it, or RGB) as JPEG bytes with
    `box` (normalised xyxy) drawn: (bytes, width, height). The caller's frame is never drawn on."""
    import cv2

    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"snapshot: an HxWx3 uint8 frame expected, got {frame.shape} {frame.dtype}")
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if color == "RGB" else frame.copy()
    height, width = image.shape[:2]
    pixels = None
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        pixels = [round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)]
    if crop and pixels is not None:
        bw, bh = pixels[2] - pixels[0], pixels[3] - pixels[1]
        left = max(0, int(pixels[0] - CROP_MARGIN * bw))
        top = max(0, int(pixels[1] - CROP_MARGIN * bh))
        right = min(width, int(pixels[2] + CROP_MARGIN * bw) + 1)
        bottom = min(height, int(pixels[3] + CROP_MARGIN * bh) + 1)
        if right - left >= 2 and bottom - top >= 2:
            image = image[top:bottom, left:right]
            pixels = [pixels[0] - left, pixels[1] - top, pixels[2] - left, pixels[3] - top]
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if pixels is not None:
            pixels = [round(v * scale) for v in pixels]
    if draw_box and pixels is not None:
        image = np.ascontiguousarray(image)
        thickness = max(1, round(max(image.shape[:2]) / 320))
        cv2.rectangle(image, (pixels[0], pixels[1]), (pixels[2], pixels[3]), (0, 0, 255), thickness)
        if label:
            y = max(12, pixels[1] - 4)
            cv2.putText(
                image,
                label,
                (pixels[0], y),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness,
                (0, 0, 255),
                thickness,
            )
    q = quality
    while True:
        ok, encoded = cv2.imencode(SUFFIX, image, [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            raise ValueError("snapshot: OpenCV could not encode the frame as JPEG")
        data = encoded.tobytes()
        if len(data) <= max_bytes or q <= 10:
            return data, image.shape[1], image.shape[0]
        q = max(10, q - 15)


class SnapshotStore:
    """A directory of JPEGs kept under `max_bytes` (oldest removed first). Files written by an earlier run
    count too: the index is built from the directory when the store opens."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"snapshots.dir: {directory}: {exc.strerror or exc}") from None
        self._files: OrderedDict[Path, int] = OrderedDict()  # oldest first
        found = []
        for entry in os.scandir(directory):
            if entry.is_file() and entry.name.endswith(SUFFIX):
                stat = entry.stat()
                found.append((stat.st_mtime, Path(entry.path), stat.st_size))
        for _, path, size in sorted(found):
            self._files[path] = size
        self.removed = 0
        self._trim()

    @property
    def total_bytes(self) -> int:
        return sum(self._files.values())

    def write(self, name: str, data: bytes) -> Path:
        """Write (or replace) `name` atomically, then remove the oldest files beyond `max_bytes`."""
        path = self.directory / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._files.pop(path, None)
        self._files[path] = len(data)
        self._trim(keep=path)
        return path

    def _trim(self, keep: Path | None = None) -> None:
        total = self.total_bytes
        while total > self.max_bytes and self._files:
            oldest, size = next(iter(self._files.items()))
            if oldest == keep:
                break
            self._files.pop(oldest)
            total -= size
            try:
                oldest.unlink()
                self.removed += 1
            except FileNotFoundError:
                pass


@dataclass
class _Best:
    score: float
    published_at: float  # monotonic, of the last snapshot made for the track


class Snapshots:
    """Snapshots of one source's tracked objects."""

    def __init__(
        self,
        config: SnapshotConfig,
        source: str,
        store: SnapshotStore | None = None,
        color: ColorOrder = "BGR",
    ) -> None:
        self.config = config
        self.source = source
        self.color = color  # of the frames `offer` gets
        self.store = store or SnapshotStore(config.dir / source, config.max_bytes)
        self._best: dict[int, _Best] = {}
        self._budget = config.max_per_frame
        self.encoded = 0
        self.failures = 0

    @staticmethod
    def file_name(label: str, track_id: int, first_seen: float) -> str:
        """First-seen time (ms) keeps names of two runs apart: track ids restart at 1."""
        return f"{label}-{int(first_seen * 1000)}-{track_id}{SUFFIX}"

    def topic(self, label: str) -> str:
        """The retained topic (under `{prefix}/{device}/`) holding the latest snapshot of a label."""
        return f"{self.source}/{label}/snapshot"

    def begin_frame(self) -> None:
        """A new frame: `max_per_frame` encodes are allowed again (encoding runs in the inference loop,
        so a crowd of new objects costs at most that many JPEGs per frame; the others get theirs later)."""
        self._budget = self.config.max_per_frame

    def offer(
        self,
        track_id: int,
        label: str,
        score: float,
        box: Sequence[float],
        frame: np.ndarray,
        first_seen: float,
        *,
        now: float | None = None,
    ) -> Snapshot | None:
        """A new snapshot when this frame shows the object at a better score than its last snapshot and
        `min_interval_s` has passed since it (the first frame of an object always qualifies). One file
        per object, replaced by each better one, so the file left is its best frame."""
        now = time.monotonic() if now is None else now
        best = self._best.get(track_id)
        if best is not None and (score <= best.score or now - best.published_at < self.config.min_interval_s):
            return None
        if self._budget <= 0:
            return None
        self._budget -= 1
        cfg = self.config
        try:
            jpeg, width, height = encode_jpeg(
                frame,
                box,
                f"{label} {score:.2f}",
                crop=cfg.crop,
                max_side=cfg.max_side,
                quality=cfg.quality,
                max_bytes=cfg.max_image_bytes,
                draw_box=cfg.draw_box,
                color=self.color,
            )
        except ValueError as exc:
            self.failures += 1
            log.warning("%s", exc)
            return None
        self._best[track_id] = _Best(score, now)
        self.encoded += 1
        path: Path | None
        try:
            path = self.store.write(self.file_name(label, track_id, first_seen), jpeg)
        except OSError as exc:
            self.failures += 1
            log.warning("snapshots.dir: cannot write %s: %s", self.store.directory, exc.strerror or exc)
            path = None
        return Snapshot(jpeg, path, width, height, score)

    def forget(self, track_id: int) -> None:
        """The track ended: its snapshot file stays (until the directory is full), its state goes."""
        self._best.pop(track_id, None)
