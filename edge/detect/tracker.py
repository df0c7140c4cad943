"""A light multi-object tracker: IoU association in two stages, as ByteTrack does, in numpy.

Per frame (boxes normalised xyxy, `ts` the frame's capture time in seconds):
1. detections at or above `high_score` are matched to every live track of the same label by IoU with
   the track's predicted box (its last box moved by its velocity);
2. detections between `low_score` and `high_score` are matched to the confirmed tracks still unmatched
   that were seen in the previous frame - a partly hidden object keeps its id instead of ending (weak
   boxes never start or confirm a track);
3. unmatched high detections start tentative tracks; a tentative track matched in `min_hits` frames is
   confirmed (gets its `track_id` and is reported), one that misses a frame before that is dropped;
4. a confirmed track unseen for more than `max_age_s` of frame time has ended.

Matching is greedy on IoU (highest pair first). With per-label matching and at most a few dozen boxes
it agrees with an optimal (Hungarian) assignment except on contrived overlaps, and costs a fraction of
it; `assign_greedy` is the one place to change that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.detect.config import TrackingConfig


@dataclass(frozen=True)
class Detection:
    """One box of a detection result: normalised xyxy of the frame."""

    box: tuple[float, float, float, float]
    score: float
    label: str
    index: int = -1

    @classmethod
    def from_result(cls, row: Mapping[str, object]) -> Detection:
        """From one `detections` entry of a runtime detection result (edge.tasks.detection)."""
        box, score, label, index = row["box"], row["score"], row["label"], row.get("index", -1)
        if not (isinstance(box, list) and len(box) == 4 and isinstance(score, (int, float))):
            raise ValueError(f"detection {row!r}: box [x1, y1, x2, y2] and score expected")
        x1, y1, x2, y2 = (float(v) for v in box)
        return cls((x1, y1, x2, y2), float(score), str(label), int(index) if isinstance(index, int) else -1)


@dataclass(eq=False)  # compared by identity: one object, one track
class Track:
    """An object followed across frames. `track_id` is 0 until the track is confirmed."""

    label: str
    box: np.ndarray  # last matched box, normalised xyxy
    score: float  # last matched score
    first_seen: float
    last_seen: float
    track_id: int = 0
    hits: int = 1
    best_score: float = 0.0
    best_box: np.ndarray = field(default_factory=lambda: np.zeros(4))
    best_at: float = 0.0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box units per second
    last_frame: int = 0  # index of the frame it was last matched in

    @property
    def confirmed(self) -> bool:
        return self.track_id > 0

    def predicted(self, ts: float) -> np.ndarray:
        return np.asarray(self.box + self.velocity * max(0.0, ts - self.last_seen))


@dataclass(frozen=True)
class TrackerUpdate:
    """What one frame changed. `track_ids[i]` is the confirmed id of input detection i, or None."""

    track_ids: list[int | None]
    active: list[Track]  # confirmed tracks matched in this frame
    confirmed: list[Track]  # tracks that became confirmed in this frame (also in `active`)
    ended: list[Track]  # confirmed tracks that ended (unseen beyond max_age_s)
    live: list[Track]  # every confirmed track not ended (matched now or recently)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` [N, 4] with every box of `b` [M, 4] (xyxy)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12))


def assign_greedy(scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs, best score first, each row and column used once, scores >= threshold."""
    if scores.size == 0:
        return []
    rows, cols = np.nonzero(scores >= threshold)
    if rows.size == 0:
        return []
    order = np.argsort(-scores[rows, cols], kind="stable")
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    pairs = []
    for k in order.tolist():
        r, c = int(rows[k]), int(cols[k])
        if r not in used_rows and c not in used_cols:
            used_rows.add(r)
            used_cols.add(c)
            pairs.append((r, c))
    return pairs


