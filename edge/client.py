"""The consuming side's library: typed messages from a fleet's topics, a gap/duplicate tracker and a
`subscribe()` iterator that survives broker restarts (paho-mqtt >= 2, MQTT 5).

    from edge.client import subscribe
    with subscribe("127.0.0.1", 1883, prefix="edge", client_id="my-app") as sub:
        for message in sub:                     # Prediction | Status | Event
            ...
        print(sub.tracker.gaps(), sub.tracker.duplicates)

Parsing is strict about what it types (device_id, boot_id, seq, ts, model, result; state and since;
event) and keeps the whole payload in `.payload`; a bad message is a `MessageError` whose one line names
the topic and the field. `GapTracker` counts, per device and boot, the seq ranges received, the ranges
still missing (reported only once they stay missing for `grace_s`), duplicates and when each was last
seen. Topics are `{prefix}/{device_id}/predictions`, `.../status` (retained) and `.../events[/...]`.
"""

from __future__ import annotations

import bisect
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Union

from edge.errors import EdgeError

log = logging.getLogger(__name__)

KINDS = ("predictions", "status", "events")


class MessageError(EdgeError):
    """A payload that does not parse; the message names the topic and the field."""

    def __init__(self, topic: str, field: str, problem: str) -> None:
        self.topic = topic
        self.field = field
        self.problem = problem
        super().__init__(f"{topic or '(no topic)'}: {field}: {problem}" if field else f"{topic}: {problem}")


def parse_time(text: str) -> float:
    """RFC 3339 (`...Z` or an offset) as Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _json_object(topic: str, payload: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(payload, Mapping):
        return dict(payload)
    try:  # json.loads would guess UTF-16/32 from the bytes; the contract is UTF-8
        data = json.loads(payload.decode("utf-8") if isinstance(payload, bytes | bytearray) else payload)
    except UnicodeDecodeError as exc:
        raise MessageError(topic, "", f"payload is not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise MessageError(topic, "", f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MessageError(topic, "", f"payload is a JSON {type(data).__name__}, not an object")
    return data


def _field(topic: str, data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    parts = name.split(".")
    value: Any = data
    for depth, part in enumerate(parts):
        if not isinstance(value, Mapping) or part not in value:
            where = ".".join(parts[:depth]) or "payload"
            raise MessageError(topic, name, f"missing (not in {where})")
        value = value[part]
    # bool is an int in Python; a seq of `true` is still wrong
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(t.__name__ for t in _as_tuple(kind))
        raise MessageError(topic, name, f"expected {names}, got {type(value).__name__} {value!r:.40}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _timestamp(topic: str, data: Mapping[str, Any], name: str) -> str:
    text = _field(topic, data, name, str)
    try:
        parse_time(text)
    except ValueError:
        raise MessageError(topic, name, f"not an RFC 3339 time: {text!r:.40}") from None
    return str(text)


@dataclass(frozen=True)
class Prediction:
    """One `edge.prediction/1` message."""

    topic: str
    device_id: str
    boot_id: str
    seq: int
    ts: str
    model_name: str
    model_version: str
    result: dict[str, Any]
    payload: dict[str, Any] = field(repr=False)

    @property
    def result_type(self) -> str:
        return str(self.result.get("type", ""))

    @property
    def captured_at(self) -> float | None:
        """Unix seconds of the frame's capture, when the payload says."""
        source = self.payload.get("source")
        text = source.get("captured_at") if isinstance(source, dict) else None
        try:
            return parse_time(text) if isinstance(text, str) else None
        except ValueError:
            return None

    @property
    def latency_ms(self) -> dict[str, float]:
        latency = self.payload.get("latency_ms")
        return {k: float(v) for k, v in latency.items()} if isinstance(latency, dict) else {}


@dataclass(frozen=True)
class Status:
    """The retained `status`: `online` (with model, runtime ...) or `offline` (Last Will or clean stop)."""

    topic: str
    device_id: str
    state: str
    ts: str
    since: str | None
    payload: dict[str, Any] = field(repr=False)

    @property
    def online(self) -> bool:
        return self.state == "online"

    @property
    def model(self) -> dict[str, Any]:
        model = self.payload.get("model")
        return dict(model) if isinstance(model, dict) else {}


@dataclass(frozen=True)
class Event:
    """One message on `events` (or a topic below it, e.g. `events/objects`)."""

    topic: str
    device_id: str
    event: str
    ts: str | None
    data: dict[str, Any]
    payload: dict[str, Any] = field(repr=False)


Message = Union[Prediction, Status, Event]  # noqa: UP007 (a runtime alias; `|` on classes needs 3.10)


