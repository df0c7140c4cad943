from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import DaemonConfig, load_config
from edge.errors import ConfigError
from edge.publish.mqtt import read_password
from tests.daemon_helpers import make_tiny_package

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
device_id: cam-01
profile: auto
model: models/current          # relative to this file
source: {type: video, uri: clip.avi, fps: 5, loop: false}
mqtt: {host: 127.0.0.1, port: 1883, protocol: 5, qos: 1, topic_prefix: edge}
outbox: {path: state/outbox.db, max_bytes: 1048576}
metrics: {port: 9464}
"""


def _write(tmp_path: Path, text: str, name: str = "edge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_design_example_loads_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert config.device_id == "cam-01"
    assert config.model == tmp_path / "models" / "current"
    assert config.models_dir == tmp_path / "models"
    assert config.outbox.path == tmp_path / "state" / "outbox.db"
    assert config.outbox.max_bytes == 1048576
    assert config.metrics is not None and config.metrics.port == 9464
    [source] = config.all_sources
    assert source.type == "video" and source.fps == 5
    assert config.mqtt.qos == 1 and config.mqtt.topic_prefix == "edge"


def test_several_sources_share_one_model_and_metrics_can_be_disabled(tmp_path: Path) -> None:
    text = GOOD.replace(
        "source: {type: video, uri: clip.avi, fps: 5, loop: false}",
        "sources:\n  - {type: video, uri: a.avi}\n  - {type: sensor, uri: /dev/ttyUSB0, window: 128, hop: 64}",
    ).replace("metrics: {port: 9464}", "metrics: null")
    config = load_config(_write(tmp_path, text))
    assert [s.type for s in config.all_sources] == ["video", "sensor"]
    assert config.metrics is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("port: 1883", "port: 1883, hots: x"), ":5: mqtt.hots: unknown key"),
        (GOOD + "colour: blue\n", ":8: colour: unknown key"),
        (GOOD.replace("fps: 5", "fps: -1"), ":4: source.fps:"),
        (GOOD.replace("max_bytes: 1048576", "max_bytes: lots"), ":6: outbox.max_bytes:"),
        (GOOD.replace("device_id: cam-01", "device_id: cam/01"), ":1: device_id:"),
        (GOOD + "sources: [{type: video, uri: b.avi}]\n", "exactly one of `source` or `sources`"),
        (
            GOOD.replace("model: models/current          # relative to this file\n", ""),
            "model: Field required",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_password_file_must_not_be_world_readable(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    text = GOOD.replace("topic_prefix: edge}", "topic_prefix: edge, username: cam, password_file: mqtt.pass}")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="other users"):
        load_config(path, environ={})
    os.chmod(secret, 0o640)
    config = load_config(path, environ={})
    assert read_password(config.mqtt, environ={}) == "s3cret"


def test_environment_overrides_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "other.pass"
    secret.write_text("from-file")
    os.chmod(secret, 0o600)
    config = load_config(_write(tmp_path, GOOD), environ={})
    assert read_password(config.mqtt, environ={}) is None
    assert read_password(config.mqtt, environ={"EDGE_MQTT_PASSWORD": "from-env"}) == "from-env"
    assert read_password(config.mqtt, environ={"EDGE_MQTT_PASSWORD_FILE": str(secret)}) == "from-file"
    os.chmod(secret, 0o604)
    with pytest.raises(ConfigError, match="other users"):
        read_password(config.mqtt, environ={"EDGE_MQTT_PASSWORD_FILE": str(secret)})


def test_the_model_rejects_a_password_in_the_yaml(tmp_path: Path) -> None:
    # Secrets do not belong in a config file that is usually world-readable.
    with pytest.raises(ConfigError, match="mqtt.password"):
        load_config(_write(tmp_path, GOOD.replace("topic_prefix: edge}", "topic_prefix: edge, password: x}")))


def _check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "check-config", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _clip_next_to_config(tmp_path: Path) -> None:
    import shutil

    from tests.assets_media import labelled_clip

    shutil.copy(labelled_clip().path, tmp_path / "clip.avi")


def test_check_config_cli_ok_and_error(tmp_path: Path) -> None:
    make_tiny_package(tmp_path / "models" / "current")
    _clip_next_to_config(tmp_path)
    good = _write(tmp_path, GOOD.replace("profile: auto", "profile: x86-64-avx2"))
    done = _check_config(good)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {good}: device cam-01, model tiny-colour 1.0.0")
    assert done.stderr.strip() == (
        f"warning: {good}: mqtt: the broker 127.0.0.1:1883 is not tried here; "
        "`edge-infer doctor --config FILE` tries it with this TLS and these credentials"
    )

    bad = _write(tmp_path, GOOD.replace("qos: 1", "qos: 3"), name="bad.yaml")
    done = _check_config(bad)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"edge-infer check-config: error: {bad}:5: mqtt.qos:")


def test_check_config_refuses_a_tampered_package(tmp_path: Path) -> None:
    make_tiny_package(tmp_path / "models" / "current", corrupt="hash")
    _clip_next_to_config(tmp_path)
    done = _check_config(_write(tmp_path, GOOD))
    assert done.returncode == 2
    assert "sha256 of 'model.onnx'" in done.stderr
    assert _check_config(_write(tmp_path, GOOD), "--no-package").returncode == 0


def test_default_config_object_is_strict() -> None:
    with pytest.raises(ValueError):
        DaemonConfig.model_validate(
            {"device_id": "x", "model": "/m", "source": {"type": "video"}, "extra": 1}
        )


def test_the_commented_example_config_is_valid() -> None:
    done = _check_config(REPO / "examples" / "config.yaml", "--no-package")
    assert done.returncode == 0, done.stderr
    assert "device cam-01" in done.stdout and "sources video:rtsp://cam/stream" in done.stdout


def test_check_config_never_prints_a_stream_password(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("uri: clip.avi", "uri: 'rtsp://admin:hunter2@cam/stream'"))
    done = _check_config(path, "--no-package")
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout and "rtsp://admin:***@cam/stream" in done.stdout
    assert (
        "hunter2" not in done.stderr and "video source rtsp://admin:***@cam/stream: a stream" in done.stderr
    )


def test_check_config_checks_files_devices_and_keys_without_starting(tmp_path: Path) -> None:
    """Everything that can be checked before the daemon runs is, each problem on its own line naming the
    field; the exit code says the config would not start."""
    make_tiny_package(tmp_path / "models" / "current")
    (tmp_path / "state").mkdir()
    (tmp_path / "state").chmod(0o500)
    (tmp_path / "not-a-video.avi").write_text("hello")
    text = (
        GOOD.replace(
            "source: {type: video, uri: clip.avi, fps: 5, loop: false}",
            "sources:\n"
            "  - {type: video, uri: missing.avi}\n"
            "  - {type: video, uri: not-a-video.avi}\n"
            "  - {type: video, uri: /dev/video97}\n"
            "  - {type: sensor, uri: /dev/ttyUSB97}\n"
            "  - {type: sensor, uri: samples.raw}\n"
            "  - {type: video, uri: 'rtsp://cam/stream'}",
        )
        .replace("topic_prefix: edge}", "topic_prefix: edge, tls: {ca_file: ca.pem}}")
        .replace("outbox: {path: state/outbox.db", "outbox: {path: state/db/outbox.db")
        + "trusted_keys: [keys/release.pub.pem]\n"
    )
    config = _write(tmp_path, text)
    done = _check_config(config, "--no-package")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    expected = [
        f"error: {config}: sources.0.uri: video source {tmp_path}/missing.avi: file not found",
        f"error: {config}: sources.1.uri: video source {tmp_path}/not-a-video.avi: OpenCV cannot decode",
        f"error: {config}: sources.2.uri: video source /dev/video97: no such device",
        f"error: {config}: sources.3.uri: sensor source /dev/ttyUSB97: no such device",
        f"error: {config}: sources.4.uri: sensor source {tmp_path}/samples.raw: file not found",
        f"warning: {config}: sources.5.uri: video source rtsp://cam/stream: a stream is not tried",
        f"error: {config}: trusted_keys.0: {tmp_path}/keys/release.pub.pem: not a readable",
        f"error: {config}: mqtt.tls.ca_file: {tmp_path}/ca.pem: no such file",
        f"error: {config}: outbox.path: {tmp_path}/state is not writable by this user",
        f"warning: {config}: mqtt: the broker 127.0.0.1:1883 is not tried here",
        f"edge-infer check-config: error: {config}: 8 problem(s), each named above",
    ]
    if os.geteuid() == 0:  # root writes anywhere
        expected = [line for line in expected if "outbox.path" not in line]
        expected[-1] = expected[-1].replace("8 problem", "7 problem")
    assert len(lines) == len(expected), done.stderr
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