class Tracker:
    """Tracks of one source. Not thread-safe: one caller (the source's inference loop)."""

    def __init__(self, config: TrackingConfig, first_id: int = 1) -> None:
        self.config = config
        self.tracks: list[Track] = []
        self._next_id = first_id
        self._frame = 0

    def update(self, detections: Sequence[Detection], ts: float) -> TrackerUpdate:
        cfg = self.config
        self._frame += 1
        frame = self._frame
        kept = [i for i, d in enumerate(detections) if d.score >= cfg.low_score]
        boxes = np.array([detections[i].box for i in kept], dtype=np.float64).reshape(-1, 4)
        scores = np.array([detections[i].score for i in kept], dtype=np.float64)
        labels = [detections[i].label for i in kept]
        high = [k for k in range(len(kept)) if scores[k] >= cfg.high_score]
        low = [k for k in range(len(kept)) if scores[k] < cfg.high_score]

        matched: dict[int, Track] = {}  # index into `kept` -> track
        # Stage 1: confident detections against every live track.
        free = self._match(high, list(self.tracks), boxes, labels, ts, matched)
        # Stage 2: weak detections only continue tracks seen in the previous frame.
        recent = [t for t in free if t.confirmed and t.last_frame == frame - 1]
        self._match(low, recent, boxes, labels, ts, matched)

        confirmed: list[Track] = []
        for k, track in matched.items():
            self._hit(track, boxes[k], float(scores[k]), ts, frame)
            if not track.confirmed and track.hits >= cfg.min_hits:
                track.track_id = self._next_id
                self._next_id += 1
                confirmed.append(track)
        for k in high:
            if k not in matched:
                track = Track(labels[k], boxes[k].copy(), float(scores[k]), ts, ts, last_frame=frame)
                track.best_score, track.best_box, track.best_at = track.score, track.box.copy(), ts
                self.tracks.append(track)
                matched[k] = track
                if cfg.min_hits <= 1:
                    track.track_id = self._next_id
                    self._next_id += 1
                    confirmed.append(track)

        ended: list[Track] = []
        survivors: list[Track] = []
        for track in self.tracks:
            if track.last_frame == frame:
                survivors.append(track)
            elif not track.confirmed:
                continue  # tentative and missed a frame: noise
            elif ts - track.last_seen > cfg.max_age_s:
                ended.append(track)
            else:
                survivors.append(track)
        self.tracks = survivors
        ids: list[int | None] = [None] * len(detections)
        for k, track in matched.items():
            if track.confirmed:
                ids[kept[k]] = track.track_id
        active = [t for t in matched.values() if t.confirmed]
        live = [t for t in survivors if t.confirmed]
        return TrackerUpdate(ids, active, confirmed, ended, live)

    def end_all(self) -> list[Track]:
        """Every confirmed track, ended now (the source stopped)."""
        ended = [t for t in self.tracks if t.confirmed]
        self.tracks = []
        return ended

    def _match(
        self,
        candidates: list[int],
        tracks: list[Track],
        boxes: np.ndarray,
        labels: list[str],
        ts: float,
        matched: dict[int, Track],
    ) -> list[Track]:
        """Match `candidates` (indexes into boxes) to `tracks` of the same label; returns tracks left."""
        if not candidates or not tracks:
            return tracks
        predicted = np.stack([t.predicted(ts) for t in tracks])
        iou = iou_matrix(boxes[candidates], predicted)
        wanted = [labels[k] for k in candidates]
        iou[
            np.array(wanted, dtype=object)[:, None]
            != np.array([t.label for t in tracks], dtype=object)[None, :]
        ] = 0.0
        used: set[int] = set()
        for row, col in assign_greedy(iou, self.config.iou_threshold):
            matched[candidates[row]] = tracks[col]
            used.add(col)
        return [t for j, t in enumerate(tracks) if j not in used]

    @staticmethod
    def _hit(track: Track, box: np.ndarray, score: float, ts: float, frame: int) -> None:
        dt = ts - track.last_seen
        if dt > 0:
            step = (box - track.box) / dt
            track.velocity = step if track.hits == 1 else 0.5 * track.velocity + 0.5 * step
        track.box = box.copy()
        track.score = score
        track.last_seen = ts
        track.last_frame = frame
        track.hits += 1
        if score > track.best_score:
            track.best_score, track.best_box, track.best_at = score, box.copy(), ts
