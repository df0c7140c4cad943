"""MQTT publisher (paho-mqtt >= 2) that drains the durable outbox and never loses a prediction.

A publisher thread hands at most `inflight_window` outbox rows to paho; a row is deleted only when paho
reports it acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2). paho keeps the unacknowledged ones of its
session and re-sends them after a reconnect, and a new process re-sends whatever is still in the outbox,
so a broker or process failure can cause duplicates (at most one window) but not losses.

Commands arrive on the network thread and are only parsed there; handlers run on their own thread, so a
slow or raising handler cannot stall or kill the MQTT loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.errors import ConfigError
from edge.publish.commands import (
    Command,
    CommandHandler,
    CommandRejected,
    ReplyRoute,
    command_topic_filter,
    dispatch,
    parse_command,
    rejection_reply,
    reply_body,
)
from edge.publish.outbox import MemoryOutbox, Outbox
from edge.publish.payload import CONTENT_TYPE, SCHEMA_ID, rfc3339
from edge.publish.requests import InferRequest, RequestRejected, infer_topic, parse_infer_request, pool_topic
from edge.trust import check_secret_file

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGE_MQTT_PASSWORD"
PASSWORD_FILE_ENV = "EDGE_MQTT_PASSWORD_FILE"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None  # mutual TLS: client certificate ...
    key_file: Path | None = None  # ... and its key
    insecure: bool = False  # skip host name verification (testing only)


class MqttConfig(BaseModel):
    """The `mqtt:` block of the daemon config (docs/contracts.md), with TLS, session and flow-control knobs."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal[5, 311] = 5
    qos: Literal[0, 1, 2] = 1
    topic_prefix: str = "edge"
    client_id: str | None = None  # None: edge-infer-{device_id}, stable so the session persists
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Path | None = None  # else the EDGE_MQTT_PASSWORD environment variable
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)  # MQTT 5: how long the broker keeps our session
    message_expiry_s: int | None = Field(24 * 3600, ge=1)  # MQTT 5 message expiry on predictions
    inflight_window: int = Field(100, ge=1, le=10000)  # duplicates after a failure are bounded by it
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_names(cls, value: Any) -> Any:
        aliases = {"5": 5, "5.0": 5, "3.1.1": 311, "311": 311, 4: 311, "4": 311}
        return aliases.get(value, value) if isinstance(value, str | int) else value

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not value or any(ch in value for ch in "#+") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a non-empty topic without wildcards or leading/trailing '/'")
        return value


def read_password(config: MqttConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The MQTT password: from `password_file` (EDGE_MQTT_PASSWORD_FILE overrides it), else from
    EDGE_MQTT_PASSWORD. A file other users can read is refused."""
    env = os.environ if environ is None else environ
    file_value = env.get(PASSWORD_FILE_ENV) or config.password_file
    if not file_value:
        return env.get(PASSWORD_ENV) or None
    path = Path(file_value)
    check_secret_file(path, "mqtt.password_file")
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file: '{path}': cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"mqtt.password_file: '{path}': not UTF-8 text") from exc


def check_device_id(device_id: str) -> str:
    """A device id becomes an MQTT topic level: 1-128 of A-Z a-z 0-9 . _ : -, starting alphanumeric."""
    if not _DEVICE_ID.fullmatch(device_id):  # `match` with `$` would let a trailing newline through
        raise ValueError("must be 1-128 of A-Z a-z 0-9 . _ : - (it becomes an MQTT topic level)")
    return device_id


# CONNACK reason codes that mean the credentials were refused (MQTT 5: 134, 135; 3.1.1: 4, 5).
_AUTH_REFUSED = {"Bad user name or password", "Not authorized"}
# MQTT 5 DISCONNECT 142: another connection with our client id took the session over.
_SESSION_TAKEN_OVER = 142
# MQTT 3.1.1 has no takeover reason: this many connections lost within TAKEOVER_WINDOW_S of being made,
# in a row, are taken as another client with our id knocking us off.
TAKEOVER_STREAK = 3
TAKEOVER_WINDOW_S = 3.0


def connect_failure_reason(exc: OSError) -> str:
    """A short, stable label for why a TCP/TLS connection attempt failed (a metric label)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls_certificate"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "network"


def configure_transport(client: paho.Client, cfg: MqttConfig) -> None:
    """TLS and credentials exactly as the config gives them: the daemon and `doctor --config` share this."""
    if cfg.tls is not None:
        tls = cfg.tls
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"mqtt.tls.{name}: {path}: no such file")
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError("mqtt.tls: cert_file and key_file go together (mutual TLS)")
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure)
    password = read_password(cfg)
    if cfg.username is not None or password is not None:
        client.username_pw_set(cfg.username or "", password)