def topic_kind(topic: str, prefix: str) -> tuple[str, str]:
    """(device_id, kind) of `{prefix}/{device}/{kind}[/...]`; kind is predictions, status or events."""
    if not topic.startswith(prefix + "/"):
        raise MessageError(topic, "", f"not under the topic prefix '{prefix}'")
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) < 2 or not parts[0]:
        raise MessageError(topic, "", "expected {prefix}/{device_id}/predictions|status|events")
    device, kind = parts[0], parts[1]
    if kind not in KINDS or (kind != "events" and len(parts) > 2):
        raise MessageError(topic, "", f"'{'/'.join(parts[1:])}' is not predictions, status or events")
    return device, kind


def parse_prediction(payload: bytes | str | Mapping[str, Any], topic: str = "") -> Prediction:
    data = _json_object(topic, payload)
    schema = data.get("schema")
    if schema != "edge.prediction/1":
        raise MessageError(topic, "schema", f"expected 'edge.prediction/1', got {schema!r:.40}")
    seq = _field(topic, data, "seq", int)
    if seq < 1:
        raise MessageError(topic, "seq", f"must be >= 1, got {seq}")
    result = _field(topic, data, "result", dict)
    _field(topic, data, "result.type", str)
    return Prediction(
        topic=topic,
        device_id=_field(topic, data, "device_id", str),
        boot_id=_field(topic, data, "boot_id", str),
        seq=seq,
        ts=_timestamp(topic, data, "ts"),
        model_name=_field(topic, data, "model.name", str),
        model_version=_field(topic, data, "model.version", str),
        result=result,
        payload=data,
    )


def parse_status(payload: bytes | str | Mapping[str, Any], topic: str = "") -> Status:
    data = _json_object(topic, payload)
    state = _field(topic, data, "state", str)
    since = _timestamp(topic, data, "since") if "since" in data else None
    return Status(
        topic=topic,
        device_id=_field(topic, data, "device_id", str),
        state=state,
        ts=_timestamp(topic, data, "ts"),
        since=since,
        payload=data,
    )


def parse_event(payload: bytes | str | Mapping[str, Any], topic: str = "") -> Event:
    data = _json_object(topic, payload)
    # `events` carries {"event", "device_id", "ts", "data"}; topics below it (events/objects) carry
    # their own body, typed by its `type` and with the device taken from the topic.
    name = data.get("event", data.get("type"))
    if not isinstance(name, str):
        raise MessageError(topic, "event", f"expected str, got {type(name).__name__}")
    ts = _timestamp(topic, data, "ts") if "ts" in data else None
    device = data.get("device_id")
    if device is not None and not isinstance(device, str):
        raise MessageError(topic, "device_id", f"expected str, got {type(device).__name__}")
    body = data.get("data", {})
    return Event(
        topic=topic,
        device_id=device or "",
        event=name,
        ts=ts,
        data=body if isinstance(body, dict) else {"value": body},
        payload=data,
    )


def parse_message(topic: str, payload: bytes | str | Mapping[str, Any], prefix: str = "edge") -> Message:
    """The typed message a topic carries; a payload naming another device than its topic is refused."""
    device, kind = topic_kind(topic, prefix)
    message: Message
    if kind == "predictions":
        message = parse_prediction(payload, topic)
    elif kind == "status":
        message = parse_status(payload, topic)
    else:
        message = parse_event(payload, topic)
        if not message.device_id:
            return Event(topic, device, message.event, message.ts, message.data, message.payload)
    if message.device_id != device:
        raise MessageError(topic, "device_id", f"'{message.device_id:.40}' is not the topic's '{device}'")
    return message


# ---------------------------------------------------------------------------------------------------------
# Gaps and duplicates


@dataclass(frozen=True)
class Gap:
    """Seqs `from_seq..to_seq` (inclusive) of one device and boot not received (yet)."""

    device_id: str
    boot_id: str
    from_seq: int
    to_seq: int
    since: float  # monotonic clock of the tracker: when the range was first seen missing

    @property
    def count(self) -> int:
        return self.to_seq - self.from_seq + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
        }


@dataclass
class StreamStats:
    device_id: str
    boot_id: str
    received: int = 0
    duplicates: int = 0
    first_seq: int = 0
    last_seq: int = 0
    last_seen: float = 0.0  # wall clock (Unix seconds)


