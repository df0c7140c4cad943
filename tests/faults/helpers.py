"""What the fault scenarios share: one object for the directory, broker, counting subscriber and daemons a
scenario works with, so each scenario states only its own config and checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.broker import Mosquitto
from tests.faults.counting import CountingSubscriber
from tests.faults.daemon_proc import DEVICE, DaemonProcess, fault_config


@dataclass
class FaultRig:
    """A scenario's working directory, its broker, the counting subscriber on that broker, and the daemons
    it started (all killed at teardown by the `daemons` fixture)."""

    workdir: Path
    broker: Mosquitto
    counter: CountingSubscriber
    daemons: list[DaemonProcess]

    def config(self, **options: Any) -> Path:
        """`fault_config` for this scenario's directory and broker."""
        return fault_config(self.workdir, self.broker.port, **options)

    def start(self, config: Path, watchdog_usec: int | None = None) -> DaemonProcess:
        """A daemon on `config`, started and ready; it is killed at teardown whatever happens."""
        daemon = DaemonProcess(config, self.workdir, watchdog_usec=watchdog_usec)
        self.daemons.append(daemon)
        daemon.start()
        daemon.wait_ready()
        return daemon

    def max_seen(self) -> int:
        """The highest seq the counting subscriber has received (0 before the first)."""
        return self.counter.snapshot(DEVICE).last_seq or 0
