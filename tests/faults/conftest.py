"""Fixtures for the fault scenarios and the hook that writes their table at the end of the session."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Mosquitto
from tests.faults import report
from tests.faults.counting import CountingSubscriber
from tests.faults.daemon_proc import PREFIX, DaemonProcess
from tests.faults.helpers import FaultRig


@pytest.fixture
def broker(mosquitto: Mosquitto) -> Mosquitto:
    """The test's own persistent mosquitto (tests/conftest.py), stopped, killed, paused and restarted by
    the scenario; the subscriber's session and queued messages survive a SIGTERM restart."""
    return mosquitto


class PayloadLedger:
    """Beside the counter: which distinct payloads arrived under each seq. A redelivery carries the same
    bytes (same boot_id, same window); a *reused* seq would carry different ones."""

    def __init__(self, counter: CountingSubscriber):
        self.by_seq: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._count = counter._on_message

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seq = int(json.loads(msg.payload)["seq"])
                with self._lock:
                    self.by_seq[seq].add(hashlib.sha256(msg.payload).hexdigest())
            self._count(client, userdata, msg)

        counter.client.on_message = on_message

    def reused(self) -> list[int]:
        with self._lock:
            return sorted(seq for seq, digests in self.by_seq.items() if len(digests) > 1)


@pytest.fixture
def counter(broker: Mosquitto) -> Iterator[CountingSubscriber]:
    """The counting subscriber (persistent session), subscribed before the scenario starts; its
    `ledger` attribute records payload digests per seq."""
    sub = CountingSubscriber(broker.port, prefix=PREFIX, client_id="fault-counter")
    sub.ledger = PayloadLedger(sub)  # type: ignore[attr-defined]
    sub.start()
    try:
        yield sub
    finally:
        sub.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    """Every DaemonProcess a scenario creates is appended here and killed afterwards, whatever happened."""
    started: list[DaemonProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.close()


@pytest.fixture
def rig(
    tmp_path: Path, broker: Mosquitto, counter: CountingSubscriber, daemons: list[DaemonProcess]
) -> FaultRig:
    """The scenario's directory, broker, counting subscriber and daemons in one object."""
    return FaultRig(tmp_path, broker, counter, daemons)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = report.write_report(report.RESULTS)
    if path is None:
        return
    terminalreporter.section("fault suite: counted results")
    terminalreporter.write(report.render(report.RESULTS))
    terminalreporter.write_line(f"written to {path}")
