"""Text samples for text models: `--calib texts.txt` / `--eval texts.txt`, one sample per line (UTF-8).

Blank lines are skipped. The texts are tokenized with the package's own tokenizer and padding rules
(`edge.processing.text.TextPreprocessor`), so the gate scores what the device will be fed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.processing.text import TextPreprocessor

MIN_EVAL_TEXTS = 8


def read_texts(path: Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file; a one-line error names the file and the option."""
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a directory; text models take a file with one text per line")
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path}: file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}: line {line} is not valid UTF-8") from exc
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"{what} {path}: no text in it (one sample per line)")
    return texts


def split_texts(calib: list[str], evaluation: list[str] | None, where: Path) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) with no text in both: without --eval, the last quarter of --calib."""
    if evaluation is None:
        cut = max(1, len(calib) * 3 // 4)
        calib, evaluation = calib[:cut], calib[cut:]
    shared = set(calib) & set(evaluation)
    evaluation = [t for t in evaluation if t not in shared]
    if len(evaluation) < MIN_EVAL_TEXTS:
        raise ConfigError(
            f"--eval {where}: {len(evaluation)} texts not also in --calib; the gate needs at least "
            f"{MIN_EVAL_TEXTS}"
        )
    return calib, evaluation


def text_feeds(pre: TextPreprocessor, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per text, padded to its bucket: what the runtime builds for each."""
    return [pre.encode(text) for text in texts]


def selection_texts(calib: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, selection): the last third of the calibration texts decides which int8 recipe (and
    SmoothQuant alpha) ships, so the evaluation texts only score the choice and never make it. With too
    few texts to spare a third, the selection is the calibration texts themselves."""
    if len(calib) < 3 * MIN_EVAL_TEXTS:
        return calib, calib
    cut = len(calib) - len(calib) // 3
    return calib[:cut], calib[cut:]
