"""Home Assistant discovery: every key is one HA documents for its component, the templates render the
daemon's real status JSON (a real Publisher on a real broker) the way HA's Jinja does, and the configs
are retained on the broker until the removal messages clear them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2
import paho.mqtt.client as mqtt
import pytest

from edge.detect import HomeAssistantConfig
from edge.detect.homeassistant import (
    DeviceInfo,
    SourceEntities,
    discovery_filter,
    discovery_messages,
    entities,
    removal_messages,
    stale_removals,
)
from edge.publish.mqtt import MqttConfig, Publisher
from edge.publish.outbox import MemoryOutbox
from tests.broker import Mosquitto

# Keys from Home Assistant's MQTT docs: https://www.home-assistant.io/integrations/sensor.mqtt/,
# /binary_sensor.mqtt/, /camera.mqtt/ and the discovery page (/integrations/mqtt/#mqtt-discovery).
COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic", "default_entity_id",
    "device", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "origin", "payload_available",
    "payload_not_available", "qos", "unique_id",
}  # fmt: skip
DOCUMENTED = {
    "sensor": COMMON | {
        "state_topic", "value_template", "unit_of_measurement", "device_class", "state_class", "expire_after",
        "force_update", "last_reset_value_template", "suggested_display_precision", "options",
    },
    "binary_sensor": COMMON | {
        "state_topic", "value_template", "payload_on", "payload_off", "device_class", "expire_after",
        "force_update", "off_delay",
    },
    "camera": COMMON | {"topic", "image_encoding"},
}  # fmt: skip
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "camera": {"topic"}}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}

DEVICE = DeviceInfo("edge", "cam-01", "yolo-tiny", "0.9.0")
SOURCES = [SourceEntities("driveway", ["gate"]), SourceEntities("yard")]
LABELS = ["person", "car"]


def _render(template: str, payload: bytes) -> str:
    """As HA renders an MQTT value template: `value` is the payload text, `value_json` its JSON."""
    env = jinja2.Environment(undefined=jinja2.Undefined)
    text = payload.decode()
    try:
        value_json = json.loads(text)
    except ValueError:
        value_json = None
    return env.from_string(template).render(value=text, value_json=value_json)


def test_every_key_is_documented_and_unique_ids_are_stable() -> None:
    config = HomeAssistantConfig(enabled=True)
    found = entities(config, DEVICE, SOURCES, LABELS)
    # 2 stats sensors; per source/zone/label a count and an occupancy; per source/label a camera
    assert len(found) == 2 + 2 * (2 + 1) * 2 + 2 * 2
    for entity in found:
        body = entity.config
        assert set(body) <= DOCUMENTED[entity.component], entity.unique_id
        assert REQUIRED[entity.component] <= set(body)
        assert set(body["device"]) <= DEVICE_KEYS and body["device"]["identifiers"] == ["edge_cam-01"]
        assert set(body["origin"]) <= ORIGIN_KEYS and "name" in body["origin"]
        for item in body["availability"]:
            assert set(item) <= AVAILABILITY_KEYS and item["topic"] == "edge/cam-01/status"
    ids = [e.unique_id for e in found]
    assert len(set(ids)) == len(ids)
    again = entities(config, DEVICE, SOURCES, LABELS)
    assert [e.unique_id for e in again] == ids  # built from names: the same after a restart
    topics = {m.topic for m in discovery_messages(config, DEVICE, SOURCES, LABELS)}
    assert (
        "homeassistant/binary_sensor/edge_cam-01/edge_cam-01_driveway_gate_person_occupancy/config" in topics
    )
    assert "homeassistant/camera/edge_cam-01/edge_cam-01_yard_car_snapshot/config" in topics
    cameras = [e.config["topic"] for e in found if e.component == "camera"]
    assert "edge/cam-01/driveway/person/snapshot" in cameras
    only_people = entities(HomeAssistantConfig(enabled=True, labels=["person"]), DEVICE, SOURCES, LABELS)
    assert all("car" not in e.unique_id for e in only_people)


def test_occupancy_and_count_templates_render_the_count_payload() -> None:
    (occupancy,) = [
        e for e in entities(HomeAssistantConfig(), DEVICE, SOURCES, LABELS)
        if e.unique_id == "edge_cam-01_driveway_gate_person_occupancy"
    ]  # fmt: skip
    template = occupancy.config["value_template"]
    assert isinstance(template, str)
    assert _render(template, b"2") == "ON" and _render(template, b"0") == "OFF"


def test_availability_and_stats_follow_the_daemons_real_status(mosquitto: Mosquitto, tmp_path: Path) -> None:
    publisher = Publisher(MqttConfig(port=mosquitto.port), "cam-01", MemoryOutbox())
    publisher.start()
    assert publisher.wait_connected(10)
    sensors = {e.unique_id: e.config for e in entities(HomeAssistantConfig(), DEVICE, SOURCES, LABELS)}
    availability = sensors["edge_cam-01_fps"]["availability"][0]
    try:
        publisher.set_status({"stats": {"fps": 4.8, "inference_ms": 12.5}})
        time.sleep(0.3)
        status = _retained(mosquitto.port, "edge/cam-01/status")
        assert _render(availability["value_template"], status) == availability["payload_available"]
        assert float(_render(sensors["edge_cam-01_fps"]["value_template"], status)) == 4.8
        assert float(_render(sensors["edge_cam-01_inference_ms"]["value_template"], status)) == 12.5
    finally:
        publisher.stop()
    status = _retained(mosquitto.port, "edge/cam-01/status")
    assert _render(availability["value_template"], status) == availability["payload_not_available"]
    assert _render(sensors["edge_cam-01_fps"]["value_template"], status) == "None"  # HA: unknown


def _retained(port: int, topic: str, wait: float = 0.4) -> bytes:
    found = _retained_all(port, topic, wait)
    assert len(found) == 1, found
    return next(iter(found.values()))


def _retained_all(port: int, topic: str, wait: float = 0.4) -> dict[str, bytes]:
    """What a new subscriber gets at once: the retained messages under `topic`."""
    got: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: got.__setitem__(m.topic, bytes(m.payload)) if m.retain else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(wait)
    client.loop_stop()
    client.disconnect()
    return got


def _publish_all(port: int, messages) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for m in messages:
        client.publish(m.topic, m.payload, 1, m.retained).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def test_configs_stay_retained_until_removed_and_a_config_change_removes_the_stale(
    mosquitto: Mosquitto,
) -> None:
    config = HomeAssistantConfig(enabled=True)
    first = discovery_messages(config, DEVICE, SOURCES, LABELS)
    _publish_all(mosquitto.port, first)
    retained = _retained_all(mosquitto.port, "homeassistant/#")
    assert set(retained) == {m.topic for m in first}
    assert all(json.loads(p)["unique_id"] for p in retained.values())

    # the yard source goes away: its entities are removed, the others stay; what was announced before is
    # read back from the broker through the device's discovery filter (no state file needed)
    other_device = discovery_messages(config, DeviceInfo("edge", "cam-02"), SOURCES, LABELS)[:1]
    _publish_all(mosquitto.port, other_device)
    announced = _retained_all(mosquitto.port, discovery_filter(config.prefix, DEVICE.device_id))
    assert set(announced) == set(retained)  # not cam-02's
    second = discovery_messages(config, DEVICE, SOURCES[:1], LABELS)
    stale = stale_removals(announced, second)
    assert stale and all(m.payload == b"" and m.retained and "_yard_" in m.topic for m in stale)
    _publish_all(mosquitto.port, [*second, *stale])
    assert set(_retained_all(mosquitto.port, "homeassistant/#")) == {m.topic for m in second + other_device}

    _publish_all(mosquitto.port, removal_messages(m.topic for m in second))  # --uninstall
    assert set(_retained_all(mosquitto.port, "homeassistant/#")) == {m.topic for m in other_device}


def test_prefix_is_checked() -> None:
    with pytest.raises(ValueError, match="wildcards"):
        HomeAssistantConfig(prefix="home/#")


def test_status_stats_give_fps_and_median_latency_over_the_window() -> None:
    from edge.detect.homeassistant import StatusStats

    meter = StatusStats(window_s=2.0)
    assert meter.stats() == {"fps": 0.0, "inference_ms": None}
    for i in range(21):  # 10 per second for 2 s
        meter.observe(100.0 + i * 0.1, 5.0 if i % 2 else 7.0)
    assert meter.stats() == {"fps": 10.0, "inference_ms": 7.0}
    assert meter.stats(now=110.0) == {"fps": 0.0, "inference_ms": None}  # nothing for longer than the window
