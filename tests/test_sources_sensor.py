"""Sensor sources against real byte streams: a pty as the serial port, files, WAV files and a stdin pipe.

Windows are checked value-for-value: window k starts at sample k * hop, so every window that arrives
can be compared with the samples that were written, even if a slow reader let some be replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import tty
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge.errors import ConfigError
from edge.sources import Frame, open_source
from edge.sources.sensor import SampleWindower, SensorSourceConfig

REPO = Path(__file__).resolve().parents[1]


def int16_samples(count: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32768, size=(count, channels), dtype=np.int16)


def expected_window(samples: np.ndarray, index: int, window: int, hop: int) -> np.ndarray:
    return samples[index * hop : index * hop + window]


def collect(source: object, until: float, want: int | None = None) -> list[Frame]:
    """Read until the source finishes, `want` windows were produced (read or replaced), or `until`."""
    frames: list[Frame] = []
    while time.monotonic() < until:
        frame = source.read(0.2)  # type: ignore[attr-defined]
        if frame is not None:
            frames.append(frame)
        elif source.finished or (want is not None and source.stats["frames_in"] >= want):  # type: ignore[attr-defined]
            break
    return frames


@pytest.fixture
def pty_port(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A pty pair: the test writes to the master, the source opens a stable symlink to the slave."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no line discipline: bytes pass through unchanged
    link = tmp_path / "ttyTEST0"
    link.symlink_to(os.ttyname(slave))
    yield master, link
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


def write_steadily(fd: int, payload: bytes, chunk: int, interval: float) -> threading.Thread:
    """Write `payload` in odd-sized chunks at a steady rate, so samples straddle reads."""

    def run() -> None:
        for start in range(0, len(payload), chunk):
            os.write(fd, payload[start : start + chunk])
            time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_windower_keeps_partial_samples_across_chunks() -> None:
    samples = int16_samples(50, 2, seed=1)
    raw = samples.astype("<i2").tobytes()
    windower = SampleWindower("s16le", 2, window=10, hop=4)
    windows = []
    for start in range(0, len(raw), 3):  # 3 bytes never align with a 4-byte sample frame
        windows.extend(windower.feed(raw[start : start + 3]))
    assert len(windows) == (50 - 10) // 4 + 1
    for index, window in enumerate(windows):
        np.testing.assert_array_equal(window, expected_window(samples, index, 10, 4) / np.float32(32768))
    assert windower.leftover_bytes == 0


def test_pty_int16_two_channels_windows_are_exact(pty_port: tuple[int, Path]) -> None:
    master, link = pty_port
    window, hop, channels = 64, 32, 2
    samples = int16_samples(64 * 40, channels, seed=2)
    source = open_source(
        SensorSourceConfig(
            uri=str(link), baud=115200, format="s16le", channels=channels, window=window, hop=hop
        )
    )
    source.start()
    try:
        time.sleep(0.2)  # let pyserial open the port before bytes flow
        writer = write_steadily(master, samples.astype("<i2").tobytes(), chunk=257, interval=0.004)
        frames = collect(source, time.monotonic() + 10, want=(len(samples) - window) // hop + 1)
        writer.join(timeout=10)
    finally:
        source.stop()
    expected_count = (len(samples) - window) // hop + 1
    stats = source.stats
    assert stats["frames_in"] == expected_count
    assert len(frames) + stats["frames_dropped"] == expected_count
    assert len(frames) >= 5  # a reader this busy may see windows replaced, but never out of order
    indexes = [frame.index for frame in frames]
    assert indexes == sorted(set(indexes))
    for frame in frames:
        assert frame.data.dtype == np.float32
        assert frame.data.shape == (window, channels)
        want = expected_window(samples, frame.index, window, hop).astype(np.float32) / 32768
        np.testing.assert_array_equal(frame.data, want)
        assert frame.data.min() >= -1.0 and frame.data.max() < 1.0
    monos = [frame.captured_mono for frame in frames]
    assert monos == sorted(monos)


def test_pty_f32_samples_arrive_unchanged(pty_port: tuple[int, Path]) -> None:
    master, link = pty_port
    rng = np.random.default_rng(3)
    samples = rng.standard_normal((2000, 1)).astype("<f4")
    source = open_source({"type": "sensor", "uri": str(link), "format": "f32le", "window": 100})
    source.start()
    try:
        time.sleep(0.2)
        writer = write_steadily(master, samples.tobytes(), chunk=401, interval=0.005)
        frames = collect(source, time.monotonic() + 10, want=20)
        writer.join(timeout=10)
    finally:
        source.stop()
    assert source.stats["frames_in"] == 20
    assert frames
    for frame in frames:
        np.testing.assert_array_equal(frame.data, samples[frame.index * 100 : frame.index * 100 + 100])


def test_serial_port_that_goes_away_is_reconnected(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "ttyUSB-test"
    link.symlink_to(os.ttyname(slave))
    samples = int16_samples(800, 1, seed=4)
    raw = samples.astype("<i2").tobytes()
    config = SensorSourceConfig(uri=str(link), window=100, reconnect_min_s=0.1, reconnect_max_s=0.3)
    source = open_source(config)
    source.start()
    new_master = new_slave = -1
    try:
        time.sleep(0.2)
        os.write(master, raw[:400])  # two windows
        first = collect(source, time.monotonic() + 5, want=1)
        assert first
        os.close(master)  # the device is unplugged: the slave reads fail with EIO
        os.close(slave)
        deadline = time.monotonic() + 5
        while source.stats["reconnects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.stats["reconnects"] >= 1
        new_master, new_slave = os.openpty()  # plugged back in, under the same name
        tty.setraw(new_slave)
        link.unlink()
        link.symlink_to(os.ttyname(new_slave))
        deadline = time.monotonic() + 5
        later: list[Frame] = []
        while not later and time.monotonic() < deadline:
            os.write(new_master, raw[:200])
            later = collect(source, time.monotonic() + 0.3, want=1)
        assert later, f"no data after the port came back: {source.stats}, {source.last_error}"  # type: ignore[attr-defined]
        assert later[0].index > first[-1].index
        np.testing.assert_array_equal(later[0].data, samples[:100].astype(np.float32) / 32768)
    finally:
        source.stop()
        for fd in (new_master, new_slave):
            if fd >= 0:
                os.close(fd)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


def test_wav_file_windows_are_exact_and_paced(tmp_path: Path) -> None:
    rate, window, hop = 8000, 800, 400
    samples = int16_samples(rate, 2, seed=5)  # one second of stereo
    path = tmp_path / "clip.wav"
    write_wav(path, samples, rate)
    source = open_source(SensorSourceConfig(uri=str(path), window=window, hop=hop))
    started = time.monotonic()
    source.start()
    try:
        frames = collect(source, time.monotonic() + 10)
    finally:
        source.stop()
    elapsed = time.monotonic() - started
    expected_count = (rate - window) // hop + 1
    assert source.finished
    assert source.stats["frames_in"] == expected_count
    assert len(frames) + source.stats["frames_dropped"] == expected_count
    assert frames[-1].index == expected_count - 1
    for frame in frames:
        assert frame.data.shape == (window, 2)
        want = expected_window(samples, frame.index, window, hop).astype(np.float32) / 32768
        np.testing.assert_array_equal(frame.data, want)
    # paced like a live microphone: the last window cannot exist before its last sample was "heard"
    assert elapsed >= 0.9 * (rate - (rate - window) % hop) / rate


def test_wav_header_contradicting_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mono.wav"
    write_wav(path, int16_samples(100, 1), 16000)
    with pytest.raises(ConfigError, match=r"mono\.wav.*channels=2.*header says 1"):
        open_source(SensorSourceConfig(uri=str(path), channels=2, window=10))


def test_raw_file_without_a_clock_drops_nothing_for_a_slow_reader(tmp_path: Path) -> None:
    samples = int16_samples(1000, 1, seed=8)
    path = tmp_path / "accel.raw"
    path.write_bytes(samples.astype("<i2").tobytes())
    source = open_source(SensorSourceConfig(uri=str(path), window=100, hop=50))
    source.start()
    frames: list[Frame] = []
    try:
        while True:
            frame = source.read(5)
            if frame is None:
                break
            frames.append(frame)
            time.sleep(0.01)
    finally:
        source.stop()
    assert source.finished
    assert [frame.index for frame in frames] == list(range(19))
    assert source.stats["frames_dropped"] == 0
    for frame in frames:
        np.testing.assert_array_equal(frame.data, samples[frame.index * 50 : frame.index * 50 + 100] / 32768)


def test_raw_file_with_truncated_trailing_sample(tmp_path: Path) -> None:
    samples = int16_samples(300, 2, seed=6)
    path = tmp_path / "imu.raw"
    path.write_bytes(samples.astype("<i2").tobytes() + b"\x01\x02\x03")
    source = open_source(SensorSourceConfig(uri=str(path), channels=2, window=100, hop=100))
    source.start()
    try:
        frames = collect(source, time.monotonic() + 5)
    finally:
        source.stop()
    assert source.finished
    assert source.stats["frames_in"] == 3
    assert source.stats["read_errors"] == 1
    message = source.last_error  # type: ignore[attr-defined]
    assert "imu.raw" in message and "s16le" in message and "3 byte(s)" in message
    for frame in frames:
        np.testing.assert_array_equal(
            frame.data, samples[frame.index * 100 : frame.index * 100 + 100] / 32768
        )


STDIN_READER = """
import json, sys, time
from edge.sources import open_source
source = open_source({"type": "sensor", "uri": "-", "format": "s16le", "channels": 1, "window": 50, "hop": 25})
source.start()
frames = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    frame = source.read(0.2)
    if frame is not None:
        frames.append({"index": frame.index, "data": (frame.data[:, 0] * 32768).astype(int).tolist()})
    elif source.finished:  # checked only after an empty read: the last window may still be waiting
        break
