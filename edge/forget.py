"""`edge-infer forget --config FILE`: remove what this device left retained on its broker.

A device that is uninstalled (systemd/install.sh --uninstall runs this) or renamed would otherwise stay in
Home Assistant for ever: discovery configs, zone counts, snapshots and its `status` are retained messages,
and a broker keeps a retained message until someone publishes an empty one on its topic. This finds them
the way Home Assistant does (subscribe and take what the broker hands back as retained), adds the
discovery topics the daemon recorded as announced (`homeassistant.json` beside the outbox), and publishes
an empty retained payload on each, waiting for every acknowledgement. Stop the daemon first: a running
one announces itself again on its next connection.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import DaemonConfig, load_config
from edge.errors import ConfigError, EdgeError

QUIET_S = 0.5  # retained messages follow the SUBACK at once; this long without one means they are all in


class ForgetError(EdgeError):
    """The broker could not be reached or did not acknowledge the removals."""


def announced_state(config: DaemonConfig) -> Path:
    """Where the daemon keeps the Home Assistant topics it announced (see `edge.detect.homeassistant.announce`)."""
    return config.outbox.path.parent / "homeassistant.json"


def retained_filters(config: DaemonConfig) -> list[str]:
    from edge.detect.homeassistant import discovery_filter

    return [
        f"{config.mqtt.topic_prefix}/{config.device_id}/#",
        discovery_filter(config.homeassistant.prefix, config.device_id),
    ]


def _recorded_topics(state: Path) -> list[str]:
    try:
        loaded = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{state}: unreadable ({exc}); delete it if the device's entities are gone"
        ) from exc
    topics = loaded.get("topics", []) if isinstance(loaded, dict) else []
    return [str(t) for t in topics]


@dataclass
class Forgotten:
    topics: list[str] = field(default_factory=list)
    discovery: int = 0


def forget(config: DaemonConfig, timeout: float = 10.0) -> Forgotten:
    """Empty retained payloads on every retained topic of this device; returns what was removed."""
    from edge.publish.mqtt import configure_transport

    cfg = config.mqtt
    protocol = paho.MQTTv5 if cfg.protocol == 5 else paho.MQTTv311
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{config.device_id}-forget", protocol=protocol
    )
    configure_transport(client, cfg)
    connected = threading.Event()
    subscribed = threading.Event()
    refused: list[str] = []
    found: set[str] = set()
    last_message = [time.monotonic()]
    lock = threading.Lock()
    filters = retained_filters(config)

    def on_connect(
        c: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        else:
            c.subscribe([(f, 1) for f in filters])
        connected.set()

    def on_subscribe(c: paho.Client, userdata: object, mid: int, reasons: object, props: object) -> None:
        last_message[0] = time.monotonic()
        subscribed.set()

    def on_message(c: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.retain and message.payload:  # live traffic and already-empty topics are not ours to clear
            with lock:
                found.add(message.topic)
                last_message[0] = time.monotonic()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    where = f"mqtt {cfg.host}:{cfg.port}"
    try:
        client.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout)))
    except OSError as exc:
        raise ForgetError(f"{where}: cannot connect: {exc or type(exc).__name__}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise ForgetError(f"{where}: no CONNACK within {timeout:g} s")
        if refused:
            raise ForgetError(f"{where}: the broker refused the connection: {refused[0]}")
        if not subscribed.wait(timeout):
            raise ForgetError(f"{where}: no SUBACK for {', '.join(filters)} within {timeout:g} s")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - last_message[0] < QUIET_S:
            time.sleep(0.05)
        client.unsubscribe(filters)  # our own empty publishes must not come back as work
        state = announced_state(config)
        with lock:
            topics = sorted(found | set(_recorded_topics(state)))
        pending = [client.publish(topic, b"", qos=1, retain=True) for topic in topics]
        for topic, info in zip(topics, pending, strict=True):
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise ForgetError(f"{where}: no PUBACK for the removal of '{topic}' within {timeout:g} s")
        state.unlink(missing_ok=True)
    finally:
        client.disconnect()
        client.loop_stop()
    ha_prefix = config.homeassistant.prefix + "/"
    return Forgotten(topics, sum(1 for t in topics if t.startswith(ha_prefix)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the daemon's config file")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    done = forget(config, timeout=args.timeout)
    print(
        f"removed {len(done.topics)} retained topics of device '{config.device_id}' "
        f"({done.discovery} Home Assistant entities)"
    )
    return 0
