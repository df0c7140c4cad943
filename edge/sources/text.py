"""Text source: one frame per line of a file or of stdin ("-"), every line served (lossless).

A frame's `index` is the line's number (from 0, counting skipped lines too, and on across loops). Its `data` is a 0-d numpy object array holding the line as a `str` (without its line ending), so
the frame type stays one array for every source and `ModelSession.infer` tokenizes it. Lines are read at
the reader's pace: the next line waits until the last was taken, nothing is dropped. Blank lines are
skipped unless `skip_blank: false`; a line that is not valid UTF-8 is decoded with replacement
characters, counted in `stats["read_errors"]` and described in `last_error`.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.errors import ConfigError, Finding
from edge.sources.base import Frame, ReaderThreadSource, SourcePlugin

log = logging.getLogger(__name__)

POLL_S = 0.1
CHUNK_BYTES = 65536


class TextSourceConfig(BaseModel):
    """Lines of UTF-8 text from a file or stdin ("-"): one prediction per line."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = "text"
    uri: str = Field(description='a text file, or "-" for stdin')
    skip_blank: bool = Field(default=True, description="lines that are empty or only whitespace are skipped")
    loop: bool = Field(default=False, description="files: start again at the end")
    max_line_bytes: int = Field(
        default=1 << 20, ge=1, description="a longer line is cut to this many bytes (counted as a read error)"
    )

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value


def text_frame_data(line: str) -> np.ndarray:
    """The frame payload for one line: a 0-d object array holding exactly that `str`."""
    data = np.empty((), dtype=object)
    data[()] = line
    return data


class TextSource(ReaderThreadSource):
    """Lines of a file or stdin; `read()` returns them in order, none dropped."""

    def __init__(self, config: TextSourceConfig) -> None:
        super().__init__()
        self.config = config
        self.uri = config.uri
        self.kind: Literal["stdin", "file"] = "stdin" if config.uri == "-" else "file"
        self._line = -1  # lines read so far, minus one (across loops)
        if self.kind == "file" and not Path(self.uri).is_file():
            raise ConfigError(f"text source {self.uri}: file not found")

    @property
    def lossless(self) -> bool:
        return True

    def describe(self) -> str:
        return f"text source {self.uri}"

    @property
    def thread_name(self) -> str:
        return f"text-{self.kind}"

    # -- internals --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                emitted = self._serve_once()
                if self._stop.is_set():
                    return
                if self.kind == "stdin" or not self.config.loop or emitted == 0:
                    break
        except Exception as exc:  # the thread must end visibly, not silently
            self.last_error = f"{self.describe()}: {exc}"
            log.error("%s", self.last_error)
            self._count("read_errors")
        self._finished = True
        self._slot.close()

    def _serve_once(self) -> int:
        emitted = 0
        for raw in self._lines():
            if self._stop.is_set():
                return emitted
            self._line += 1
            line = self._decode(raw)
            if self.config.skip_blank and not line.strip():
                continue
            # The reader's pace: wait until the last line was taken, so none is replaced unread.
            while not self._slot.wait_empty(POLL_S):
                if self._stop.is_set():
                    return emitted
            with self._lock:
                self._index = self._line
                self._counts["frames_in"] += 1
            # The frame number is the line number (from 0), blank lines skipped or not.
            self._slot.put(Frame(text_frame_data(line), self._line, time.time(), time.monotonic(), self.uri))
            emitted += 1
        return emitted

    def _decode(self, raw: bytes) -> str:
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        limit = self.config.max_line_bytes
        if len(raw) > limit:
            self._error(f"a line of {len(raw)} bytes was cut to max_line_bytes {limit}")
            raw = raw[:limit]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(f"line {self._line + 1} is not valid UTF-8 ({exc.reason}); decoded with U+FFFD")
            return raw.decode("utf-8", errors="replace")

    def _error(self, message: str) -> None:
        self.last_error = f"{self.describe()}: {message}"
        log.warning("%s", self.last_error)
        self._count("read_errors")

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def _lines(self) -> Iterator[bytes]:
        if self.kind == "file":
            try:
                handle = open(self.uri, "rb")  # noqa: SIM115  (closed below)
            except OSError as exc:
                raise ConfigError(f"text source {self.uri}: cannot open: {exc.strerror or exc}") from exc
            with handle:
                yield from handle
            return
        yield from _split_lines(_stdin_chunks(self._stop.is_set))


def _stdin_chunks(stopped: Callable[[], bool]) -> Iterator[bytes]:
    """Chunks of stdin as they come (polled, so a stop is seen) until end of input."""
    fd = 0
    while not stopped():
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if not ready:
            continue
        chunk = os.read(fd, CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Whole lines (with their b"\\n") from chunks cut anywhere; a last line without one is a line too."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def check(config: TextSourceConfig) -> list[Finding]:
    """A file must exist and be readable; stdin cannot be checked before it starts."""
    if config.uri == "-":
        return []
    path = Path(config.uri)
    if not path.is_file():
        return [Finding("uri", f"text source {config.uri}: file not found")]
    if not os.access(path, os.R_OK):
        return [Finding("uri", f"text source {config.uri}: this user may not read it")]
    return []


PLUGIN = SourcePlugin(key="text", config=TextSourceConfig, source=TextSource, check=check)
