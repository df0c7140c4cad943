"""A counting subscriber: records every prediction's `seq` per device and reports what is missing,
duplicated or out of order — the numbers the fault scenarios are judged by."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.client import MessageError, parse_prediction


@dataclass
class SeqCount:
    """Counts for one device. `seq` rises by one per prediction across restarts (kept with the outbox)."""

    received: int = 0
    seqs: set[int] = field(default_factory=set)
    duplicates: int = 0
    out_of_order: int = 0
    last_seq: int | None = None
    boot_ids: list[str] = field(default_factory=list)

    def add(self, seq: int, boot_id: str) -> None:
        self.received += 1
        if seq in self.seqs:
            self.duplicates += 1
        elif self.last_seq is not None and seq < self.last_seq:
            self.out_of_order += 1
        self.seqs.add(seq)
        self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        if not self.boot_ids or self.boot_ids[-1] != boot_id:
            self.boot_ids.append(boot_id)

    def missing(self, first: int = 1, last: int | None = None) -> list[int]:
        """Seqs in [first, last] never received (last defaults to the highest seen)."""
        top = last if last is not None else (max(self.seqs) if self.seqs else first - 1)
        return [s for s in range(first, top + 1) if s not in self.seqs]


class CountingSubscriber:
    """A separate paho client (QoS 1, persistent session) that counts `{prefix}/+/predictions`."""

    def __init__(
        self, port: int, prefix: str = "edge", host: str = "127.0.0.1", client_id: str | None = None
    ):
        self.counts: dict[str, SeqCount] = defaultdict(SeqCount)
        self.invalid: list[str] = []
        # Called with every valid payload after it is counted (latency and per-source figures).
        self.on_payload: Callable[[dict[str, Any]], None] | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._topic = f"{prefix}/+/predictions"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"counter-{time.monotonic_ns()}",
            clean_session=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        # Reconnect faster than the daemon under test, so a restarted broker has this subscription
        # back before the daemon re-sends (paho accepts float delays; its annotation says int).
        self.client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]
        self.host, self.port = host, port

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if not reason_code.is_failure:
            client.subscribe(self._topic, qos=1)

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        # parsed the way a user's subscriber would (edge.client): one line naming topic and field if not
        try:
            prediction = parse_prediction(bytes(msg.payload), msg.topic)
        except MessageError as exc:
            with self._lock:
                self.invalid.append(str(exc))
            return
        with self._arrived:
            self.counts[prediction.device_id].add(prediction.seq, prediction.boot_id)
            self._arrived.notify_all()
        if self.on_payload is not None:
            self.on_payload(prediction.payload)

    def start(self, wait_subscribed: float = 10.0) -> CountingSubscriber:
        """Connect and return once the broker acknowledged the subscription: a message published before
        that would not be counted (connected is not enough)."""
        self.client.connect(self.host, self.port, keepalive=5)
        self.client.loop_start()
        if wait_subscribed and not self._subscribed.wait(wait_subscribed):
            self.stop()
            raise TimeoutError(
                f"the counting subscriber's subscription was not acknowledged in {wait_subscribed} s"
            )
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def wait_for(self, device: str, seq: int, timeout: float) -> bool:
        """Until every seq 1..`seq` of `device` arrived (or the timeout)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                count = self.counts.get(device)
                if count is not None and len(count.seqs) >= seq and not count.missing(1, seq):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._arrived.wait(min(remaining, 0.5))

    def snapshot(self, device: str) -> SeqCount:
        with self._lock:
            count = self.counts[device]
            return SeqCount(
                count.received,
                set(count.seqs),
                count.duplicates,
                count.out_of_order,
                count.last_seq,
                list(count.boot_ids),
            )


@dataclass
class ScenarioResult:
    scenario: str
    produced: int
    delivered: int
    missing: int
    duplicated: int
    dropped_counted: int
    recovery_s: float | None
    note: str = ""

    @property
    def row(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        return (
            f"| {self.scenario} | {self.produced} | {self.delivered} | {self.missing} | {self.duplicated} "
            f"| {self.dropped_counted} | {recovery} | {self.note} |"
        )


TABLE_HEADER = (
    "| scenario | produced | delivered | missing | duplicated | dropped (counted) | recovery | note |\n"
    "|---|---:|---:|---:|---:|---:|---:|---|"
)


def markdown_table(results: list[ScenarioResult]) -> str:
    return "\n".join([TABLE_HEADER, *(r.row for r in results)]) + "\n"
