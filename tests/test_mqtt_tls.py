"""MQTT security against a real mosquitto: TLS with CA pinning, mutual TLS, and the per-device ACL from
systemd/mosquitto-acl.example (publish only under edge/<device>/, subscribe only to edge/<device>/cmd/).

Certificates are generated here with `cryptography`; brokers come from tests/broker.py with a second,
TLS-only listener added through `extra_config`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[1]
ACL_EXAMPLE = REPO / "systemd" / "mosquitto-acl.example"
TIMEOUT = 10.0

# --- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


class CertificateAuthority:
    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / f"{name}.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{common_name}.crt", self.directory / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(base / "ca", "edge-test-ca")
    rogue = CertificateAuthority(base / "rogue", "rogue-ca")
    return {
        "ca": ca,
        "rogue": rogue,
        "server": ca.issue("broker", server=True),
        "cam-01": ca.issue("cam-01", server=False),
        "controller": ca.issue("controller", server=False),
        "spy": ca.issue("spy", server=False),
        "rogue-cam-01": rogue.issue("cam-01", server=False),
    }


# --- clients -----------------------------------------------------------------------------------------------


class Client:
    """A paho v2 client that records CONNACK, SUBACK reason codes and received messages."""

    def __init__(self, client_id: str, protocol: int = paho.MQTTv5):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.connack: object | None = None
        self.refused = ""
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.subacks: dict[int, list[object]] = {}
        self.suback_event = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        else:
            self.gone.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self.gone.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.subacks[mid] = list(reasons)
        self.suback_event.set()

    def _on_message(self, client, userdata, message) -> None:
        with self.arrived:
            self.messages.append((message.topic, message.payload))
            self.arrived.notify_all()

    def tls(self, ca: Path, issued: Issued | None = None) -> Client:
        self.client.tls_set(
            ca_certs=str(ca),
            certfile=str(issued.cert) if issued else None,
            keyfile=str(issued.key) if issued else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        return self

    def login(self, username: str, password: str) -> Client:
        self.client.username_pw_set(username, password)
        return self

    def try_connect(self, port: int) -> bool:
        """True once the broker accepted us; False if the TLS handshake or CONNECT was refused."""
        try:
            self.client.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.refused = repr(exc)
            return False
        self.client.loop_start()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return True
            if self.gone.is_set():
                return False
            time.sleep(0.02)
        return False

    def subscribe(self, topic: str) -> list[object]:
        self.suback_event.clear()
        _, mid = self.client.subscribe(topic, qos=1)
        assert self.suback_event.wait(TIMEOUT), f"no SUBACK for {topic}"
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Block until `payload` arrives; return everything received up to then."""
        with self.arrived:
            ok = self.arrived.wait_for(lambda: any(p == payload for _, p in self.messages), TIMEOUT)
            assert ok, f"{payload!r} never arrived; got {self.messages}"
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(client_id: str, protocol: int = paho.MQTTv5) -> Client:
        made.append(Client(client_id, protocol))
        return made[-1]

    yield make
    for client in made:
        client.close()


def tls_listener(pki: dict[str, object], port: int, require_certificate: bool) -> str:
    server = pki["server"]
    ca = pki["ca"]
    assert isinstance(server, Issued) and isinstance(ca, CertificateAuthority)
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {ca.cert_path}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        "tls_version tlsv1.2",
    ]
    if require_certificate:
        lines += ["require_certificate true", "use_identity_as_username true"]
    return "\n".join(lines)


