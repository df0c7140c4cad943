"""The text source against real files and a real stdin pipe: every line arrives, in order, unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.errors import ConfigError
from edge.sources import Frame, open_source
from edge.sources.registry import plugins
from edge.sources.text import TextSourceConfig, check

REPO = Path(__file__).resolve().parents[1]
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces are kept  ",
    "Ünïcödé, emoji 🦊 and a tab\there",
    "a line ending in a NUL \x00",
    "last line without a newline",
]


def collect(source: object, timeout: float = 10.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = source.read(0.2)  # type: ignore[attr-defined]
        if frame is not None:
            frames.append(frame)
            time.sleep(0.002)  # a slow reader: a lossless source must wait for it, not drop
        elif source.finished:  # type: ignore[attr-defined]
            break
    return frames


def test_every_line_of_a_file_arrives_in_order_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    # CRLF, a blank line and a whitespace-only line among them; the last line has no newline
    path.write_bytes(("\r\n".join(LINES[:2]) + "\n\n   \n" + "\n".join(LINES[2:])).encode("utf-8"))
    source = open_source({"type": "text", "uri": str(path)})
    assert source.lossless
    source.start()
    try:
        frames = collect(source)
    finally:
        source.stop()
    assert [f.data.item() for f in frames] == LINES
    assert all(f.data.shape == () and f.data.dtype == object for f in frames)
    assert [f.index for f in frames] == [0, 1, 4, 5, 6]  # line numbers: the blank ones were skipped
    assert source.stats["frames_in"] == len(LINES) and source.stats["frames_dropped"] == 0


def test_blank_lines_are_served_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    source = open_source({"type": "text", "uri": str(path), "skip_blank": False})
    source.start()
    try:
        assert [f.data.item() for f in collect(source)] == ["one", "", "two"]
    finally:
        source.stop()


def test_many_lines_from_a_stdin_pipe_none_lost() -> None:
    lines = [f"sentence {i}: " + "word " * (i % 7) for i in range(3000)]
    script = (
        "import json, sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from edge.sources import open_source\n"
        "source = open_source({'type': 'text', 'uri': '-'})\n"
        "source.start()\n"
        "got = []\n"
        "while True:\n"
        "    frame = source.read(0.2)\n"
        "    if frame is not None:\n"
        "        got.append(frame.data.item())\n"
        "    elif source.finished:\n"
        "        break\n"
        "source.stop()\n"
        "print(json.dumps({'lines': got, 'stats': source.stats}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO)],
        input="\n".join(lines).encode("utf-8"),
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["lines"] == lines
    assert result["stats"]["frames_dropped"] == 0


def test_invalid_utf8_is_replaced_counted_and_named(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"good\nbad \xff byte\n")
    source = open_source({"type": "text", "uri": str(path)})
    source.start()
    try:
        frames = collect(source)
    finally:
        source.stop()
    assert [f.data.item() for f in frames] == ["good", "bad \ufffd byte"]
    assert source.stats["read_errors"] == 1
    assert source.last_error is not None and "line 2" in source.last_error and str(path) in source.last_error


def test_loop_starts_again_with_rising_frame_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    source = open_source({"type": "text", "uri": str(path), "loop": True})
    source.start()
    frames: list[Frame] = []
    try:
        deadline = time.monotonic() + 10
        while len(frames) < 6 and time.monotonic() < deadline:
            frame = source.read(0.2)
            if frame is not None:
                frames.append(frame)
    finally:
        source.stop()
    assert [f.data.item() for f in frames] == ["a", "b"] * 3
    assert [f.index for f in frames] == list(range(6))


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="uri"):
        TextSourceConfig.model_validate({"type": "text", "uri": "  "})
    with pytest.raises(ValidationError, match="extra"):
        TextSourceConfig.model_validate({"type": "text", "uri": "-", "colour": "red"})
    with pytest.raises(ConfigError, match="missing.txt: file not found"):
        open_source({"type": "text", "uri": str(tmp_path / "missing.txt")})
    findings = check(TextSourceConfig(uri=str(tmp_path / "missing.txt")))
    assert [f.where for f in findings] == ["uri"] and "file not found" in findings[0].message
    assert check(TextSourceConfig(uri="-")) == []


def test_the_text_source_is_a_plugin() -> None:
    assert plugins()["text"].config is TextSourceConfig