class _Stream:
    """Received seqs as sorted, disjoint, non-adjacent [lo, hi] ranges; `since[i]` is when the hole just
    before range i (i > 0) first appeared."""

    def __init__(self, stats: StreamStats) -> None:
        self.stats = stats
        self.lo: list[int] = []
        self.hi: list[int] = []
        self.since: list[float] = []

    def add(self, seq: int, now: float) -> bool:
        lo, hi, since = self.lo, self.hi, self.since
        i = bisect.bisect_right(lo, seq) - 1  # the range starting at or before seq
        if i >= 0 and seq <= hi[i]:
            return False
        joins_prev = i >= 0 and hi[i] == seq - 1
        joins_next = i + 1 < len(lo) and lo[i + 1] == seq + 1
        if joins_prev and joins_next:  # the last missing seq of a hole: two ranges become one
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1], since[i + 1]
        elif joins_prev:
            hi[i] = seq
        elif joins_next:
            lo[i + 1] = seq
        else:
            # inside a hole: both halves keep its age; past either end: a new hole appears now
            if i + 1 < len(lo):
                if i < 0:  # before the first range: the hole up to it is new
                    since[0] = now
                age = since[i + 1]
            else:
                age = now
            lo.insert(i + 1, seq)
            hi.insert(i + 1, seq)
            since.insert(i + 1, age)
        return True

    def holes(self) -> Iterator[tuple[int, int, float]]:
        for i in range(1, len(self.lo)):
            yield self.hi[i - 1] + 1, self.lo[i] - 1, self.since[i]