def start_broker(workdir: Path, extra_config: str, tls_port: int | None = None) -> Mosquitto:
    broker = Mosquitto(workdir, extra_config=extra_config).start()
    # start() waits for the plain listener only; the TLS one may open a moment later.
    deadline = time.monotonic() + TIMEOUT
    while tls_port is not None:
        try:
            socket.create_connection(("127.0.0.1", tls_port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                broker.stop()
                raise RuntimeError(f"mosquitto TLS listener on {tls_port} did not open") from None
            time.sleep(0.05)
    return broker


@pytest.fixture
def broker_factory(tmp_path: Path):
    started: list[Mosquitto] = []

    def make(extra_config: str, tls_port: int | None = None) -> Mosquitto:
        started.append(start_broker(tmp_path / f"broker{len(started)}", extra_config, tls_port))
        return started[-1]

    yield make
    for broker in started:
        broker.stop()


def unique() -> bytes:
    return uuid.uuid4().hex.encode()


# --- mutual TLS --------------------------------------------------------------------------------------------


@pytest.fixture
def mtls_broker(pki, broker_factory) -> tuple[Mosquitto, int]:
    port = free_port()
    broker = broker_factory(tls_listener(pki, port, require_certificate=True), port)
    return broker, port


def test_client_with_the_right_certificate_connects_and_publishes(pki, mtls_broker, clients):
    _, port = mtls_broker
    ca = pki["ca"]
    subscriber = clients("controller").tls(ca.cert_path, pki["controller"])
    assert subscriber.try_connect(port), (subscriber.refused, subscriber.connack)
    assert subscriber.subscribe("edge/cam-01/#")[0].value < 0x80
    device = clients("cam-01").tls(ca.cert_path, pki["cam-01"])
    assert device.try_connect(port)
    marker = unique()
    device.publish("edge/cam-01/predictions", marker)
    assert ("edge/cam-01/predictions", marker) in subscriber.wait_for(marker)


def test_client_without_a_certificate_is_rejected(pki, mtls_broker, clients):
    _, port = mtls_broker
    assert not clients("anonymous").tls(pki["ca"].cert_path).try_connect(port)


def test_client_with_a_certificate_from_another_ca_is_rejected(pki, mtls_broker, clients):
    _, port = mtls_broker
    # Same common name as the real device, signed by a CA the broker does not trust.
    assert not clients("cam-01").tls(pki["ca"].cert_path, pki["rogue-cam-01"]).try_connect(port)


def test_client_pinning_another_ca_refuses_the_broker(pki, mtls_broker, clients):
    _, port = mtls_broker
    # CA pinning: a device that trusts only its own CA will not talk to a broker it cannot verify.
    assert not clients("cam-01").tls(pki["rogue"].cert_path, pki["cam-01"]).try_connect(port)


def test_plain_tcp_client_cannot_speak_to_the_tls_listener(mtls_broker, clients):
    _, port = mtls_broker
    assert not clients("plain").try_connect(port)


# --- the ACL -----------------------------------------------------------------------------------------------


def acl_rules() -> str:
    """The example ACL shipped for operators, used verbatim, plus a test-only auditor that sees all."""
    text = ACL_EXAMPLE.read_text()
    assert "pattern write edge/%u/#" in text and "pattern read edge/%u/cmd/#" in text
    return (
        text
        + "\n# test only: sees every topic, so a leak cannot hide behind the controller's ACL\nuser spy\ntopic readwrite #\n"
    )


def check_acl(device: Client, controller: Client, spy: Client) -> None:
    """The device publishes only under its prefix and reads only its own commands."""
    assert controller.subscribe("edge/#")[0].value < 0x80
    assert spy.subscribe("#")[0].value < 0x80
    probe = unique()
    spy.publish("elsewhere/probe", probe)  # the spy really does see topics outside edge/
    spy.wait_for(probe)

    # Allowed: its own predictions reach the controller.
    allowed = unique()
    device.publish("edge/cam-01/predictions", allowed)
    controller.wait_for(allowed)

    # Not allowed: another device's prefix and topics outside `edge/`. Messages from one client arrive in
    # order, so once the marker published after them is in, they would have been too.
    forbidden = {
        "edge/cam-02/predictions": unique(),
        "edge/cam-02/cmd/reload": unique(),
        "elsewhere/cam-01/predictions": unique(),
        "cam-01/predictions": unique(),
    }
    for topic, payload in forbidden.items():
        device.publish(topic, payload)
    marker = unique()
    device.publish("edge/cam-01/events", marker)
    seen = [payload for _, payload in spy.wait_for(marker)]
    for topic, payload in forbidden.items():
        assert payload not in seen, f"device published to {topic}"

    # Reading: mosquitto's ACL file is enforced per delivered message (a SUBSCRIBE to a foreign filter may
    # be granted, yet nothing it does not allow is ever delivered). The device subscribes as widely as it
    # can; only its own commands reach it.
    assert device.subscribe("edge/cam-01/cmd/#")[0].value < 0x80
    for topic in ("edge/cam-02/cmd/#", "edge/+/cmd/#", "edge/#", "#"):
        device.subscribe(topic)
    foreign = [unique(), unique(), unique()]
    controller.publish("edge/cam-02/cmd/reload", foreign[0])
    controller.publish("edge/cam-02/predictions", foreign[1])
    controller.publish("edge/cam-01/predictions", foreign[2])  # even its own data is write-only
    own_cmd = unique()
    controller.publish("edge/cam-01/cmd/reload", own_cmd)
    got = device.wait_for(own_cmd)
    assert ("edge/cam-01/cmd/reload", own_cmd) in got
    assert all(payload not in foreign for _, payload in got)
    assert all(topic.startswith("edge/cam-01/cmd/") for topic, _ in got), got


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_acl_with_password_file_confines_the_device(tmp_path, broker_factory, clients):
    passwords = tmp_path / "passwords"
    for user, secret in (
        ("cam-01", "cam-secret"),
        ("controller", "controller-secret"),
        ("spy", "spy-secret"),
    ):
        args = [
            "mosquitto_passwd",
            "-b",
            *(["-c"] if not passwords.exists() else []),
            str(passwords),
            user,
            secret,
        ]
        subprocess.run(args, check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(acl_rules())
    broker = broker_factory(f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}")

    assert not clients("nobody").try_connect(broker.port)
    assert not clients("cam-01-bad").login("cam-01", "wrong").try_connect(broker.port)
    device = clients("cam-01").login("cam-01", "cam-secret")
    controller = clients("controller").login("controller", "controller-secret")
    spy = clients("spy").login("spy", "spy-secret")
    assert device.try_connect(broker.port) and controller.try_connect(broker.port)
    assert spy.try_connect(broker.port)
    check_acl(device, controller, spy)


def test_acl_with_client_certificates_confines_the_device(pki, tmp_path, broker_factory, clients):
    acl = tmp_path / "acl"
    acl.write_text(acl_rules())
    port = free_port()
    broker_factory(tls_listener(pki, port, require_certificate=True) + f"\nacl_file {acl}", port)
    ca = pki["ca"].cert_path
    device = clients("cam-01").tls(ca, pki["cam-01"])
    controller = clients("controller").tls(ca, pki["controller"])
    spy = clients("spy").tls(ca, pki["spy"])
    assert device.try_connect(port) and controller.try_connect(port) and spy.try_connect(port)
    check_acl(device, controller, spy)


# --- the runtime's own publisher over mutual TLS -----------------------------------------------------------


def test_publisher_drains_the_outbox_over_mutual_tls(pki, mtls_broker, clients, tmp_path):
    mqtt = pytest.importorskip("edge.publish.mqtt")
    from edge.publish.outbox import Outbox

    _, port = mtls_broker
    ca = pki["ca"]
    subscriber = clients("controller").tls(ca.cert_path, pki["controller"])
    assert subscriber.try_connect(port)
    subscriber.subscribe("edge/cam-01/predictions")

    config = mqtt.MqttConfig(
        host="127.0.0.1",
        port=port,
        tls=mqtt.TlsConfig(ca_file=ca.cert_path, cert_file=pki["cam-01"].cert, key_file=pki["cam-01"].key),
    )
    outbox = Outbox(tmp_path / "outbox.db")
    marker = unique().decode()
    outbox.add({"schema": "edge.prediction/1", "device_id": "cam-01", "marker": marker})
    publisher = mqtt.Publisher(config, "cam-01", outbox)
    publisher.start()
    try:
        assert publisher.wait_connected(TIMEOUT), "publisher did not connect over mutual TLS"
        with subscriber.arrived:
            assert subscriber.arrived.wait_for(
                lambda: any(marker.encode() in payload for _, payload in subscriber.messages), TIMEOUT
            )
        received = [json.loads(p) for _, p in subscriber.messages if marker.encode() in p]
        assert received[0]["marker"] == marker and received[0]["seq"] == 1
        deadline = time.monotonic() + TIMEOUT
        while outbox.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outbox.depth == 0, "acknowledged message still in the outbox"
    finally:
        publisher.stop(flush_timeout=2.0)
        outbox.close()


def test_publisher_without_client_certificate_never_connects(pki, mtls_broker, tmp_path):
    mqtt = pytest.importorskip("edge.publish.mqtt")
    from edge.publish.outbox import Outbox

    _, port = mtls_broker
    config = mqtt.MqttConfig(host="127.0.0.1", port=port, tls=mqtt.TlsConfig(ca_file=pki["ca"].cert_path))
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.add({"schema": "edge.prediction/1", "device_id": "cam-01"})
    publisher = mqtt.Publisher(config, "cam-01", outbox)
    publisher.start()
    try:
        assert not publisher.wait_connected(3.0)
        assert outbox.depth == 1  # nothing is lost while the broker refuses us
    finally:
        publisher.stop(flush_timeout=0.5)
        outbox.close()


def test_publisher_pinning_the_wrong_ca_logs_why_once(pki, mtls_broker, tmp_path, caplog):
    import logging

    from edge.publish.mqtt import MqttConfig, Publisher, TlsConfig
    from edge.publish.outbox import Outbox

    caplog.set_level(logging.INFO, logger="edge.publish.mqtt")
    _, port = mtls_broker
    config = MqttConfig(
        host="127.0.0.1",
        port=port,
        reconnect_min_s=1,
        reconnect_max_s=1,
        tls=TlsConfig(ca_file=pki["rogue"].cert_path),
    )
    publisher = Publisher(config, "cam-01", Outbox(tmp_path / "outbox.db"))
    publisher.start()
    try:
        deadline = time.monotonic() + 15
        while publisher.connect_failures["tls_certificate"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert publisher.connect_failures["tls_certificate"] >= 2
        logged = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
        assert (
            len(logged) == 1 and "tls_certificate" in logged[0] and "certificate verify failed" in logged[0]
        ), logged
    finally:
        publisher.stop(flush_timeout=0.2)
        publisher.outbox.close()
    # `doctor --config` makes the same attempt and names the same reason.
    from edge.publish.mqtt import probe_broker

    probed = probe_broker(config, "doctor-probe", timeout=5)
    assert probed["ok"] is False and probed["reason"] == "tls_certificate", probed
    assert "certificate verify failed" in str(probed["detail"])


def test_edge_sink_stores_over_mutual_tls(pki, mtls_broker, clients, tmp_path):
    import sqlite3

    import yaml

    from edge.sink.config import load_sink_config
    from edge.sink.service import Sink
    from tests.sink_helpers import new_boot, prediction

    _, port = mtls_broker
    ca = pki["ca"]
    config = tmp_path / "sink.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": port,
                    "client_id": "sink-tls",
                    "tls": {
                        "ca_file": str(ca.cert_path),
                        "cert_file": str(pki["controller"].cert),
                        "key_file": str(pki["controller"].key),
                    },
                },
                "database": {"url": f"sqlite://{tmp_path}/p.db"},
                "batch": {"max_delay_ms": 5},
            }
        )
    )
    sink = Sink(load_sink_config(config))
    sink.start()
    try:
        assert sink.wait_subscribed(TIMEOUT), "the sink did not subscribe over mutual TLS"
        device = clients("cam-01").tls(ca.cert_path, pki["cam-01"])
        assert device.try_connect(port)
        device.publish("edge/cam-01/predictions", json.dumps(prediction("cam-01", new_boot(), 1)).encode())
        deadline = time.monotonic() + TIMEOUT
        while sink.stored < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sink.stop()
    with sqlite3.connect(tmp_path / "p.db") as db:
        assert db.execute("SELECT device_id, seq FROM predictions").fetchall() == [("cam-01", 1)]
