"""Real media for tests: photos from skimage.data, video clips written with cv2.VideoWriter, cached.

`make_clip` shows each photo for an equal share of the clip. With `stamp=True` the frame number is also
drawn as big black/white blocks in a strip at the bottom, so a test can read back which frame OpenCV
decoded (`read_stamp`) instead of trusting counters.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHOTO_NAMES = ("chelsea", "coffee", "rocket", "astronaut")
CAT_PHOTOS = frozenset({"chelsea", "cat"})  # skimage's `cat` is the same tabby as `chelsea`
FRAME_SIZE = (320, 240)  # width, height: even numbers keep every codec happy
STAMP_BITS = 12
STAMP_BLOCK = 16  # pixels per bit; large enough to survive mp4v compression


def cache_root() -> Path:
    path = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def photo(name: str, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A real photo from skimage.data as a BGR uint8 image of `size` (width, height)."""
    import cv2
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    bgr = cv2.cvtColor(image[..., :3].astype(np.uint8), cv2.COLOR_RGB2BGR)
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def draw_stamp(image: np.ndarray, number: int) -> np.ndarray:
    out = image.copy()
    top = out.shape[0] - STAMP_BLOCK
    for bit in range(STAMP_BITS):
        value = 255 if (number >> bit) & 1 else 0
        out[top:, bit * STAMP_BLOCK : (bit + 1) * STAMP_BLOCK] = value
    return out


def read_stamp(image: np.ndarray) -> int:
    """The frame number drawn by `draw_stamp`, read from block centres of a decoded frame."""
    top = image.shape[0] - STAMP_BLOCK
    number = 0
    margin = STAMP_BLOCK // 4
    for bit in range(STAMP_BITS):
        block = image[
            top + margin : image.shape[0] - margin,
            bit * STAMP_BLOCK + margin : (bit + 1) * STAMP_BLOCK - margin,
        ]
        if float(block.mean()) > 127:
            number |= 1 << bit
    return number


def _fourcc_and_suffix(codec: str) -> tuple[str, str]:
    codec = codec.lower()
    if codec == "mp4v":
        return "mp4v", ".mp4"
    if codec == "mjpg":
        return "MJPG", ".avi"
    raise ValueError(f"unsupported codec {codec!r}: use mp4v or mjpg")


def make_clip(
    path: Path | None,
    photos: Sequence[str],
    fps: float,
    seconds: float,
    codec: str = "mp4v",
    stamp: bool = False,
) -> Path:
    """Write (or reuse from the cache when `path` is None) a clip showing `photos` in equal segments."""
    import cv2

    fourcc, suffix = _fourcc_and_suffix(codec)
    frames = max(1, round(fps * seconds))
    if path is None:
        key = hashlib.sha256(
            repr((list(photos), fps, seconds, fourcc, stamp, FRAME_SIZE)).encode()
        ).hexdigest()
        path = cache_root() / "clips" / f"clip-{key[:16]}{suffix}"
        if path.is_file() and path.stat().st_size > 0:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [photo(name) for name in photos]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*fourcc), fps, FRAME_SIZE)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {codec} to {partial}")
    try:
        for number in range(frames):
            image = images[min(len(images) - 1, number * len(images) // frames)]
            writer.write(draw_stamp(image, number) if stamp else image)
    finally:
        writer.release()
    os.replace(partial, path)  # concurrent tests never see a half-written clip
    return path


@dataclass(frozen=True)
class LabelledClip:
    path: Path
    fps: float
    frame_photos: tuple[str, ...]  # the photo shown in each frame of the file

    @property
    def frame_count(self) -> int:
        return len(self.frame_photos)

    def photo_at(self, index: int) -> str:
        """The photo a frame index shows; indexes past the end wrap, as a looping source's do."""
        return self.frame_photos[index % len(self.frame_photos)]

    def is_cat(self, index: int) -> bool:
        return self.photo_at(index) in CAT_PHOTOS


def labelled_clip(
    fps: float = 10.0,
    seconds_per_photo: float = 1.0,
    photos: Sequence[str] = ("chelsea", "coffee", "rocket", "chelsea", "astronaut"),
    codec: str = "mp4v",
    stamp: bool = False,
) -> LabelledClip:
    """A cached clip whose frames are known to show the cat (chelsea) or other photos."""
    seconds = seconds_per_photo * len(photos)
    path = make_clip(None, photos, fps, seconds, codec, stamp=stamp)
    frames = max(1, round(fps * seconds))
    shown = tuple(photos[min(len(photos) - 1, n * len(photos) // frames)] for n in range(frames))
    return LabelledClip(path=path, fps=fps, frame_photos=shown)
