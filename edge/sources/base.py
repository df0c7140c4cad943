"""The Source seam: what a capture thread hands to the daemon, and the slot it hands it through."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from edge.errors import Finding


@dataclass(frozen=True)
class Frame:
    # cameras: HxWx3 uint8 BGR; sensors: (window, channels) float32; text: a 0-d object array holding a str
    data: np.ndarray
    index: int  # frame/window number since the source opened
    captured_at: float  # time.time() at capture (payload)
    captured_mono: float  # time.monotonic() at capture (latencies)
    uri: str  # the source's public uri: never carries credentials
    # the first window of a new stream (opened, reconnected, looped over): recurrent state starts over
    restart: bool = False


@runtime_checkable
class Source(Protocol):
    uri: str  # public: credentials redacted by the source itself, so nothing downstream can leak them

    @property
    def finished(self) -> bool: ...  # a file ended and loop is false

    @property
    def lossless(self) -> bool: ...  # read at the reader's pace (files): the frame queue waits, never drops

    @property
    def stats(self) -> dict[str, int]: ...  # frames_in, frames_dropped, reconnects, read_errors

    def start(self) -> None: ...

    def read(self, timeout: float) -> Frame | None: ...

    def stop(self) -> None: ...


class LatestFrameSlot:
    """A single-slot buffer where the newest frame wins.

    A slow consumer must see the freshest frame, never a backlog: putting a frame over one that was
    never read replaces it and counts a drop. `close()` wakes any reader so shutdown never waits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()

    def take(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, or None when none arrives within `timeout` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._frame is None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._frame = self._frame, None
            self._cond.notify_all()  # a producer may be waiting for the slot to empty
            return frame

    def wait_empty(self, timeout: float) -> bool:
        """Block until the last frame was taken (or the slot closed); False on timeout.

        Lets a file played as fast as possible go at the reader's pace instead of dropping frames.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._frame is None or self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed


class CapturingSource:
    """What every source keeps the same way: the newest-frame slot, counters and the end-of-input flag.
    Subclasses run a capture thread that fills `_slot`, bumps `_counts` under `_lock`, and sets
    `_finished` when a non-looping input ends."""

    def __init__(self) -> None:
        self._slot = LatestFrameSlot()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"frames_in": 0, "reconnects": 0, "read_errors": 0}
        self._index = -1
        self._finished = False
        self.last_error: str | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def lossless(self) -> bool:
        """True for a file read at the reader's pace: every frame must reach inference, so the daemon waits
        for room in its queue instead of dropping the oldest (live inputs keep the freshest instead)."""
        return False

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        counts["frames_dropped"] = self._slot.dropped
        return counts

    def read(self, timeout: float) -> Frame | None:
        return self._slot.take(timeout)


class ReaderThreadSource(CapturingSource):
    """A source read by one thread of its own (`_run`, named `thread_name`) from `start()` to `stop()`."""

    @property
    def thread_name(self) -> str:
        return "source"

    def __init__(self) -> None:
        super().__init__()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._slot.reopen()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._slot.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def __enter__(self) -> ReaderThreadSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SourcePlugin:
    """What a source module declares as its module-level `PLUGIN`: the config's `type` key, the config
    model (pydantic, extra="forbid", `type: Literal[key]`), the Source class built from that config, and
    `check`: what `check-config` can verify of such a config without starting the source (files, device
    nodes), as messages that name the source."""

    key: str
    config: type[BaseModel]
    source: Callable[..., Source]
    check: Callable[..., list[Finding]]
