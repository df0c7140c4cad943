"""Sensor byte streams (edge/sources/sensor.py): random, truncated and mis-sized bytes from real files, a
real pty and damaged WAV headers give exact windows or a clear error; never a crash or a hang."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import tty
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.errors import ConfigError
from edge.sources import Frame, open_source
from edge.sources.sensor import FORMATS, SampleWindower, SensorSource, SensorSourceConfig
from tests.fuzz.support import TEST_TIMEOUT_S, assert_clear_error, fuzz_settings, no_hang

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

LAYOUTS = st.tuples(st.sampled_from(sorted(FORMATS)), st.integers(1, 4), st.integers(1, 40)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(1, t[2]))
)


def reference_windows(
    raw: bytes, sample_format: str, channels: int, window: int, hop: int
) -> list[np.ndarray]:
    """What the windows must be: decode every whole sample frame at once, then slide."""
    dtype, scale = FORMATS[sample_format]
    frame_bytes = np.dtype(dtype).itemsize * channels
    whole = len(raw) - len(raw) % frame_bytes
    values = np.frombuffer(raw[:whole], dtype=np.dtype(dtype)).astype(np.float32)
    if sample_format == "u8":
        values -= 128.0
    if scale != 1.0:
        values *= np.float32(scale)
    samples = values.reshape(-1, channels)
    return [samples[start : start + window] for start in range(0, len(samples) - window + 1, hop)]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@fuzz_settings(200)
@given(LAYOUTS, st.binary(max_size=2000), st.lists(st.integers(0, 64), max_size=40))
def test_windower_matches_the_reference_for_any_chunking(
    layout: tuple[str, int, int, int], raw: bytes, cuts: list[int]
) -> None:
    sample_format, channels, window, hop = layout
    windower = SampleWindower(sample_format, channels, window, hop)
    windows: list[np.ndarray] = []
    position = 0
    with no_hang():
        for size in [*cuts, len(raw)]:
            windows.extend(windower.feed(raw[position : position + size]))
            position += size
    expected = reference_windows(raw, sample_format, channels, window, hop)
    assert len(windows) == len(expected)
    assert all(same(got, want) for got, want in zip(windows, expected, strict=True))
    assert windower.leftover_bytes == len(raw) % windower.frame_bytes
    assert all(w.dtype == np.float32 and w.shape == (window, channels) for w in windows)


def drain(source: SensorSource, limit_s: float = 20) -> list[Frame]:
    """Start `source`, read every frame until it finishes, stop it whatever happens."""
    source.start()
    try:
        frames: list[Frame] = []
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            frame = source.read(0.5)
            if frame is not None:
                frames.append(frame)
            elif source.finished:
                return frames
        raise AssertionError(f"{source.uri}: not finished after {limit_s} s")
    finally:
        source.stop()


@fuzz_settings(40, costly=True)
@given(LAYOUTS, st.binary(max_size=3000))
def test_raw_file_of_any_bytes(layout: tuple[str, int, int, int], raw: bytes) -> None:
    sample_format, channels, window, hop = layout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.raw"
        path.write_bytes(raw)
        config = SensorSourceConfig(
            uri=str(path), format=sample_format, channels=channels, window=window, hop=hop
        )
        source = open_source(config)
        assert isinstance(source, SensorSource)
        frames = drain(source)
    expected = reference_windows(raw, sample_format, channels, window, hop)
    assert source.stats["frames_in"] == len(expected) and source.stats["frames_dropped"] == 0
    assert [frame.index for frame in frames] == list(range(len(expected)))
    for frame, want in zip(frames, expected, strict=True):
        assert same(frame.data, want)
    leftover = len(raw) % source._new_windower().frame_bytes
    assert source.stats["read_errors"] == (1 if leftover else 0)
    if source.last_error is not None:
        assert_clear_error(Exception(source.last_error), str(path))


def wav_bytes(width: int, channels: int, rate: int, frames: bytes) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setsampwidth(width)
        wav.setnchannels(channels)
        wav.setframerate(rate)
        wav.writeframes(frames)
    return buffer.getvalue()


@fuzz_settings(150, costly=True)
@given(
    st.sampled_from([1, 2, 3, 4]),
    st.integers(1, 3),
    st.sampled_from([1, 8000, 16000, 48000, 2**27]),
    st.binary(max_size=600),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 700)),
)
@example(2, 1, 16000, b"\x00" * 40, [], 30).via("a header cut short")
@example(2, 1, 16000, b"\x00" * 40, [(22, 0)], None).via("zero channels in the header")
@example(2, 1, 16000, b"\x00" * 40, [(20, 3)], None).via("a float WAV (format tag 3)")
@example(1, 1, 1, b"", [(17, 1)], None).via("regression: a bad fmt chunk size raised a bare RuntimeError")
def test_damaged_wav_header(
    width: int, channels: int, rate: int, audio: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    audio = audio[: len(audio) - len(audio) % (width * channels)]
    raw = bytearray(wav_bytes(width, channels, rate, audio))
    for offset, value in flips:
        if offset < len(raw):
            raw[offset] = value
    data = bytes(raw[:cut] if cut is not None else raw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        path.write_bytes(data)
        try:
            with no_hang():
                source = open_source(SensorSourceConfig(uri=str(path), window=8, hop=4, realtime=False))
        except ConfigError as exc:
            assert_clear_error(exc, str(path))
            return
        assert isinstance(source, SensorSource)
        frames = drain(source)
    assert source.finished
    assert all(frame.data.shape == (8, source.channels) for frame in frames)
    if source.last_error is not None:
        assert_clear_error(Exception(source.last_error), str(path))
    if not flips and cut is None:  # an undamaged file is decoded in full
        sample_frames = len(audio) // (width * channels)
        assert source.stats["frames_in"] == ((sample_frames - 8) // 4 + 1 if sample_frames >= 8 else 0)
        assert source.stats["read_errors"] == 0


@fuzz_settings(100)
@given(
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(["a\x00b", "/dev/null", "/dev/zero/x", "a" * 5000, "x.wav", "/dev/ttyNOPE", "-x"]),
    )
)
@example("a" * 5000).via("regression: OSError (file name too long) escaped from Path.is_file")
@example("a\x00b").via("regression: ValueError (NUL byte) escaped from os.stat in uri_kind")
def test_any_uri_opens_or_is_refused(uri: str) -> None:
    try:
        with no_hang():
            config = SensorSourceConfig(uri=uri)
            source = open_source(config)
    except ConfigError as exc:
        assert_clear_error(exc)
        return
    except ValueError:  # pydantic: blank uri, realtime without a rate
        return
    assert isinstance(source, SensorSource)


@contextlib.contextmanager
def pty_link(directory: Path) -> object:
    master, slave = os.openpty()
    tty.setraw(slave)
    link = directory / "ttyFUZZ0"
    link.symlink_to(os.ttyname(slave))
    try:
        yield master, link
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@fuzz_settings(8, costly=True)
@given(LAYOUTS, st.binary(min_size=0, max_size=2000), st.integers(1, 300))
def test_pty_stream_of_any_bytes(layout: tuple[str, int, int, int], noise: bytes, chunk: int) -> None:
    """A serial port (a real pty) fed random bytes in odd chunks: exactly the reference windows."""
    sample_format, channels, window, hop = layout
    frame_bytes = np.dtype(FORMATS[sample_format][0]).itemsize * channels
    raw = noise + bytes(window * frame_bytes)  # at least one window, so the end is observable
    expected = reference_windows(raw, sample_format, channels, window, hop)
    with tempfile.TemporaryDirectory() as tmp, pty_link(Path(tmp)) as (master, link):
        config = SensorSourceConfig(
            uri=str(link), format=sample_format, channels=channels, window=window, hop=hop
        )
        source = open_source(config)
        source.start()
        frames: list[Frame] = []
        try:
            time.sleep(0.2)  # let pyserial open the port before bytes flow
            for start in range(0, len(raw), chunk):
                os.write(master, raw[start : start + chunk])
            deadline = time.monotonic() + 20
            while source.stats["frames_in"] < len(expected) and time.monotonic() < deadline:
                frame = source.read(0.2)
                if frame is not None:
                    frames.append(frame)
            while (frame := source.read(0.2)) is not None:
                frames.append(frame)
        finally:
            source.stop()
    assert source.stats["frames_in"] == len(expected)
    assert len(frames) + source.stats["frames_dropped"] == len(expected)
    for frame in frames:
        assert same(frame.data, expected[frame.index])