def probe_broker(cfg: MqttConfig, client_id: str, timeout: float = 10.0) -> dict[str, str | bool]:
    """One connection attempt with the config's TLS and credentials, under a client id of its own (the
    running daemon's session must not be taken over): `{"ok", "reason", "detail"}`, where `reason` is
    the label `edge_mqtt_connect_failures_total` would count."""
    protocol = paho.MQTTv5 if cfg.protocol == 5 else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    answered = threading.Event()
    outcome: dict[str, str | bool] = {"ok": False, "reason": "timeout", "detail": "no CONNACK"}

    def on_connect(
        c: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            label = "auth" if str(reason) in _AUTH_REFUSED else "broker_refused"
            outcome.update(reason=label, detail=f"the broker refused the connection: {reason}")
        else:
            outcome.update(ok=True, reason="connected", detail=f"CONNACK: {reason}")
        answered.set()

    client.on_connect = on_connect
    configure_transport(client, cfg)
    try:
        client.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout)))
    except OSError as exc:
        return {"ok": False, "reason": connect_failure_reason(exc), "detail": str(exc) or type(exc).__name__}
    client.loop_start()
    try:
        if not answered.wait(timeout):
            outcome["detail"] = f"no CONNACK within {timeout:g} s"
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome


class _Client(paho.Client):
    """paho's client, telling the publisher before each connection attempt and why one failed (paho's
    network loop swallows the OSError and only retries)."""

    before_connect: Callable[[], None] | None = None
    on_socket_error: Callable[[OSError], None] | None = None

    def reconnect(self) -> MQTTErrorCode:
        if self.before_connect is not None:
            self.before_connect()
        try:
            return super().reconnect()
        except OSError as exc:
            if self.on_socket_error is not None:
                self.on_socket_error(exc)
            raise


