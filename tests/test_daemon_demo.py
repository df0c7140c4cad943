"""`edge-infer demo` end to end: its own broker, the daemon, a subscriber printing predictions.

The broker is the installed mosquitto, or amqtt running inside the demo's process when mosquitto is missing
(`--broker embedded` forces that path, so it is tested on machines that do have mosquitto).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge.errors import ConfigError
from tests.daemon_helpers import Subscriber, make_tiny_package

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^seq (\d+) frame (\d+) (red|green|blue|gray) [01]\.\d\d \(\d+\.\d ms, CPUExecutionProvider\)$"
)
ANY_LINE = re.compile(r"^seq (\d+) frame (\d+) (.+) ([01]\.\d\d) \(\d+\.\d ms, \w+\)$")
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
needs_amqtt = pytest.mark.skipif(
    importlib.util.find_spec("amqtt") is None, reason="needs amqtt (pip install 'edge-runtime[broker]')"
)


def env_without_mosquitto(cache_dir: Path) -> dict[str, str]:
    """The test's environment with every PATH entry that holds a mosquitto binary taken out."""
    kept = [
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "mosquitto").exists()
    ]
    return {**os.environ, "EDGE_CACHE": str(cache_dir), "PATH": os.pathsep.join(kept)}


def run_demo(
    arguments: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def test_demo_prints_predictions_as_a_subscriber_receives_them(tmp_path: Path, cache_dir: Path) -> None:
    package = make_tiny_package(tmp_path / "pkg")
    done = run_demo(
        ["--package", str(package), "--count", "8", "--fps", "20"],
        {**os.environ, "EDGE_CACHE": str(cache_dir)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("seq ")]
    # `--count 8` means eight printed, not eight and whatever arrived while the daemon stopped.
    assert len(lines) == 8, done.stdout
    assert "demo: 8 prediction(s) received" in done.stdout
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    seqs = [int(m.group(1)) for m in parsed if m]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert "demo: serving tiny-colour 1.0.0 on onnxruntime/CPUExecutionProvider" in done.stdout


@needs_amqtt
def test_demo_through_the_embedded_broker_without_mosquitto(tmp_path: Path, cache_dir: Path) -> None:
    package = make_tiny_package(tmp_path / "pkg")
    done = run_demo(
        ["--package", str(package), "--count", "8", "--fps", "20", "--broker", "embedded"],
        env_without_mosquitto(cache_dir),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo: broker amqtt on 127.0.0.1:" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("seq ")]
    assert len(lines) >= 8, done.stdout
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    seqs = [int(m.group(1)) for m in parsed if m]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # through amqtt too, none lost or repeated
    assert "ERROR" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@needs_amqtt
def test_auto_falls_back_to_amqtt_and_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import paho.mqtt.client as mqtt

    from edge import demo

    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    with demo.local_broker(tmp_path, "auto") as broker:
        assert (broker.name, broker.protocol) == ("amqtt", 311)
        subscriber = Subscriber(broker.port, "edge/t/predictions")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv311)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        try:
            publisher.publish("edge/t/predictions", b'{"seq": 1}', qos=1).wait_for_publish(10)
            assert subscriber.wait_for(lambda found: found == [{"seq": 1}], 10), subscriber.messages
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            subscriber.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", broker.port), timeout=1):
        pass  # the embedded broker stopped listening with the demo


def test_broker_choice_errors_name_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge import demo

    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    with (
        pytest.raises(ConfigError, match="--broker mosquitto: mosquitto is not installed"),
        demo.local_broker(tmp_path, "mosquitto"),
    ):
        pass
    monkeypatch.setattr(demo, "has_amqtt", lambda: False)
    with (
        pytest.raises(ConfigError, match="no MQTT broker found: install mosquitto"),
        demo.local_broker(tmp_path, "auto"),
    ):
        pass


@pytest.mark.slow
@needs_amqtt
def test_demo_through_amqtt_classifies_the_cat_frames_as_cats(cache_dir: Path) -> None:
    """The README's demo with the real EfficientNet-Lite0 int8 and no mosquitto (slow: converts it once)."""
    from edge.package import load_package
    from tests.assets_media import labelled_clip
    from tests.assets_models import efficientnet_package

    package = efficientnet_package(cache_dir)
    labels = load_package(package).labels()
    cat_names = {labels[i] for i in CAT_CLASSES} if labels else {str(i) for i in CAT_CLASSES}
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0)
    done = run_demo(
        ["--package", str(package), "--clip", str(clip.path), "--fps", "10", "--broker", "embedded"],
        env_without_mosquitto(cache_dir),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo: broker amqtt on" in done.stdout
    top1 = {}
    for line in done.stdout.splitlines():
        match = ANY_LINE.match(line)
        if match:
            top1[int(match.group(2))] = match.group(3)
    cats = [frame for frame in top1 if clip.is_cat(frame)]
    others = [frame for frame in top1 if not clip.is_cat(frame)]
    # played in real time: on a busy machine frames arrive while the model is busy and are skipped
    assert len(cats) >= 5 and len(others) >= 5, done.stdout
    assert sum(top1[f] in cat_names for f in cats) >= 0.9 * len(cats), {f: top1[f] for f in cats}
    assert sum(top1[f] in cat_names for f in others) <= 0.1 * len(others), {f: top1[f] for f in others}
