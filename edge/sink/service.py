"""The running sink: paho (manual acknowledgements) -> a batch -> one database transaction -> PUBACKs.

The network thread only queues what arrives. The writer thread takes up to `batch.max_size` messages
(waiting at most `batch.max_delay_ms` for more), validates each prediction against the shipped JSON
Schema (a failure goes to `dead_letters` with the reason, never stops the sink), writes the batch in one
transaction and only then acknowledges its messages. Killed at any point, the sink has acknowledged only
what is committed; the broker redelivers the rest to the restarted sink (same client id, persistent
session) and the primary key absorbs what had been committed but not yet acknowledged.

A PUBACK names a packet id of the connection the message came in on: after a reconnect the broker resends
the unacknowledged messages under their ids, so acknowledgements of an older connection are not sent
(they could acknowledge a different message); the resent copies are written and acknowledged instead.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge.client import (
    Connection,
    MessageError,
    Prediction,
    connect,
    make_client,
    parse_event,
    parse_prediction,
    parse_status,
    parse_time,
    subscribe_options,
    topic_filters,
    topic_kind,
)
from edge.publish.mqtt import MqttConfig, read_password
from edge.sink.check import plainly_valid
from edge.sink.config import SinkConfig
from edge.sink.storage import Batch, DeadLetter, Row, Snapshot, Storage, StorageError, open_storage

log = logging.getLogger(__name__)

MAX_REASON = 500
MAX_SNAPSHOT = 4 << 20  # bytes of one JPEG snapshot


@dataclass(frozen=True)
class Incoming:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes


class Validator:
    """The shipped `edge.prediction/1` JSON Schema; `reason()` is None or one line naming the field."""

    def __init__(self) -> None:
        try:
            import jsonschema
        except ImportError as exc:  # pragma: no cover - the sink extra installs it
            from edge.errors import ConfigError

            raise ConfigError("edge-sink needs jsonschema: pip install 'edge-runtime[sink]'") from exc
        from edge.publish.payload import prediction_schema

        self._validator = jsonschema.Draft202012Validator(prediction_schema())
        self._best_match = jsonschema.exceptions.best_match

    def reason(self, data: Any) -> str | None:
        if plainly_valid(data) or self._validator.is_valid(data):
            return None
        error = self._best_match(self._validator.iter_errors(data))
        if error is None:  # pragma: no cover - is_valid said otherwise
            return "does not match edge.prediction/1"
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        return f"{where}: {error.message}"[:MAX_REASON]


class SinkMetrics:
    """A private Prometheus registry (tests run several sinks in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter("edge_sink_messages", "Messages received", ["kind"], registry=r)
        self.stored = Counter("edge_sink_predictions_stored", "Predictions committed (new rows)", registry=r)
        self.duplicates = Counter(
            "edge_sink_duplicates", "Predictions received again (absorbed by the primary key)", registry=r
        )
        self.dead_letters = Counter(
            "edge_sink_dead_letters", "Invalid messages stored as dead letters", registry=r
        )
        self.batches = Counter("edge_sink_batches", "Database transactions committed", registry=r)
        self.db_errors = Counter("edge_sink_db_errors", "Failed database transactions (retried)", registry=r)
        self.batch_seconds = Histogram(
            "edge_sink_batch_seconds",
            "Time to write and commit one batch",
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        )
        self.latency = Histogram(
            "edge_sink_capture_to_commit_seconds",
            "From the frame's capture on the device to its row committed",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        )
        self.gap_ranges = Gauge(
            "edge_sink_gaps", "Missing seq ranges older than the grace period", registry=r
        )
        self.gap_seqs = Gauge("edge_sink_missing_predictions", "Seqs in those ranges", registry=r)
        self.connected = Gauge("edge_sink_mqtt_connected", "1 while connected to the broker", registry=r)
        self.queued = Gauge("edge_sink_queue_depth", "Messages received, not yet committed", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Sink:
    def __init__(self, config: SinkConfig, storage: Storage | None = None) -> None:
        self.config = config
        self.storage = storage or open_storage(config.database.url, config.schema_)
        self.metrics = SinkMetrics()
        self.validator = Validator()
        self.prefix = config.mqtt.topic_prefix
        self.client_id = config.mqtt.effective_client_id
        self._queue: queue.Queue[Incoming] = queue.Queue()
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = False
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[Any] = []
        self.stored = 0
        self.duplicates = 0
        self.dead = 0
        self.web_port: int | None = None
        self.metrics_port: int | None = None
        mqtt = config.mqtt
        password = read_password(MqttConfig(password_file=mqtt.password_file, username=mqtt.username))
        tls = mqtt.tls
        self.connection = Connection(
            host=mqtt.host,
            port=mqtt.port,
            client_id=self.client_id,
            session_expiry_s=mqtt.session_expiry_s,
            keepalive=mqtt.keepalive,
            username=mqtt.username,
            password=password,
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.cert_file if tls else None,
            key_file=tls.key_file if tls else None,
            tls=tls is not None,
            receive_maximum=mqtt.receive_maximum,
        )
        self._client = make_client(self.connection, manual_ack=True)
        if tls is not None and tls.insecure:
            self._client.tls_insecure_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        applied = self.storage.migrate()
        if applied:
            log.info("database: applied %d migration(s)", applied)
        connect(self._client, self.connection)
        self._client.loop_start()
        for target, name in ((self._write_loop, "sink-writer"), (self._gap_loop, "sink-gaps")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        from edge.sink.web import serve

        if self.config.web.port is not None:
            server = serve(self, self.config.web.addr, self.config.web.port, page=True)
            self._servers.append(server)
            self.web_port = int(server.server_address[1])
            log.info("fleet page on http://%s:%d/", self.config.web.addr, self.web_port)
        if self.config.metrics.port is not None:
            server = serve(self, self.config.metrics.addr, self.config.metrics.port, page=False)
            self._servers.append(server)
            self.metrics_port = int(server.server_address[1])

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Block until `request_stop()`, then stop cleanly (what is committed is acknowledged)."""
        while not self._stop.wait(0.5):
            pass
        self.stop()

    def stop(self) -> None:
        """Stop taking messages, commit and acknowledge what was queued, disconnect (the session stays)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._client.disconnect()
        self._client.loop_stop()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self.storage.close()

    # -- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt %s:%s refused the sink: %s", self.connection.host, self.connection.port, reason)
            return
        with self._gen_lock:
            self._generation += 1
        self._connected.set()
        self.metrics.connected.set(1)
        log.info(
            "mqtt connected to %s:%s as %s (session present: %s)",
            self.connection.host,
            self.connection.port,
            self.client_id,
            flags.session_present,
        )
        # the latest detection snapshot per source and label, retained (each sink keeps them all)
        filters = [*topic_filters(self.prefix, group=self.config.mqtt.group), f"{self.prefix}/+/+/+/snapshot"]
        # retained statuses only when the subscription is new; a present session queued the changes
        client.subscribe([(topic, subscribe_options(topic, 1)) for topic in filters])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._gen_lock:
            self._generation += 1
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("mqtt disconnected: %s", reason)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt refused the sink's subscriptions: %s", ", ".join(failed))
            return
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self._stop.is_set():
            return  # stopping: left unacknowledged, the broker keeps it for our session
        self._queue.put(
            Incoming(self._generation, message.mid, message.qos, message.topic, bytes(message.payload))
        )

    # -- writer ---------------------------------------------------------------------------------

    def _take(self) -> list[Incoming]:
        size = self.config.batch.max_size
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        items = [first]
        deadline = time.monotonic() + self.config.batch.max_delay_ms / 1000
        while len(items) < size:
            try:
                items.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return items

    def build(self, items: list[Incoming]) -> Batch:
        batch = Batch()
        for item in items:
            snapshot = self._snapshot(item)
            if snapshot is not None:
                if isinstance(snapshot, DeadLetter):
                    batch.dead_letters.append(snapshot)
                else:
                    batch.snapshots.append(snapshot)
                continue
            try:
                device, kind = topic_kind(item.topic, self.prefix)
            except MessageError as exc:
                batch.dead_letters.append(DeadLetter(item.topic, item.payload, str(exc)[:MAX_REASON]))
                continue
            self.metrics.messages.labels(kind).inc()
            if not item.payload and kind == "status":
                continue  # a retained status being cleared: nothing to store
            try:
                if kind == "predictions":
                    batch.predictions.append(self._row(device, item))
                elif kind == "status":
                    status = parse_status(item.payload, item.topic)
                    if status.device_id != device:
                        raise MessageError(
                            item.topic, "device_id", f"'{status.device_id}' is not the topic's"
                        )
                    batch.statuses.append(status)
                else:
                    event = parse_event(item.payload, item.topic)
                    batch.events.append(event if event.device_id else _with_device(event, device))
            except MessageError as exc:
                batch.dead_letters.append(DeadLetter(item.topic, item.payload, str(exc)[:MAX_REASON]))
        return batch

    def _snapshot(self, item: Incoming) -> Snapshot | DeadLetter | None:
        """`{prefix}/{device}/{source}/{label}/snapshot` as a Snapshot (None: another topic)."""
        parts = item.topic.split("/")
        prefix = self.prefix.split("/")
        if len(parts) != len(prefix) + 4 or parts[: len(prefix)] != prefix or parts[-1] != "snapshot":
            return None
        device, source, label = parts[len(prefix) : len(prefix) + 3]
        self.metrics.messages.labels("snapshot").inc()
        if item.payload and not item.payload.startswith(b"\xff\xd8\xff"):
            return DeadLetter(
                item.topic, item.payload[:1024], f"{item.topic}: not a JPEG (no FF D8 FF start)"
            )
        if len(item.payload) > MAX_SNAPSHOT:
            return DeadLetter(
                item.topic, b"", f"{item.topic}: {len(item.payload)} bytes, over {MAX_SNAPSHOT}"
            )
        return Snapshot(device, source, label, item.payload)

    def _row(self, device: str, item: Incoming) -> Row:
        try:
            data = json.loads(item.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise MessageError(item.topic, "", f"payload is not JSON: {exc}") from None
        reason = self.validator.reason(data)
        if reason is not None:
            raise MessageError(item.topic, "", reason)
        prediction: Prediction = parse_prediction(data, item.topic)
        if prediction.device_id != device:
            raise MessageError(
                item.topic, "device_id", f"'{prediction.device_id}' is not the topic's '{device}'"
            )
        captured = data["source"]["captured_at"]
        return Row(
            device_id=prediction.device_id,
            boot_id=prediction.boot_id,
            seq=prediction.seq,
            ts=prediction.ts,
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            result=json.dumps(prediction.result, separators=(",", ":")),
            payload=item.payload.decode(),
            captured_at=captured,
        )

    def _write(self, batch: Batch) -> bool:
        """Write until committed (retrying a lost database) or stopping; False if not written."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                result = self.storage.write(batch)
            except StorageError as exc:
                self.metrics.db_errors.inc()
                if not exc.retry:
                    return self._write_one_by_one(batch, exc)
                log.warning("%s; retrying in %.1f s", exc, delay)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 10.0)
                continue
            committed = time.time()
            self.metrics.batch_seconds.observe(time.monotonic() - started)
            self.metrics.batches.inc()
            self.metrics.stored.inc(result.inserted)
            self.metrics.duplicates.inc(result.duplicates)
            self.metrics.dead_letters.inc(len(batch.dead_letters))
            self.stored += result.inserted
            self.duplicates += result.duplicates
            self.dead += len(batch.dead_letters)
            for row in result.inserted_rows:
                if row.captured_at:
                    self.metrics.latency.observe(max(0.0, committed - parse_time(row.captured_at)))
            return True

    def _write_one_by_one(self, batch: Batch, error: StorageError) -> bool:
        """The database refused the batch (a value it cannot store): each message alone, the refused
        ones as dead letters with the database's reason."""
        log.warning("%s; writing the batch one message at a time", error)
        singles: list[Batch] = [Batch(predictions=[row]) for row in batch.predictions]
        singles += [Batch(statuses=[s]) for s in batch.statuses] + [Batch(events=[e]) for e in batch.events]
        singles += [Batch(dead_letters=[d]) for d in batch.dead_letters]
        singles += [Batch(snapshots=[snap]) for snap in batch.snapshots]
        for single in singles:
            try:
                result = self.storage.write(single)
                self.stored += result.inserted
                self.duplicates += result.duplicates
                self.metrics.stored.inc(result.inserted)
                self.dead += len(single.dead_letters)
            except StorageError as exc:
                if exc.retry:
                    return False
                topic, payload = _identify(single, self.prefix)
                letter = DeadLetter(topic, payload, f"the database refused it: {exc}"[:MAX_REASON])
                try:
                    self.storage.write(Batch(dead_letters=[letter]))
                except StorageError:
                    return False
                self.dead += 1
                self.metrics.dead_letters.inc()
        return True

    def _ack(self, items: list[Incoming]) -> None:
        with self._gen_lock:
            generation = self._generation
        for item in items:
            if item.qos > 0 and item.generation == generation:
                self._client.ack(item.mid, item.qos)

    def _write_loop(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            if self._stop.is_set() and not self._connected.is_set():
                return  # nothing could be acknowledged any more: the broker redelivers it
            items = self._take()
            self.metrics.queued.set(self._queue.qsize())
            if not items:
                if self._stop.is_set():
                    return
                continue
            try:
                batch = self.build(items)
            except Exception:  # a bug here must not lose the batch: leave it unacknowledged
                log.exception("sink: cannot build a batch; its messages stay unacknowledged")
                continue
            if self._write(batch):
                self._ack(items)

    def _gap_loop(self) -> None:
        gaps = self.config.gaps
        while not self._stop.wait(gaps.interval_s):
            self.refresh_gaps()

    def refresh_gaps(self) -> None:
        try:
            found = self.storage.refresh_gaps(self.config.gaps.grace_s)
        except StorageError as exc:
            log.warning("gap refresh: %s", exc)
            return
        self.metrics.gap_ranges.set(len(found))
        self.metrics.gap_seqs.set(sum(g.to_seq - g.from_seq + 1 for g in found))


def _with_device(event: Any, device: str) -> Any:
    from edge.client import Event

    return Event(event.topic, device, event.event, event.ts, event.data, event.payload)


def _identify(batch: Batch, prefix: str) -> tuple[str, bytes]:
    if batch.predictions:
        row = batch.predictions[0]
        return f"{prefix}/{row.device_id}/predictions", row.payload.encode()
    if batch.statuses:
        status = batch.statuses[0]
        return status.topic, json.dumps(status.payload).encode()
    if batch.events:
        event = batch.events[0]
        return event.topic, json.dumps(event.payload).encode()
    if batch.snapshots:
        snap = batch.snapshots[0]
        return f"{prefix}/{snap.device_id}/{snap.source}/{snap.label}/snapshot", snap.jpeg[:1024]
    letter = batch.dead_letters[0]
    return letter.topic, letter.payload
