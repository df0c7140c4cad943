"""Shared settings for the fuzz properties: example counts, a per-example hang guard, error checks.

The default suite runs a few hundred examples per property. `EDGE_FUZZ_EXAMPLES=N` scales every
property to N examples (the costly ones to a tenth of it) for a long run; `EDGE_FUZZ_EXAMPLE_TIMEOUT`
(seconds, default 10) is how long one example may take before it counts as a hang.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings

_SCALED = int(os.environ.get("EDGE_FUZZ_EXAMPLES", "0") or 0)
EXAMPLE_TIMEOUT_S = float(os.environ.get("EDGE_FUZZ_EXAMPLE_TIMEOUT", "10"))
# pytest-timeout for a whole property: generous for the default counts, scaled for a long run
TEST_TIMEOUT_S = 300 * max(1, _SCALED // 300)


def fuzz_settings(default: int, *, costly: bool = False) -> settings:
    """`default` examples, or EDGE_FUZZ_EXAMPLES (a tenth of it for properties that do real I/O)."""
    count = default
    if _SCALED:
        count = max(default, _SCALED // 10 if costly else _SCALED)
    return settings(
        max_examples=count,
        deadline=None,  # a shared 2-core machine: timing is noise; `no_hang` guards real hangs
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        derandomize=not _SCALED,  # the default suite is reproducible; a long run explores
        database=None,
    )


class Hang(Exception):
    """An example ran past EXAMPLE_TIMEOUT_S."""


@contextlib.contextmanager
def no_hang(seconds: float = EXAMPLE_TIMEOUT_S) -> Iterator[None]:
    """Fail the example (not the whole run) if the block takes longer than `seconds` (main thread only)."""

    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"example took longer than {seconds:g} s")

    # pytest-timeout's signal method owns SIGALRM too: put its handler and its remaining time back after
    previous = signal.signal(signal.SIGALRM, expired)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            remaining = max(0.001, outer_delay - (time.monotonic() - started))
            signal.setitimer(signal.ITIMER_REAL, remaining, outer_interval)


def assert_clear_error(exc: BaseException, *must_name: str) -> str:
    """An error a user can act on: one non-empty line that names the file/topic (and field) given."""
    message = str(exc)
    assert message.strip(), f"empty message from {type(exc).__name__}"
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    for name in must_name:
        assert name in message, f"error does not name {name!r}: {message!r}"
    return message


def with_field(document: Any, dotted: str, value: Any) -> Any:
    """A deep copy of `document` with the field at `dotted` ("sources.0.fps": list indices as numbers)
    set to `value`."""
    copied = copy.deepcopy(document)
    parts: list[Any] = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    target = copied
    for part in parts[:-1]:
        target = target[part]
    target[parts[-1]] = value
    return copied
