"""Sequences of requests for stateful models (a VAD's `h`, any `--state IN:OUT` package).

A stateful model's answer depends on what it saw before, so requests that belong together say so, with
Triton's sequence-batcher names: `sequence_id` (a string or a positive integer), `sequence_start` (the
first request: the state starts at zeros) and `sequence_end` (the last: the state is forgotten after it).
Each open sequence carries its own state, in the order its requests arrived, whichever worker serves
them. A request of a stateful model without `sequence_id` is served on its own: zero state in, nothing
kept, so no client ever sees another's state. A sequence nobody continued for `sequence_idle_s` is
closed (Triton's max_sequence_idle_microseconds); at most `max_sequences` are open at once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge.jsontypes import JSONValue

MAX_ID_LENGTH = 128
FIELDS = ("sequence_id", "sequence_start", "sequence_end")


class SequenceError(ValueError):
    """A request whose sequence fields cannot be served; `field` names the one at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SequenceFlags:
    id: str
    start: bool = False
    end: bool = False

    @property
    def stream(self) -> str:
        """The session's state key: apart from every source's uri and every one-off request."""
        return f"sequence:{self.id}"


def parse_sequence(fields: Mapping[str, JSONValue], prefix: str = "") -> SequenceFlags | None:
    """The sequence a request's fields name (None: none); `prefix` is where they sit (`parameters.`)."""
    given = {key: fields[key] for key in FIELDS if key in fields}
    if not given:
        return None
    raw_id = given.get("sequence_id")
    if raw_id is None:
        other = next(iter(given))
        raise SequenceError(f"{prefix}{other} needs {prefix}sequence_id", f"{prefix}sequence_id")
    valid_int = isinstance(raw_id, int) and not isinstance(raw_id, bool) and raw_id > 0
    valid_str = isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH
    if not (valid_int or valid_str):
        raise SequenceError(
            f"{prefix}sequence_id must be a positive integer or a string of 1-{MAX_ID_LENGTH} characters",
            f"{prefix}sequence_id",
        )
    flags: dict[str, bool] = {}
    for key in ("sequence_start", "sequence_end"):
        value = given.get(key, False)
        if not isinstance(value, bool):
            raise SequenceError(f"{prefix}{key} must be true or false", f"{prefix}{key}")
        flags[key] = value
    return SequenceFlags(str(raw_id), flags["sequence_start"], flags["sequence_end"])


class SequenceTable:
    """The open sequences and when each was last continued. `admit` decides whether a request may go on
    (and opens or closes its sequence); the worker asks `is_open` after a run to know whether to keep the
    state it produced."""

    def __init__(
        self,
        idle_s: float,
        max_open: int,
        on_close: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.max_open = max_open
        self._on_close = on_close  # forgets a closed sequence's state
        self._clock = clock
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self.expired = 0

    def admit(self, flags: SequenceFlags) -> None:
        now = self._clock()
        closed: list[str] = []
        try:
            with self._lock:
                while self._last:
                    stream, last = next(iter(self._last.items()))
                    if now - last < self.idle_s:
                        break
                    del self._last[stream]
                    closed.append(stream)
                    self.expired += 1
                stream = flags.stream
                if stream not in self._last:
                    if not flags.start:
                        raise SequenceError(
                            f"sequence '{flags.id}' is not open (never started, ended, or idle for more than "
                            f"{self.idle_s:g} s): its first request sets sequence_start",
                            "sequence_start",
                        )
                    if len(self._last) >= self.max_open:
                        raise SequenceError(
                            f"{self.max_open} sequences are open (requests.max_sequences): end one with "
                            "sequence_end, or wait for an idle one to close",
                            "sequence_id",
                        )
                if flags.end:
                    self._last.pop(stream, None)
                else:
                    self._last[stream] = now
                    self._last.move_to_end(stream)
        finally:
            for stream in closed:
                self._on_close(stream)

    def is_open(self, stream: str) -> bool:
        with self._lock:
            return stream in self._last

    def __len__(self) -> int:
        with self._lock:
            return len(self._last)


class StreamTurns:
    """Runs of one stream in the order its jobs left the queue, whichever worker holds them: a number
    is issued as a job is taken (under the queue's lock, so in queue order) and its run waits for it.
    A worker runs its own jobs in the order it took them, so the oldest job not yet run can always go."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued: dict[str, int] = {}
        self._served: dict[str, int] = {}

    def issue(self, stream: str) -> int:
        with self._cond:
            number = self._issued.get(stream, 0)
            self._issued[stream] = number + 1
            return number

    def wait(self, stream: str, number: int) -> None:
        with self._cond:
            while self._served.get(stream, 0) != number:
                self._cond.wait(0.5)

    def done(self, stream: str, number: int) -> None:
        with self._cond:
            served = number + 1
            if served >= self._issued.get(stream, 0):  # nothing of it is waiting: forget the stream
                self._issued.pop(stream, None)
                self._served.pop(stream, None)
            else:
                self._served[stream] = served
            self._cond.notify_all()
