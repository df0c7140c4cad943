"""A real detector: ddddocr's text detector (`common_det.onnx`, MIT) converted to int8 behind the gate.

The ddddocr 1.6.1 wheel ships `ddddocr/common_det.onnx`: a YOLOX-style network, `images [1, 3, 416, 416]`
(BGR, 0..255, letterboxed with grey 114) -> `[1, 3549, 6]` raw grid outputs over strides 8, 16 and 32
(tx, ty, log w, log h, objectness, one class), the head `--postprocess` names as format `yolox`. It finds
characters. The frames it is calibrated and judged on are real photos (scikit-image) with words
rendered onto them at random places, sizes and colours; the evaluation frames use other photos' crops
and other words than the calibration frames.

    python examples/ddddocr_det.py /tmp/ddddocr-det.pkg

fetches the wheel once (`pip download --no-deps ddddocr==1.6.1` into $EDGE_CACHE/ddddocr, nothing is
installed), writes the frames as image folders and runs

    edge-convert common_det.onnx --out /tmp/ddddocr-det.pkg --calib calib --eval eval \
        --mean 0,0,0 --std 1,1,1 --color BGR --max-drop 3 \
        --postprocess '{"type": "detection", "format": "yolox", "strides": [8, 16, 32], ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

VERSION = "1.6.1"
SIZE = 416
POSTPROCESS = {
    "type": "detection",
    "format": "yolox",
    "strides": [8, 16, 32],
    "score_threshold": 0.3,
    "iou_threshold": 0.45,
    "labels": ["text"],
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field")
WORDS = (
    "EDGE", "exit", "Gate 3", "PARK", "42", "stop", "OPEN", "north", "Cafe", "B-17", "delivery", "7391",
    "Zone A", "keep out", "bus", "HELLO", "sale", "Lane 2", "tram", "XR-9",
)  # fmt: skip


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    path = root / "ddddocr"
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel(cache: Path) -> Path:
    """The ddddocr wheel in `cache`, downloaded once with pip (never installed)."""
    wheels = sorted(cache.glob(f"ddddocr-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"ddddocr=={VERSION}", "-d", str(cache)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        wheels = sorted(cache.glob(f"ddddocr-{VERSION}-*.whl"))
    return wheels[0]


def fetch_model(cache: Path | None = None) -> Path:
    """`common_det.onnx` out of the ddddocr wheel (downloaded once with pip, never installed)."""
    cache = cache or cache_dir()
    model = cache / "common_det.onnx"
    if model.is_file():
        return model
    with zipfile.ZipFile(wheel(cache)) as archive:
        tmp = model.with_suffix(".tmp")
        tmp.write_bytes(archive.read("ddddocr/common_det.onnx"))
        tmp.replace(model)
    return model


def photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3][..., ::-1])  # RGB -> BGR, as OpenCV and ddddocr hold it


def text_frames(count: int, seed: int, photos: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """`count` BGR frames: a random crop of a real photo, scaled to 416 wide, with 1-4 words drawn on it
    (random font, scale, colour, sometimes on a plain label)."""
    import cv2

    rng = np.random.default_rng(seed)
    fonts = (
        cv2.FONT_HERSHEY_SIMPLEX,
        cv2.FONT_HERSHEY_DUPLEX,
        cv2.FONT_HERSHEY_COMPLEX,
        cv2.FONT_HERSHEY_TRIPLEX,
    )
    sources = [photo(name) for name in photos]
    frames = []
    for i in range(count):
        picture = sources[i % len(sources)]
        h, w = picture.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        height = int(SIZE * rng.uniform(0.6, 1.0))
        frame = cv2.resize(
            picture[y0 : y0 + side, x0 : x0 + side], (SIZE, height), interpolation=cv2.INTER_AREA
        )
        frame = np.ascontiguousarray(frame)
        for _ in range(int(rng.integers(1, 5))):
            word = WORDS[int(rng.integers(len(WORDS)))]
            font = fonts[int(rng.integers(len(fonts)))]
            scale = float(rng.uniform(0.8, 2.0))
            thick = int(rng.integers(2, 4))
            (tw, th), base = cv2.getTextSize(word, font, scale, thick)
            if tw >= SIZE - 8 or th + base >= height - 8:
                continue
            x = int(rng.integers(4, SIZE - tw - 4))
            y = int(rng.integers(th + 4, height - base - 4))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:  # a plain label behind the word, in the opposite brightness
                back = tuple(255 - c for c in colour)
                cv2.rectangle(frame, (x - 4, y - th - 4), (x + tw + 4, y + base + 4), back, -1)
            cv2.putText(frame, word, (x, y), font, scale, colour, thick, cv2.LINE_AA)
        frames.append(frame)
    return frames


def moving_text_clip(count: int, word: str = "GATE 42", step: int = 6, blank: int = 5) -> list[np.ndarray]:
    """A clip of BGR frames: `word` slides `step` px per frame across a real photo (the coffee cup),
    then `blank` frames of the photo alone (the characters leave)."""
    import cv2

    background = cv2.resize(photo("coffee"), (SIZE, 312), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(count + blank):
        frame = background.copy()
        if i < count:
            x = 20 + step * i
            cv2.rectangle(frame, (x - 6, 110), (x + 250, 175), (255, 255, 255), -1)
            cv2.putText(frame, word, (x, 160), cv2.FONT_HERSHEY_DUPLEX, 1.6, (20, 20, 20), 3, cv2.LINE_AA)
        frames.append(frame)
    return frames


def write_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


def convert_command(model: Path, out: Path, calib: Path, eval_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "converters.cli", str(model), "--out", str(out), "--calib", str(calib),
        "--eval", str(eval_dir), "--mean", "0,0,0", "--std", "1,1,1", "--color", "BGR", "--max-drop", "3",
        "--postprocess", json.dumps(POSTPROCESS), "--formats", "onnx", "-q",
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python examples/ddddocr_det.py OUT_PKG_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    cache = cache_dir()
    model = fetch_model(cache)
    calib = write_folder(cache / "frames" / "calib", text_frames(48, seed=1, photos=PHOTOS[:4]))
    eval_dir = write_folder(cache / "frames" / "eval", text_frames(32, seed=2, photos=PHOTOS[4:]))
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(convert_command(model, out, calib, eval_dir), env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
