"""Sensor source: fixed-format samples from a serial port, a file, stdin or a WAV file, cut into windows.

Bytes arrive in whatever chunks the OS gives; `SampleWindower` buffers partial samples, converts whole
sample frames to float32 (integers scaled to [-1, 1)), and emits (window, channels) arrays every `hop`
samples. A file that ends with a partial sample frame is not an error: the stray bytes are dropped,
counted in `stats["read_errors"]` and described in `last_error`.

Files and WAV files are paced at their sample rate when it is known, so they behave like a live sensor
(a slow reader then sees windows replaced, counted as dropped); without a clock they go at the reader's
pace and drop nothing. Serial ports reconnect with backoff when the device goes away (USB unplugged, pty closed).
"""

from __future__ import annotations

import logging
import os
import select
import struct
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.errors import ConfigError, Finding
from edge.sources.base import Frame, ReaderThreadSource, SourcePlugin

log = logging.getLogger(__name__)

CHUNK_BYTES = 65536
POLL_S = 0.1

# format -> (numpy dtype, scale to float). Integers map to [-1, 1): int16 x / 32768, uint8 (x - 128) / 128.
FORMATS: dict[str, tuple[str, float]] = {
    "s16le": ("<i2", 1 / 32768),
    "s16be": (">i2", 1 / 32768),
    "s32le": ("<i4", 1 / 2147483648),
    "s32be": (">i4", 1 / 2147483648),
    "f32le": ("<f4", 1.0),
    "f32be": (">f4", 1.0),
    "f64le": ("<f8", 1.0),
    "u8": ("u1", 1 / 128),
    "s8": ("i1", 1 / 128),
}
WAV_FORMATS = {1: "u8", 2: "s16le", 4: "s32le"}  # sample width in bytes -> format


SampleFormat = Literal["s16le", "s16be", "s32le", "s32be", "f32le", "f32be", "f64le", "u8", "s8"]