source.stop()
print(json.dumps({"frames": frames, "stats": source.stats, "finished": source.finished,
                  "last_error": source.last_error}))
"""


def test_stdin_pipe_windows_then_end_of_input() -> None:
    samples = int16_samples(500, 1, seed=7)
    child = subprocess.Popen(
        [sys.executable, "-c", STDIN_READER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert child.stdin is not None
    raw = samples.astype("<i2").tobytes() + b"\x7f"  # one stray byte at the end
    for start in range(0, len(raw), 99):
        child.stdin.write(raw[start : start + 99])
        child.stdin.flush()
        time.sleep(0.01)
    child.stdin.close()
    child.wait(timeout=30)  # the output is a few kB: it fits in the pipe while we wait
    assert child.stdout is not None and child.stderr is not None
    out, err = child.stdout.read(), child.stderr.read()
    assert child.returncode == 0, err.decode()
    result = json.loads(out)
    expected_count = (500 - 50) // 25 + 1
    assert result["finished"]
    assert result["stats"]["frames_in"] == expected_count
    assert result["stats"]["read_errors"] == 1
    assert "1 byte(s)" in result["last_error"]
    assert result["frames"]
    for frame in result["frames"]:
        assert frame["data"] == samples[frame["index"] * 25 : frame["index"] * 25 + 50, 0].tolist()


def test_sensor_config_errors_name_the_problem(tmp_path: Path) -> None:
    design_example = SensorSourceConfig.model_validate(
        {
            "type": "sensor",
            "uri": "/dev/ttyUSB0",
            "baud": 115200,
            "window": 16000,
            "hop": 8000,
            "format": "f32le",
        }
    )
    assert design_example.hop_samples == 8000
    with pytest.raises(ValidationError, match="hop"):
        SensorSourceConfig(uri="/dev/ttyUSB0", window=100, hop=200)
    with pytest.raises(ValidationError, match="parity"):
        SensorSourceConfig(uri="/dev/ttyUSB0", parity="N")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="format"):
        SensorSourceConfig(uri="/dev/ttyUSB0", format="s12le")
    with pytest.raises(ConfigError, match="nowhere.raw: file not found"):
        open_source({"type": "sensor", "uri": str(tmp_path / "nowhere.raw")})
    not_wav = tmp_path / "noise.wav"
    not_wav.write_bytes(b"definitely not RIFF")
    with pytest.raises(ConfigError, match=r"noise\.wav: not a PCM WAV"):
        open_source({"type": "sensor", "uri": str(not_wav)})


def test_serial_port_silent_past_read_timeout_is_reopened(pty_port: tuple[int, Path]) -> None:
    master, link = pty_port
    config = SensorSourceConfig(uri=str(link), window=10, read_timeout_s=0.3, reconnect_min_s=0.1)
    source = open_source(config)
    source.start()
    try:
        deadline = time.monotonic() + 5
        while source.stats["reconnects"] < 1 and time.monotonic() < deadline:
            assert source.read(0.2) is None
        assert source.stats["reconnects"] >= 1
        assert "no data for 0.3 s" in (source.last_error or "")  # type: ignore[attr-defined]
        os.write(master, np.arange(10, dtype="<i2").tobytes())  # the reopened port still delivers
        frame = source.read(5)
        assert frame is not None
        np.testing.assert_array_equal(frame.data[:, 0], np.arange(10, dtype=np.float32) / 32768)
    finally:
        source.stop()


def test_looping_raw_file_restarts_and_a_too_short_one_finishes(tmp_path: Path) -> None:
    samples = int16_samples(100, 1, seed=9)
    path = tmp_path / "loop.raw"
    path.write_bytes(samples.astype("<i2").tobytes())
    source = open_source(SensorSourceConfig(uri=str(path), window=50, loop=True))
    source.start()
    try:
        frames = [source.read(5) for _ in range(6)]
    finally:
        source.stop()
    assert not source.finished
    for frame in frames:
        assert frame is not None
        start = (frame.index % 2) * 50
        np.testing.assert_array_equal(frame.data, samples[start : start + 50] / 32768)
    assert [frame.index for frame in frames if frame] == list(range(6))
    short = tmp_path / "short.raw"
    short.write_bytes(samples[:10].astype("<i2").tobytes())
    source = open_source(SensorSourceConfig(uri=str(short), window=50, loop=True))
    source.start()
    try:
        assert source.read(5) is None
        assert source.finished
        assert "shorter than one window" in (source.last_error or "")  # type: ignore[attr-defined]
    finally:
        source.stop()


LOSSLESS_PROBE = """
from edge.sources import open_source
print(open_source({"type": "sensor", "uri": "-", "format": "s16le", "window": 4}).lossless)
"""


def test_stdin_is_lossless_from_a_pipe_or_file_and_live_from_a_terminal(tmp_path: Path) -> None:
    def probe(stdin: object) -> str:
        done = subprocess.run(
            [sys.executable, "-c", LOSSLESS_PROBE], stdin=stdin, capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert probe(subprocess.PIPE) == "True"
    (tmp_path / "samples.raw").write_bytes(b"\0" * 64)
    with (tmp_path / "samples.raw").open("rb") as redirected:
        assert probe(redirected) == "True"
    controller, terminal = os.openpty()
    try:
        assert probe(terminal) == "False"
    finally:
        os.close(controller)
        os.close(terminal)
