import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def test_private_broker_roundtrip_and_restart(mosquitto):
    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c, _u, msg):
        got.append(msg.payload)
        done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("t/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish("t/x", b"hello", qos=1).wait_for_publish(5)
    assert done.wait(5)
    assert got == [b"hello"]
    pub.loop_stop()
    sub.loop_stop()
    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.port == port and mosquitto.running