class SensorSourceConfig(BaseModel):
    """Fixed-format samples from a serial port, a file, stdin ("-") or a WAV file, cut into windows."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["sensor"] = "sensor"
    uri: str
    baud: int = Field(default=115200, gt=0)
    format: SampleFormat = "s16le"
    channels: int = Field(default=1, ge=1)
    sample_rate: int | None = Field(
        default=None, gt=0, description="samples per second per channel; WAV files bring their own"
    )
    window: int = Field(default=16000, ge=1, description="samples per channel in one frame")
    hop: int | None = Field(default=None, ge=1, description="samples between window starts (default window)")
    loop: bool = Field(default=False, description="plain files and WAV: restart at the end")
    realtime: bool | None = Field(
        default=None,
        description=(
            "files: deliver windows at sample_rate like a live sensor (default: when the rate is known); "
            "stdin: true treats a pipe as live (newest window wins; default: only a terminal is live)"
        ),
    )
    read_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="serial: reopen the port after this long without a byte (default: a quiet sensor is fine)",
    )
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> SensorSourceConfig:
        if self.hop is not None and self.hop > self.window:
            raise ValueError(f"hop ({self.hop}) must not exceed window ({self.window})")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.realtime and self.sample_rate is None and not self.uri.lower().endswith(".wav"):
            raise ValueError("realtime needs sample_rate")
        return self

    @property
    def hop_samples(self) -> int:
        return self.hop if self.hop is not None else self.window


def decode_samples(raw: bytes, sample_format: str, channels: int) -> np.ndarray:
    """Whole sample frames of `raw` as float32 (frames, channels); len(raw) must be a multiple."""
    dtype, scale = FORMATS[sample_format]
    values = np.frombuffer(raw, dtype=np.dtype(dtype)).astype(np.float32)
    if sample_format == "u8":
        values -= 128.0
    if scale != 1.0:
        values *= np.float32(scale)
    return values.reshape(-1, channels)


class SampleWindower:
    """Bytes in, overlapping (window, channels) float32 windows out; partial sample frames are kept."""

    def __init__(self, sample_format: str, channels: int, window: int, hop: int) -> None:
        self.format = sample_format
        self.channels = channels
        self.window = window
        self.hop = hop
        self.frame_bytes = np.dtype(FORMATS[sample_format][0]).itemsize * channels
        self._partial = b""
        self._samples = np.zeros((0, channels), dtype=np.float32)
        self.samples_in = 0

    @property
    def leftover_bytes(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> list[np.ndarray]:
        raw = self._partial + data
        whole = len(raw) - len(raw) % self.frame_bytes
        self._partial = raw[whole:]
        if whole == 0:
            return []
        samples = decode_samples(raw[:whole], self.format, self.channels)
        self.samples_in += len(samples)
        self._samples = np.concatenate([self._samples, samples]) if len(self._samples) else samples
        windows = []
        while len(self._samples) >= self.window:
            windows.append(self._samples[: self.window].copy())
            self._samples = self._samples[self.hop :]
        return windows

    def reset(self) -> None:
        self._partial = b""
        self._samples = np.zeros((0, self.channels), dtype=np.float32)


def uri_kind(uri: str) -> str:
    """'stdin', 'wav', 'serial' (a tty or other character device) or 'file'."""
    if uri == "-":
        return "stdin"
    if uri.lower().endswith(".wav"):
        return "wav"
    if uri.startswith("/dev/tty") or uri.startswith("/dev/pts/") or uri.startswith("/dev/serial"):
        return "serial"
    try:
        import stat

        if stat.S_ISCHR(os.stat(uri).st_mode):
            return "serial"
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        pass
    return "file"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file() or path.is_fifo()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


class SensorSource(ReaderThreadSource):
    """Windows of sensor samples; `read()` returns the newest window not yet returned."""

    def __init__(self, config: SensorSourceConfig) -> None:
        super().__init__()
        self.config = config
        self.uri = config.uri
        self._restart_next = True
        self.kind = uri_kind(config.uri)
        self.sample_format: str = config.format
        self.channels = config.channels
        self.sample_rate: int | None = config.sample_rate
        # stdin from a pipe or a file is data someone wants every window of; a terminal is typed live
        self._stdin_live = self.kind == "stdin" and (config.realtime is True or os.isatty(0))
        if self.kind in ("file", "wav") and not _is_file(Path(self.uri)):
            raise ConfigError(f"sensor source {self.uri}: file not found")
        if self.kind == "wav":
            self._read_wav_header()

    def describe(self) -> str:
        return f"sensor source {self.uri} ({self.sample_format}, {self.channels} channel(s))"

    @property
    def thread_name(self) -> str:
        return f"sensor-{self.kind}"

    def start(self) -> None:
        if self.kind == "serial":
            import serial  # noqa: F401  (fail now, not in the thread, if pyserial is missing)
        super().start()

    # -- internals --------------------------------------------------------------------------------------

    def _read_wav_header(self) -> None:
        try:
            with wave.open(self.uri, "rb") as wav:
                width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        except (wave.Error, EOFError, RuntimeError, ValueError, OverflowError, struct.error) as exc:
            # the wave module raises a bare RuntimeError or struct.error on some damaged chunk headers
            reason = str(exc) or type(exc).__name__
            raise ConfigError(
                f"sensor source {self.uri}: not a PCM WAV file the wave module reads: {reason}"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"sensor source {self.uri}: cannot open: {exc.strerror or exc}") from exc
        if width not in WAV_FORMATS:
            raise ConfigError(f"sensor source {self.uri}: {8 * width}-bit WAV samples are not supported")
        explicit = self.config.model_fields_set
        found = {"format": WAV_FORMATS[width], "channels": channels, "sample_rate": rate}
        for field, value in found.items():
            if field in explicit and getattr(self.config, field) != value:
                raise ConfigError(
                    f"sensor source {self.uri}: config says {field}={getattr(self.config, field)} "
                    f"but the WAV header says {value}"
                )
        self.sample_format, self.channels, self.sample_rate = WAV_FORMATS[width], channels, rate

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def _new_windower(self) -> SampleWindower:
        self._restart_next = True  # new samples, not the continuation of the last ones
        return SampleWindower(self.sample_format, self.channels, self.config.window, self.config.hop_samples)

    def _emit(self, windows: list[np.ndarray]) -> None:
        if not windows:
            return
        captured_mono, captured_at = time.monotonic(), time.time()
        for data in windows:
            with self._lock:
                self._index += 1
                index = self._index
                self._counts["frames_in"] += 1
                restart, self._restart_next = self._restart_next, False
            self._slot.put(Frame(data, index, captured_at, captured_mono, self.uri, restart))

    def _trailing(self, windower: SampleWindower) -> None:
        if windower.leftover_bytes:
            self.last_error = (
                f"{self.describe()}: input ended with {windower.leftover_bytes} byte(s), not a whole sample "
                f"frame of {windower.frame_bytes} bytes; dropped"
            )
            log.warning("%s", self.last_error)
            self._count("read_errors")

    def _run(self) -> None:
        try:
            if self.kind == "serial":
                self._run_serial()
            else:
                self._run_stream()
        except Exception as exc:  # the thread must end visibly, not silently
            self.last_error = f"{self.describe()}: {exc}"
            log.error("%s", self.last_error)
            self._count("read_errors")
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._slot.close()

    @property
    def lossless(self) -> bool:
        if self.kind == "stdin":
            return not self._stdin_live
        return self.kind in ("file", "wav") and not self._pace()

    def _pace(self) -> bool:
        realtime = self.config.realtime
        return self.sample_rate is not None and (realtime is None or realtime)

    def _run_stream(self) -> None:
        """Files, WAV files and stdin: read to the end, loop or finish."""
        while not self._stop.is_set():
            windower = self._new_windower()
            started = time.monotonic()
            emitted = 0
            pace = self._pace() and self.kind != "stdin"
            # a file with no clock, a pipe or a redirected file goes at the reader's pace and drops nothing
            reader_paced = not pace and not self._stdin_live
            read_chunk, close = self._open_stream(windower)
            try:
                while not self._stop.is_set():
                    data = read_chunk()
                    if data is None:
                        continue  # nothing yet (stdin poll timed out)
                    if not data:
                        break
                    for window in windower.feed(data):
                        if pace and self.sample_rate:
                            # a window is complete once its last sample would have been measured
                            ends_at = (
                                emitted * self.config.hop_samples + self.config.window
                            ) / self.sample_rate
                            if self._stop.wait(max(0.0, started + ends_at - time.monotonic())):
                                return
                        elif reader_paced:
                            while not self._slot.wait_empty(POLL_S):
                                if self._stop.is_set():
                                    return
                        emitted += 1
                        self._emit([window])
            finally:
                close()
            if self._stop.is_set():
                return
            self._trailing(windower)
            if emitted == 0 and self.config.loop:
                self.last_error = f"{self.describe()}: shorter than one window; not looping over it"
                log.warning("%s", self.last_error)
            if emitted == 0 or not (self.config.loop and self.kind != "stdin"):
                self._finish()
                return

    def _open_stream(self, windower: SampleWindower) -> tuple[Callable[[], bytes | None], Callable[[], None]]:
        if self.kind == "stdin":
            fd = 0

            def read_stdin() -> bytes | None:
                ready, _, _ = select.select([fd], [], [], POLL_S)
                return os.read(fd, CHUNK_BYTES) if ready else None

            return read_stdin, lambda: None
        if self.kind == "wav":
            wav = wave.open(self.uri, "rb")  # noqa: SIM115  (closed by the returned closer)
            frames_per_chunk = max(1, CHUNK_BYTES // windower.frame_bytes)
            return (lambda: wav.readframes(frames_per_chunk)), wav.close
        try:
            handle = open(self.uri, "rb")  # noqa: SIM115  (closed by the returned closer)
        except OSError as exc:
            raise ConfigError(f"sensor source {self.uri}: cannot open: {exc.strerror or exc}") from exc
        return (lambda: handle.read(CHUNK_BYTES)), handle.close

    def _run_serial(self) -> None:
        import serial

        config = self.config
        failures = 0
        first = True
        while not self._stop.is_set():
            if not first:
                delay = min(config.reconnect_max_s, config.reconnect_min_s * (2**failures))
                failures += 1
                if self._stop.wait(delay):
                    return
                self._count("reconnects")
            first = False
            try:
                port: Any = serial.Serial(config.uri, config.baud, timeout=POLL_S)
            except (serial.SerialException, OSError) as exc:
                self.last_error = f"{self.describe()}: cannot open: {exc}"
                log.warning("%s; retrying", self.last_error)
                continue
            windower = self._new_windower()  # a reconnect starts clean: half a sample would skew every value
            last_data = time.monotonic()
            try:
                while not self._stop.is_set():
                    data = port.read(max(1, port.in_waiting))
                    if data:
                        last_data = time.monotonic()
                        windows = windower.feed(data)
                        if windows:
                            failures = 0
                        self._emit(windows)
                    elif config.read_timeout_s and time.monotonic() - last_data > config.read_timeout_s:
                        raise serial.SerialException(f"no data for {config.read_timeout_s:g} s")
            except (serial.SerialException, OSError) as exc:
                self.last_error = f"{self.describe()}: read failed: {exc}"
                log.warning("%s; reconnecting", self.last_error)
                self._count("read_errors")
            finally:
                port.close()


def check(config: SensorSourceConfig) -> list[Finding]:
    """A file or WAV file must exist (and a WAV header agree with the config); a serial port must exist
    and be openable by this user."""
    kind = uri_kind(config.uri)
    if kind == "stdin":
        return []
    if kind == "serial":
        if not os.path.exists(config.uri):
            return [Finding("uri", f"sensor source {config.uri}: no such device")]
        if not os.access(config.uri, os.R_OK | os.W_OK):
            return [Finding("uri", f"sensor source {config.uri}: this user may not open it (group dialout?)")]
        return []
    try:
        SensorSource(config)
    except ConfigError as exc:
        return [Finding("uri", str(exc))]
    return []


PLUGIN = SourcePlugin(key="sensor", config=SensorSourceConfig, source=SensorSource, check=check)
