"""A real text recognizer with a variable width: ddddocr's `common.onnx` (MIT) converted to int8.

The ddddocr 1.6.1 wheel ships `ddddocr/common.onnx`: a CNN + LSTM line recognizer, `input1 [1, 1, 64,
image_width]` (gray, height 64, the width following the line's aspect ratio, x / 255) -> logits `[T, 1,
8210]` over its `CHARSET_BETA` (`ddddocr/charsets.py`, index 0 is the CTC blank), decoded greedily: the
best class per step, repeats merged, blanks dropped (ddddocr's `_ctc_decode_indices`). (`common_old.onnx`
beside it is already dynamically quantized by its authors: not a float model to start from.)

The lines it is calibrated and judged on are real photos (scikit-image) with random words rendered onto
a strip of them; the evaluation lines use other photos and another seed than the calibration lines.

    python examples/ddddocr_ocr.py /tmp/ddddocr-ocr.pkg

fetches the wheel once (`pip download --no-deps ddddocr==1.6.1` into $EDGE_CACHE/ddddocr, nothing is
installed), writes the charset as `charset.json` and the lines as image folders, and runs

    edge-convert common.onnx --out /tmp/ddddocr-ocr.pkg --calib calib --eval eval --labels charset.json \
        --mean 0 --std 255 --max-drop 2 --postprocess '{"type": "text-recognition"}'

The width stays symbolic in the package; `open_model(pkg).infer(line_rgb)` reads a line of any width.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the detector example beside it is `examples.ddddocr_det`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.ddddocr_det import PHOTOS, cache_dir, photo, wheel

HEIGHT = 64
ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
MAX_DROP = 2.0


def fetch_model(cache: Path | None = None) -> tuple[Path, Path]:
    """(`common.onnx`, `charset.json`) out of the ddddocr wheel (downloaded once with pip, never installed).

    The charset is `CHARSET_BETA` from the wheel's `charsets.py`, read as a Python literal (not imported),
    written as a JSON list: index 0 is the CTC blank ''; the list holds ' ' too, which a labels.txt read
    line by line with stripping would lose."""
    cache = cache or cache_dir()
    model, charset = cache / "common.onnx", cache / "charset.json"
    if model.is_file() and charset.is_file():
        return model, charset
    with zipfile.ZipFile(wheel(cache)) as archive:
        tmp = model.with_suffix(".tmp")
        tmp.write_bytes(archive.read("ddddocr/common.onnx"))
        tmp.replace(model)
        source = archive.read("ddddocr/charsets.py").decode("utf-8")
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CHARSET_BETA" for t in statement.targets
        ):
            characters = ast.literal_eval(statement.value)
            break
    else:
        raise RuntimeError("ddddocr/charsets.py: no CHARSET_BETA")
    charset.write_text(json.dumps(characters, ensure_ascii=False), encoding="utf-8")
    return model, charset


def text_lines(count: int, seed: int, photos: tuple[str, ...] = PHOTOS) -> list[tuple[np.ndarray, str]]:
    """`count` (BGR line image, its text): a random word of 4-8 characters drawn with a random Hershey font,
    scale and colour onto a strip of a real photo (sometimes on a plain label); heights 40-96 px, so
    the width after scaling to height 64 varies with the text."""
    import cv2

    rng = np.random.default_rng(seed)
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)
    sources = [photo(name) for name in photos]
    lines = []
    for i in range(count):
        picture = sources[i % len(sources)]
        word = "".join(ALPHABET[int(k)] for k in rng.integers(0, len(ALPHABET), int(rng.integers(4, 9))))
        font = fonts[int(rng.integers(len(fonts)))]
        scale = float(rng.uniform(1.2, 2.4))
        thick = int(rng.integers(2, 5))
        (tw, th), base = cv2.getTextSize(word, font, scale, thick)
        pad_x, pad_y = int(rng.integers(6, 24)), int(rng.integers(6, 16))
        width, height = tw + 2 * pad_x, th + base + 2 * pad_y
        h, w = picture.shape[:2]
        y0, x0 = int(rng.integers(0, h - height)), int(rng.integers(0, w - width))
        line = np.ascontiguousarray(picture[y0 : y0 + height, x0 : x0 + width])
        background = float(line.mean())
        ink = (20, 20, 20) if background > 110 else (235, 235, 235)
        if rng.random() < 0.4:  # a plain label, in the opposite brightness of the ink
            label = tuple(int(255 - c + rng.integers(-20, 21)) for c in ink)
            cv2.rectangle(
                line, (pad_x // 2, pad_y // 2), (width - pad_x // 2, height - pad_y // 2), label, -1
            )
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in ink)
        cv2.putText(line, word, (pad_x, pad_y + th), font, scale, colour, thick, cv2.LINE_AA)
        lines.append((line, word))
    return lines


def write_folder(folder: Path, lines: list[tuple[np.ndarray, str]]) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, _) in enumerate(lines):
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    return folder


def convert_command(model: Path, charset: Path, out: Path, calib: Path, eval_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "converters.cli", str(model), "--out", str(out), "--calib", str(calib),
        "--eval", str(eval_dir), "--labels", str(charset), "--mean", "0", "--std", "255",
        "--max-drop", str(MAX_DROP), "--postprocess", json.dumps({"type": "text-recognition"}),
        "--formats", "onnx", "-q",
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python examples/ddddocr_ocr.py OUT_PKG_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    cache = cache_dir()
    model, charset = fetch_model(cache)
    calib = write_folder(cache / "lines" / "calib", text_lines(64, seed=1, photos=PHOTOS[:4]))
    eval_dir = write_folder(cache / "lines" / "eval", text_lines(96, seed=2, photos=PHOTOS[4:]))
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    )
    command = convert_command(model, charset, out, calib, eval_dir)
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
