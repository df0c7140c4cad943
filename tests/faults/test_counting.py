"""The counter itself must be right before any scenario can be judged by it."""

import json

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.faults.counting import CountingSubscriber, ScenarioResult, SeqCount, markdown_table


def test_seq_count_finds_missing_duplicates_and_reordering():
    count = SeqCount()
    for seq in [1, 2, 4, 4, 3, 6]:
        count.add(seq, "boot-a")
    count.add(7, "boot-b")
    assert count.missing() == [5]
    assert count.duplicates == 1
    assert count.out_of_order == 1  # 3 arrived after 4
    assert count.missing(1, 9) == [5, 8, 9]
    assert count.boot_ids == ["boot-a", "boot-b"]


def test_counting_subscriber_against_a_real_broker(mosquitto):
    counter = CountingSubscriber(mosquitto.port).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        import time

        from tests.sink_helpers import prediction

        for seq in [1, 2, 3, 5, 5]:
            payload = prediction("cam-01", "b1", seq)
            pub.publish("edge/cam-01/predictions", json.dumps(payload), qos=1).wait_for_publish(5)
        pub.publish("edge/cam-01/predictions", b"not json", qos=1).wait_for_publish(5)
        no_seq = {k: v for k, v in prediction("cam-01", "b1", 6).items() if k != "seq"}
        pub.publish("edge/cam-01/predictions", json.dumps(no_seq), qos=1).wait_for_publish(5)
        assert not counter.wait_for("cam-01", 5, timeout=1.0)  # 4 never came
        snap = counter.snapshot("cam-01")
        assert snap.received == 5 and snap.duplicates == 1 and snap.missing() == [4]
        deadline = time.monotonic() + 5
        while len(counter.invalid) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert counter.invalid == [
            "edge/cam-01/predictions: payload is not JSON: Expecting value: line 1 column 1 (char 0)",
            "edge/cam-01/predictions: seq: missing (not in payload)",
        ]
    finally:
        pub.loop_stop()
        counter.stop()


def test_markdown_table_has_one_row_per_scenario():
    table = markdown_table([ScenarioResult("broker SIGTERM", 100, 100, 0, 2, 0, 5.3)])
    lines = table.strip().splitlines()
    assert len(lines) == 3
    assert lines[2] == "| broker SIGTERM | 100 | 100 | 0 | 2 | 0 | 5.3 s |  |"