class _PackedOnce(Properties):
    """Properties shared by every prediction: paho re-serializes them per publish, we do it once."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = bytes(super().pack())
            object.__setattr__(self, "_packed", packed)
        return packed


class Publisher:
    """Owns the paho client, the outbox drain thread and the command thread."""

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        outbox: Outbox | MemoryOutbox,
        on_command: Mapping[str, CommandHandler] | None = None,
        status: dict[str, Any] | None = None,
        on_request: Callable[[InferRequest], None] | None = None,
        request_max_bytes: int = 4 << 20,
        pool: str | None = None,
        side_outboxes: Sequence[Outbox | MemoryOutbox] = (),
    ) -> None:
        try:
            check_device_id(device_id)
        except ValueError as exc:
            raise ConfigError(f"device_id: {device_id!r}: {exc}") from None
        self.config = config
        self.device_id = device_id
        self.outbox = outbox
        # durable queues of other messages (object events), each with its own seq: drained beside the
        # predictions, with the same acknowledgement rules, so the predictions' seq stays theirs alone
        self.outboxes: list[Outbox | MemoryOutbox] = [outbox, *side_outboxes]
        self.on_command = on_command
        self._status: dict[str, Any] = dict(status or {})
        # retained state (object counts, snapshots, discovery configs): sent now and again on every
        # connect, so a broker that lost its retained store is brought back up to date
        self._retained: dict[str, bytes] = {}
        self._retained_lock = threading.Lock()
        base = f"{config.topic_prefix}/{device_id}"
        self.topic_predictions = f"{base}/predictions"
        self.topic_status = f"{base}/status"
        self.topic_events = f"{base}/events"
        self.topic_commands = command_topic_filter(config.topic_prefix, device_id)
        self.topic_infer = infer_topic(config.topic_prefix, device_id)
        # a worker pool: every member shares one subscription, the broker hands each request to one
        self.topic_pool = pool_topic(config.topic_prefix, pool) if pool else None
        self.pool = pool
        self.on_request = on_request
        self.request_max_bytes = request_max_bytes
        self.client_id = config.client_id or f"edge-infer-{device_id}"
        self.mqtt5 = config.protocol == 5

        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acked_mids: deque[int] = deque()
        # wake the drain thread once a quarter of the window is acknowledged, not on every PUBACK
        self._ack_batch = max(1, config.inflight_window // 4)
        # paho mid -> (outbox index, seq); only the drain thread touches it
        self._inflight: dict[int, tuple[int, int]] = {}
        self._last_sent = [0] * len(self.outboxes)
        self._commands: queue.Queue[Command | None] = queue.Queue(maxsize=100)
        # raw infer messages: parsed (and images decoded) on the request thread, never the network one
        self._requests: queue.Queue[paho.MQTTMessage | None] = queue.Queue(maxsize=256)
        self._threads: list[threading.Thread] = []
        self._counters = {
            "connects": 0,
            "reconnects": 0,
            "disconnects": 0,
            "published": 0,
            "acked": 0,
            "publish_errors": 0,
            "commands": 0,
            "commands_rejected": 0,
            "commands_dropped": 0,
            "requests": 0,
            "requests_rejected": 0,
            "requests_unanswerable": 0,
            "requests_dropped": 0,
            "events": 0,
            "session_takeovers": 0,
        }
        self.connect_failures: collections.Counter[str] = collections.Counter()
        self.last_connect_error: str | None = None  # None while connected or before the first attempt
        self._failure_logged: str | None = None  # the failure last logged: each new one is logged once
        self._failed_attempts = 0  # since the last successful connection
        self._since = time.time()  # when the current connection attempt started (status `since`)
        self._connected_at = 0.0
        self._short_lived = 0  # connections in a row lost within TAKEOVER_WINDOW_S
        self._takeover_logged = False
        self._client = self._make_client()

    # -- setup ----------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self.config
        if self.mqtt5:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=paho.MQTTv5,
                reconnect_on_failure=True,
                manual_ack=True,  # a request is acknowledged once answered: a killed daemon gets it again
            )
        else:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                clean_session=False,
                protocol=paho.MQTTv311,
                reconnect_on_failure=True,
                manual_ack=True,
            )
        # Our drain thread bounds what is in flight; paho's own limit makes every PUBACK scan all queued
        # messages (O(window) per ack), so it is switched off.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(
            min_delay=max(1, round(cfg.reconnect_min_s)), max_delay=round(cfg.reconnect_max_s)
        )
        configure_transport(client, cfg)
        client.before_connect = self._before_connect
        client.on_socket_error = self._on_socket_error
        self._set_will(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.suppress_exceptions = True  # a bug in a callback is logged by paho, the loop keeps running
        self._publish_props: Properties | None = None
        self._json_props: Properties | None = None
        if self.mqtt5:
            props = _PackedOnce(PacketTypes.PUBLISH)
            props.ContentType = CONTENT_TYPE
            props.UserProperty = [("schema", SCHEMA_ID)]
            if cfg.message_expiry_s:
                props.MessageExpiryInterval = cfg.message_expiry_s
            self._publish_props = props
            plain = Properties(PacketTypes.PUBLISH)
            plain.ContentType = CONTENT_TYPE
            self._json_props = plain
        return client

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        body = {
            "state": state,
            "device_id": self.device_id,
            "ts": rfc3339(time.time()),
            "since": rfc3339(self._since),
            **extra,
        }
        if state == "online":
            body.update(self._status)
        return json.dumps(body, separators=(",", ":"), default=str).encode()

    def _set_will(self, client: paho.Client) -> None:
        """The Last Will names the connection it belongs to (`since`), so a subscriber can tell a stale
        `offline` from one that ends the `online` it has (both carry the same `since`)."""
        will_props = None
        if self.mqtt5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.ContentType = CONTENT_TYPE
        client.will_set(
            self.topic_status, self._status_payload("offline", reason="connection lost"), 1, True, will_props
        )

    def _before_connect(self) -> None:
        self._since = time.time()
        self._set_will(self._client)

    def _on_socket_error(self, exc: OSError) -> None:
        self._note_connect_failure(connect_failure_reason(exc), str(exc) or type(exc).__name__)

    def _note_connect_failure(self, reason: str, detail: str) -> None:
        """Count every failed attempt; log a failure once, when it first happens or changes."""
        self.connect_failures[reason] += 1
        self._failed_attempts += 1
        self.last_connect_error = f"{reason}: {detail}"
        if self._failure_logged != self.last_connect_error:
            self._failure_logged = self.last_connect_error
            log.warning(
                "mqtt cannot connect to %s:%s as '%s': %s (retrying every %.0f-%.0f s)",
                self.config.host,
                self.config.port,
                self.client_id,
                self.last_connect_error,
                self.config.reconnect_min_s,
                self.config.reconnect_max_s,
            )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props)
        else:
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self._client.loop_start()
        loops = [(self._drain_loop, "edge-publisher"), (self._command_loop, "edge-commands")]
        if self.on_request is not None:
            loops.append((self._request_loop, "edge-requests"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Wait up to `flush_timeout` (while connected) until the outbox is drained and acknowledged,
        publish `offline`, disconnect. Rows not yet handed to paho count too: the drain thread may not
        have reached the newest ones."""
        deadline = time.monotonic() + flush_timeout
        while (
            self._connected.is_set()
            and time.monotonic() < deadline
            and (self._inflight or self._acked_mids or any(box.depth > 0 for box in self.outboxes))
        ):
            self._wake.set()
            time.sleep(0.02)
        self._stopping.set()
        self._wake.set()
        with contextlib.suppress(queue.Full):
            self._commands.put_nowait(None)
        with contextlib.suppress(queue.Full):
            self._requests.put_nowait(None)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._process_acks()  # the drain thread is gone; settle what was acknowledged meanwhile
        if self._connected.is_set():
            info = self._client.publish(
                self.topic_status,
                self._status_payload("offline", reason="stopped"),
                1,
                True,
                self._json_props,
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # -- public API -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def notify(self) -> None:
        """Tell the drain thread new rows are in the outbox (optional: it also polls)."""
        self._wake.set()

    def set_status(self, status: dict[str, Any]) -> None:
        self._status = dict(status)
        if self._connected.is_set():
            self._client.publish(self.topic_status, self._status_payload("online"), 1, True, self._json_props)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Retained state on an absolute topic; an empty payload clears it (sent once, on connect if not
        connected now)."""
        with self._retained_lock:
            if self._connected.is_set():
                self._client.publish(topic, payload, 1, True)
                if not payload:
                    self._retained.pop(topic, None)
                    return
            self._retained[topic] = payload

    def publish_message(self, topic: str, payload: bytes) -> None:
        """A QoS 1 JSON message on an absolute topic (object events), not retained."""
        self._counters["events"] += 1
        self._client.publish(topic, payload, 1, False, self._json_props)

    def publish_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Best effort (not in the outbox): events describe the device, predictions are the data."""
        body = {"event": name, "device_id": self.device_id, "ts": rfc3339(time.time()), "data": data or {}}
        payload = json.dumps(body, separators=(",", ":"), default=str).encode()
        self._client.publish(self.topic_events, payload, 1, False, self._json_props)
        self._counters["events"] += 1

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            **self._counters,
            "inflight": len(self._inflight),
            "outbox_depth": self.outbox.depth,
            "outbox_dropped": self.outbox.dropped,
            "connect_failures": sum(self.connect_failures.values()),
            "last_connect_error": self.last_connect_error,
        }

    # -- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            label = "auth" if str(reason) in _AUTH_REFUSED else "broker_refused"
            self._note_connect_failure(label, f"the broker refused the connection: {reason}")
            return
        if self._failed_attempts:
            log.info("mqtt connected after %d failed attempt(s)", self._failed_attempts)
        self._failed_attempts = 0
        self._failure_logged = self.last_connect_error = None
        self._connected_at = time.monotonic()
        self._counters["connects"] += 1
        if self._counters["connects"] > 1:
            self._counters["reconnects"] += 1
        log.info(
            "mqtt connected to %s:%s (session present: %s)",
            self.config.host,
            self.config.port,
            flags.session_present,
        )
        client.subscribe(self.topic_commands, qos=1)
        if self.on_request is not None:
            client.subscribe(self.topic_infer, qos=1)
            if self.topic_pool is not None:
                client.subscribe(f"$share/{self.pool}/{self.topic_pool}", qos=1)
        client.publish(self.topic_status, self._status_payload("online"), 1, True, self._json_props)
        with self._retained_lock:
            for topic, payload in self._retained.items():
                client.publish(topic, payload, 1, True)
            # a clearing (empty) message is sent once, not on every connect
            self._retained = {topic: payload for topic, payload in self._retained.items() if payload}
        self._connected.set()
        self._wake.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._connected.is_set():
            self._counters["disconnects"] += 1
            if self._stopping.is_set() or not self._taken_over(reason):
                level = logging.INFO if self._stopping.is_set() else logging.WARNING
                log.log(level, "mqtt disconnected from %s:%s: %s", self.config.host, self.config.port, reason)
        self._connected.clear()

    def _taken_over(self, reason: ReasonCode | int) -> bool:
        """Another client with our client id connecting kicks us off (and we it, every reconnect): say so
        once, naming the id, instead of logging each 'Unspecified error'."""
        value = reason.value if isinstance(reason, ReasonCode) else int(reason)
        lived = time.monotonic() - self._connected_at
        self._short_lived = self._short_lived + 1 if lived < TAKEOVER_WINDOW_S else 0
        if value != _SESSION_TAKEN_OVER and self._short_lived < TAKEOVER_STREAK:
            return False
        self._counters["session_takeovers"] += 1
        if not self._takeover_logged:
            self._takeover_logged = True
            log.error(
                "mqtt: another client with the client id '%s' keeps taking over this session on %s:%s "
                "(two daemons with device_id '%s'?); give each device its own device_id or mqtt.client_id",
                self.client_id,
                self.config.host,
                self.config.port,
                self.device_id,
            )
        return True

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acked_mids.append(mid)
        if len(self._acked_mids) >= self._ack_batch:
            self._wake.set()

    def _ack(self, message: paho.MQTTMessage) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic in (self.topic_infer, self.topic_pool):
            try:
                self._requests.put_nowait(message)  # acknowledged once answered (the request thread)
            except queue.Full:
                self._counters["requests_dropped"] += 1
                response = getattr(message.properties, "ResponseTopic", None) if message.properties else None
                if response:
                    correlation = getattr(message.properties, "CorrelationData", None)
                    busy = RequestRejected(
                        f"{message.topic}: busy: too many queued requests", "payload", None
                    )
                    self._reply(ReplyRoute(response, correlation), busy.body())
                self._ack(message)
            return
        self._ack(
            message
        )  # a command is acknowledged on receipt: replaying one after a crash could repeat it
        try:
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            command = parse_command(
                message.topic,
                bytes(message.payload),
                retained=bool(message.retain),
                response_topic=response_topic,
                correlation_data=correlation,
            )
        except CommandRejected as exc:
            self._counters["commands_rejected"] += 1
            log.warning("mqtt command rejected: %s", exc)
            self._reply(exc.reply, rejection_reply(exc))
            return
        except Exception:  # never let a malformed message kill the network loop
            log.exception("mqtt: cannot handle message on %s", message.topic)
            return
        if command is None:  # a retained command being cleared
            return
        try:
            self._commands.put_nowait(command)
        except queue.Full:
            self._counters["commands_dropped"] += 1
            self._reply(
                command.reply, reply_body(command.name, ok=False, error="busy: too many queued commands")
            )

    def _reply(self, route: ReplyRoute, body: bytes) -> None:
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = CONTENT_TYPE
            if route.correlation_data is not None:
                props.CorrelationData = route.correlation_data
        self._client.publish(route.topic, body, 1, False, props)

    # -- threads --------------------------------------------------------------------------------

    def _command_loop(self) -> None:
        while True:
            command = self._commands.get()
            if command is None or self._stopping.is_set():
                return
            self._counters["commands"] += 1
            handler = self.on_command
            if handler is None:
                body = reply_body(
                    command.name, ok=False, error="commands are not enabled", request_id=command.request_id
                )
            else:
                body = dispatch(command, handler)
            try:
                self._reply(command.reply, body)
            except Exception:
                log.exception("mqtt: cannot send the reply to %s", command.reply.topic)

    def _request_loop(self) -> None:
        while True:
            message = self._requests.get()
            if message is None or self._stopping.is_set():
                return
            self._counters["requests"] += 1
            props = message.properties
            try:
                request = parse_infer_request(
                    message.topic,
                    bytes(message.payload),
                    content_type=getattr(props, "ContentType", None) if props is not None else None,
                    response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
                    correlation_data=getattr(props, "CorrelationData", None) if props is not None else None,
                    max_bytes=self.request_max_bytes,
                )
                if request.sequence is not None and message.topic == self.topic_pool:
                    raise RequestRejected(
                        f"{message.topic}: a sequence's state lives on one device: send sequence_id requests "
                        f"to a member's own {self.topic_infer}, not to the pool",
                        "sequence_id",
                        request.reply,
                        request.correlation_id,
                    )
                request = dataclasses.replace(request, acknowledge=functools.partial(self._ack, message))
                handler = self.on_request
                assert handler is not None
                handler(request)
            except RequestRejected as exc:
                self.reject(exc)
                self._ack(message)
            except Exception:
                log.exception("mqtt: cannot serve the request on %s", message.topic)
                self._ack(message)

    def reject(self, rejected: RequestRejected) -> None:
        """Answer a bad request with `{"error", "field"}`; one without a reply route is only counted."""
        if rejected.reply is None:
            self._counters["requests_unanswerable"] += 1
            log.warning("mqtt request dropped (nowhere to reply): %s", rejected)
            return
        self._counters["requests_rejected"] += 1
        log.info("mqtt request rejected: %s", rejected)
        self._reply(rejected.reply, rejected.body())

    def reply(self, route: ReplyRoute, body: bytes) -> None:
        """Send an answer (a prediction payload) to a request's response topic."""
        self._reply(route, body)

    def _process_acks(self) -> None:
        mids: list[int] = []
        while self._acked_mids:
            mids.append(self._acked_mids.popleft())
        by_outbox: dict[int, list[int]] = collections.defaultdict(list)
        for mid in mids:
            if mid in self._inflight:
                index, seq = self._inflight[mid]
                by_outbox[index].append(seq)
        if by_outbox:
            try:
                for index, seqs in by_outbox.items():
                    self.outboxes[index].ack_many(seqs)
            except Exception:
                self._acked_mids.extendleft(reversed(mids))  # retry later rather than leak window slots
                raise
            self._counters["acked"] += len(by_outbox.get(0, []))  # predictions; events are counted apart
        # only now leave the window, so `inflight == 0` implies the outbox and counters are settled
        for mid in mids:
            self._inflight.pop(mid, None)

    def _drain_loop(self) -> None:
        window = self.config.inflight_window
        default_qos = self.config.qos
        while not self._stopping.is_set():
            try:
                self._process_acks()
                if not self._connected.is_set():
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                sent = 0
                for index, box in enumerate(self.outboxes):
                    room = window - len(self._inflight)
                    rows = (
                        box.pending_messages(min(room, 256), after=self._last_sent[index]) if room > 0 else []
                    )
                    props = self._publish_props if index == 0 else self._json_props
                    for row in rows:
                        qos = default_qos if row.qos is None else row.qos
                        topic = row.topic or self.topic_predictions
                        info = self._client.publish(topic, row.payload, qos, False, props)
                        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                            # not queued by paho: leave it in the outbox and come back to it
                            self._counters["publish_errors"] += 1
                            break
                        self._inflight[info.mid] = (index, row.seq)
                        self._last_sent[index] = row.seq
                        sent += 1
                        if index == 0:
                            self._counters["published"] += 1
                if not sent:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception:  # a full disk or a closed outbox must not end publishing for good
                log.exception("mqtt publisher loop error")
                time.sleep(0.5)