class GapTracker:
    """Per (device_id, boot_id): what was received, what is missing, duplicates and last seen.

    A seq missing between two received ones is a gap once it has stayed missing for `grace_s` (QoS 1
    redeliveries and shared-subscription splits arrive out of order). Seqs before the first one received
    are not counted: a subscriber that starts late has not lost them.
    """

    def __init__(self, grace_s: float = 10.0, clock: Any = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._lock = threading.Lock()

    def add(self, device_id: str, boot_id: str, seq: int) -> bool:
        """Record one seq; False if it was already received (a duplicate)."""
        now = self._clock()
        with self._lock:
            stream = self._streams.get((device_id, boot_id))
            if stream is None:
                stream = self._streams[(device_id, boot_id)] = _Stream(StreamStats(device_id, boot_id))
            stats = stream.stats
            stats.last_seen = time.time()
            if not stream.add(seq, now):
                stats.duplicates += 1
                return False
            stats.received += 1
            stats.first_seq = stream.lo[0]
            stats.last_seq = stream.hi[-1]
            return True

    def add_prediction(self, prediction: Prediction) -> bool:
        return self.add(prediction.device_id, prediction.boot_id, prediction.seq)

    def gaps(self, grace_s: float | None = None) -> list[Gap]:
        """Missing ranges that have stayed missing for at least `grace_s` (default: the tracker's)."""
        grace = self.grace_s if grace_s is None else grace_s
        now = self._clock()
        with self._lock:
            return [
                Gap(device, boot, first, last, since)
                for (device, boot), stream in sorted(self._streams.items())
                for first, last, since in stream.holes()
                if now - since >= grace
            ]

    def missing(self, grace_s: float | None = None) -> int:
        return sum(gap.count for gap in self.gaps(grace_s))

    @property
    def duplicates(self) -> int:
        with self._lock:
            return sum(stream.stats.duplicates for stream in self._streams.values())

    @property
    def received(self) -> int:
        with self._lock:
            return sum(stream.stats.received for stream in self._streams.values())

    def streams(self) -> list[StreamStats]:
        with self._lock:
            return [StreamStats(**vars(stream.stats)) for _, stream in sorted(self._streams.items())]


# ---------------------------------------------------------------------------------------------------------
# MQTT


@dataclass(frozen=True)
class Connection:
    """Where and how to connect (the daemon config's `mqtt:` block has the same names)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    session_expiry_s: int = 3600  # 0 with an empty client_id: a throwaway session
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = False
    receive_maximum: int = 1000  # unacknowledged QoS 1 messages the broker may send us


def make_client(connection: Connection, *, manual_ack: bool = False) -> Any:
    """A paho MQTT 5 client set up for `connection` (not connected yet)."""
    import paho.mqtt.client as paho

    class _Client(paho.Client):
        """paho's network loop swallows a failed connection attempt: say it once per new reason."""

        failure: str | None = None

        def reconnect(self) -> Any:
            try:
                result = super().reconnect()
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self.failure:
                    self.failure = reason
                    log.warning(
                        "mqtt cannot connect to %s:%s: %s (retrying)",
                        connection.host,
                        connection.port,
                        reason,
                    )
                raise
            self.failure = None
            return result

    client = _Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=connection.client_id,
        protocol=paho.MQTTv5,
        reconnect_on_failure=True,
        manual_ack=manual_ack,
    )
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    if connection.tls or connection.ca_file is not None:
        client.tls_set(
            ca_certs=str(connection.ca_file) if connection.ca_file else None,
            certfile=str(connection.cert_file) if connection.cert_file else None,
            keyfile=str(connection.key_file) if connection.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    if connection.username is not None or connection.password is not None:
        client.username_pw_set(connection.username or "", connection.password)
    client.suppress_exceptions = True
    return client


def connect(client: Any, connection: Connection) -> None:
    """Connect asynchronously with clean start false and a session expiry, so the broker keeps our
    subscriptions and queued QoS 1 messages while we are away."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = connection.session_expiry_s
    props.ReceiveMaximum = connection.receive_maximum
    client.connect_async(
        connection.host,
        connection.port,
        connection.keepalive,
        clean_start=not connection.client_id,
        properties=props,
    )


def topic_filters(prefix: str, kinds: tuple[str, ...] = KINDS, group: str | None = None) -> list[str]:
    """The subscriptions for `kinds`; with `group`, predictions and events are shared
    (`$share/{group}/...`) so a group's members split them. Status stays unshared: a broker does not send
    retained messages on a shared subscription, and each member wants every device's state."""
    filters = []
    for kind in kinds:
        topic = f"{prefix}/+/events/#" if kind == "events" else f"{prefix}/+/{kind}"
        if group and kind != "status":
            topic = f"$share/{group}/{topic}"
        filters.append(topic)
    return filters


def subscribe_options(topic: str, qos: int) -> Any:
    """MQTT 5 options: retained messages only when the subscription is new (retain handling 1)."""
    from paho.mqtt.subscribeoptions import SubscribeOptions

    return SubscribeOptions(qos=qos, retainHandling=0 if topic.startswith("$share/") else 1)


class Subscription:
    """An iterator over the typed messages of a fleet; reconnects on its own (paho's loop thread).

    Iterating blocks until a message arrives and ends after `close()`. A message that does not parse
    is logged, counted in `invalid` and skipped (`strict=True`: raised as `MessageError`). Predictions
    are fed to `tracker` (a `GapTracker`) as they are yielded.
    """

    def __init__(
        self,
        connection: Connection,
        prefix: str = "edge",
        kinds: tuple[str, ...] = KINDS,
        group: str | None = None,
        qos: Literal[0, 1, 2] = 1,
        strict: bool = False,
        grace_s: float = 10.0,
        max_queued: int = 100_000,
    ) -> None:
        for kind in kinds:
            if kind not in KINDS:
                raise EdgeError(f"kinds: '{kind}' is not one of {', '.join(KINDS)}")
        self.connection = connection
        self.prefix = prefix
        self.filters = topic_filters(prefix, kinds, group)
        self.qos = qos
        self.strict = strict
        self.tracker = GapTracker(grace_s)
        self.invalid = 0
        self.connects = 0
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_queued)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._closed = False
        self._client = make_client(connection)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout: float | None = 10.0) -> Subscription:
        """Connect and wait (up to `timeout`, None: do not wait) for the subscriptions to be granted."""
        connect(self._client, self.connection)
        self._client.loop_start()
        if timeout is not None and not self._subscribed.wait(timeout):
            self.close()
            raise EdgeError(
                f"mqtt {self.connection.host}:{self.connection.port}: not subscribed within {timeout:g} s"
            )
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt %s:%s refused: %s", self.connection.host, self.connection.port, reason)
            return
        self.connects += 1
        self._connected.set()
        # subscribe even when the session is present: it is idempotent and covers a broker that lost it;
        # retained messages come only with a new subscription, not again on every reconnect
        client.subscribe([(topic, subscribe_options(topic, self.qos)) for topic in self.filters])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt: subscriptions %s refused: %s", self.filters, ", ".join(failed))
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._queue.put((message.topic, bytes(message.payload)))

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if item is None:
                self._queue.put(None)  # keep telling every other reader
                return None
            topic, payload = item
            if not payload:
                continue  # a retained message being cleared
            try:
                message = parse_message(topic, payload, self.prefix)
            except MessageError as exc:
                self.invalid += 1
                if self.strict:
                    raise
                log.warning("skipping a message: %s", exc)
                continue
            if isinstance(message, Prediction):
                self.tracker.add_prediction(message)
            return message

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.get()
            if message is None:
                return
            yield message

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.disconnect()
            self._client.loop_stop()
            self._queue.put(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    host: str = "127.0.0.1",
    port: int = 1883,
    *,
    prefix: str = "edge",
    kinds: tuple[str, ...] = KINDS,
    client_id: str = "",
    group: str | None = None,
    session_expiry_s: int = 3600,
    qos: Literal[0, 1, 2] = 1,
    strict: bool = False,
    grace_s: float = 10.0,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    timeout: float | None = 10.0,
) -> Subscription:
    """Subscribe to a fleet's `kinds` under `prefix`; iterate the result for typed messages.

    With a `client_id` the session is persistent (clean start false, `session_expiry_s`): what is
    published while the subscriber is away is delivered when it comes back. `group` makes the
    prediction and event subscriptions shared with the other members of that group.
    """
    connection = Connection(
        host=host,
        port=port,
        client_id=client_id,
        session_expiry_s=session_expiry_s if client_id else 0,
        username=username,
        password=password,
        ca_file=ca_file,
    )
    return Subscription(connection, prefix, kinds, group, qos, strict, grace_s).start(timeout)
