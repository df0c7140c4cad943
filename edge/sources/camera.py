"""Camera source on OpenCV: files, USB devices and RTSP/HTTP streams behind one newest-frame slot.

Two threads per source. A session thread owns one `cv2.VideoCapture` and does every call that can block
(open, grab, retrieve). A supervisor thread starts sessions, reconnects with exponential backoff when one
ends, and abandons a session stuck inside OpenCV longer than its timeout: the stuck thread is left to die
on its own and never delivers again, so `read()` in the daemon can never hang on a dead camera.

Errors: a file that does not exist (or that OpenCV cannot decode) when the source starts is a
`ConfigError` naming the path. Streams and devices are retried forever with backoff, counted in
`stats["reconnects"]`; a file that vanishes later is retried the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from edge.detect.config import SourceZones
from edge.errors import ConfigError, Finding
from edge.sources.base import CapturingSource, Frame, SourcePlugin

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
# Slack on top of the FFmpeg timeouts before the watchdog gives up on a session.
WATCHDOG_SLACK_S = 2.0
SUPERVISOR_POLL_S = 0.05


class VideoSourceConfig(SourceZones):
    """A camera: a video file, a USB device (/dev/videoN or an index), or an RTSP/HTTP stream; `name` and
    `zones` (from `SourceZones`) are what tracked objects are reported under."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["video"] = "video"
    uri: str | int = 0
    fps: float | None = Field(
        default=None,
        gt=0,
        description="cap on frames delivered per second; cameras, streams and realtime files skip the frames "
        "over it; a file with realtime false delivers every frame, one per 1/fps",
    )
    loop: bool = Field(default=False, description="files only: restart at the end instead of finishing")
    realtime: bool = Field(
        default=True,
        description="files only. true: play at the file's own frame rate like a camera (an fps cap skips "
        "frames). false with fps: every frame, paced at fps. false without fps: decoded flat out, as fast "
        "as the reader takes them, none skipped (benchmarks)",
    )
    width: int | None = Field(default=None, gt=0, description="USB cameras: requested frame width")
    height: int | None = Field(default=None, gt=0, description="USB cameras: requested frame height")
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str | int) -> str | int:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("must not be empty")
            if value.isdigit():
                return int(value)
        elif value < 0:
            raise ValueError("a camera index must be >= 0")
        return value

    @model_validator(mode="after")
    def _backoff_ordered(self) -> VideoSourceConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


def uri_kind(uri: str | int) -> str:
    """'device' (an index or /dev/videoN), 'stream' (a network URL) or 'file'."""
    if isinstance(uri, int):
        return "device"
    if uri.startswith("/dev/video"):
        return "device"
    if uri.lower().startswith(STREAM_SCHEMES):
        return "stream"
    return "file"


def redact(uri: str | int) -> str:
    """The uri without a password, for logs and error messages."""
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        credentials, _, host = rest.partition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return text


def _has_ffmpeg_backend() -> bool:
    import cv2

    return bool(cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG))


class _Session:
    """One capture object and the thread that reads it until it fails, ends or is abandoned."""

    def __init__(self, source: VideoSource, number: int) -> None:
        self.source = source
        self.number = number
        self.busy_since: float | None = None
        self.busy_limit = 0.0
        self.abandoned = False
        self.outcome = "running"  # -> open_failed | eof | error | stopped | stuck
        self.delivered = 0
        self.thread = threading.Thread(target=self._run, name=f"video-{number}", daemon=True)

    def stuck(self, now: float) -> bool:
        since = self.busy_since
        return since is not None and now - since > self.busy_limit

    def _blocking(self, limit: float) -> None:
        self.busy_limit = limit
        self.busy_since = time.monotonic()

    def _idle(self) -> None:
        self.busy_since = None

    def _run(self) -> None:
        source = self.source
        config = source.config
        cap: Any = None
        try:
            self._blocking(config.open_timeout_s + WATCHDOG_SLACK_S)
            cap = source._open_capture()
            self._idle()
            if cap is None or not cap.isOpened():
                self.outcome = "open_failed"
                return
            self._read_loop(cap)
        except Exception as exc:  # OpenCV raises cv2.error on broken backends; the supervisor retries
            log.warning("video source %s: %s", source.uri, exc)
            source._count("read_errors")
            self.outcome = "error"
        finally:
            self._idle()
            if cap is not None:
                # releasing a broken capture must not kill the thread's cleanup
                with contextlib.suppress(Exception):
                    cap.release()

    def _read_loop(self, cap: Any) -> None:
        import cv2

        source = self.source
        config = source.config
        stop = source._stop
        is_file = source.kind == "file"
        file_fps = cap.get(cv2.CAP_PROP_FPS) if is_file else 0.0
        if not (math.isfinite(file_fps) and 0 < file_fps < 1000):
            file_fps = 0.0
        pace_to_file = is_file and config.realtime and file_fps > 0
        cap_period = 1.0 / config.fps if config.fps else 0.0
        # Files not played in real time still honour the cap, one frame per period, none skipped.
        pace_to_cap = is_file and not pace_to_file and cap_period > 0
        # A file at full speed has no clock to keep up with: go at the reader's pace, drop nothing.
        reader_paced = is_file and not pace_to_file and not pace_to_cap
        read_limit = config.read_timeout_s + WATCHDOG_SLACK_S
        started = time.monotonic()
        grabbed = 0
        next_due = started
        while not stop.is_set() and not self.abandoned:
            self._blocking(read_limit)
            ok = cap.grab()
            self._idle()
            if self.abandoned or stop.is_set():
                break
            if not ok:
                self.outcome = "eof" if is_file else "error"
                return
            grabbed += 1
            if pace_to_file:
                position = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                if not math.isfinite(position) or position <= 0:
                    position = (grabbed - 1) / file_fps
                if stop.wait(max(0.0, started + position - time.monotonic())):
                    break
            elif pace_to_cap and stop.wait(max(0.0, next_due - time.monotonic())):
                break
            captured_mono = time.monotonic()
            captured_at = time.time()
            index = source._next_index()
            if cap_period and not pace_to_cap:
                if captured_mono < next_due:
                    continue  # the decoder's buffer is drained by grab(); only wanted frames are retrieved
                next_due = max(next_due + cap_period, captured_mono - cap_period)
            elif pace_to_cap:
                next_due = max(next_due + cap_period, captured_mono - cap_period)
            self._blocking(read_limit)
            ok, image = cap.retrieve()
            self._idle()
            if self.abandoned:
                break
            if not ok or image is None:
                source._count("read_errors")
                continue
            if reader_paced or pace_to_cap:  # a capped file is still lossless: at most the cap, never skipped
                while not source._slot.wait_empty(SUPERVISOR_POLL_S * 2):
                    if stop.is_set() or self.abandoned:
                        self.outcome = "stopped"
                        return
                # the frame is "captured" when the reader can have it, or latencies would count the wait
                captured_mono, captured_at = time.monotonic(), time.time()
            self.delivered += 1
            source._deliver(Frame(image, index, captured_at, captured_mono, source.uri))
        self.outcome = "stopped"


class VideoSource(CapturingSource):
    """A camera, stream or video file whose newest frame is always the one `read()` returns."""

    def __init__(self, config: VideoSourceConfig) -> None:
        super().__init__()
        self.config = config
        # Only the capture call sees the credentials; `uri` is what frames, events, logs, metrics and
        # thread names carry, so none of them can leak an RTSP password.
        self._capture_uri = str(config.uri)
        self.uri = redact(config.uri)
        self.kind = uri_kind(config.uri)
        self._supervisor: threading.Thread | None = None
        if self.kind == "file" and not Path(self.uri).is_file():
            raise ConfigError(f"video source {self.uri}: file not found")

    @property
    def lossless(self) -> bool:
        return self.kind == "file" and not self.config.realtime

    def start(self) -> None:
        if self._supervisor is not None:
            return
        if self.kind == "file":
            self._probe_file()
        self._stop.clear()
        self._slot.reopen()
        self._supervisor = threading.Thread(target=self._supervise, name="video-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        self._stop.set()
        self._slot.close()
        if self._supervisor is not None:
            self._supervisor.join(timeout=self.config.read_timeout_s + WATCHDOG_SLACK_S)
            self._supervisor = None

    def __enter__(self) -> VideoSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by sessions -------------------------------------------------------------------------------

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def _next_index(self) -> int:
        with self._lock:
            self._index += 1
            return self._index

    def _deliver(self, frame: Frame) -> None:
        self._count("frames_in")
        self._slot.put(frame)

    def _open_capture(self) -> Any:
        import cv2

        config = self.config
        if self.kind == "device":
            device: int | str = config.uri if isinstance(config.uri, int) else str(config.uri)
            cap = cv2.VideoCapture(device, cv2.CAP_ANY)
            if cap.isOpened():
                # Fewer frames queued in the driver means fresher frames; not every backend supports it.
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
                if config.width:
                    cap.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
                if config.height:
                    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
            return cap
        if not _has_ffmpeg_backend():
            # Some device builds of OpenCV (GStreamer only) lack FFmpeg; the watchdog still bounds every call.
            return cv2.VideoCapture(self._capture_uri, cv2.CAP_ANY)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(config.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(config.read_timeout_s * 1000),
        ]
        cap = cv2.VideoCapture(self._capture_uri, cv2.CAP_FFMPEG, params)
        if cap.isOpened() and self.kind == "stream":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def _probe_file(self) -> None:
        """Fail at startup, in one line, for a file that is missing or not a video OpenCV can decode."""
        import cv2

        if not os.path.isfile(self.uri):
            raise ConfigError(f"video source {self.uri}: file not found")
        cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG if _has_ffmpeg_backend() else cv2.CAP_ANY)
        try:
            if not cap.isOpened() or not cap.grab():
                raise ConfigError(f"video source {self.uri}: OpenCV cannot decode this file as video")
        finally:
            cap.release()

    # -- supervisor -------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        config = self.config
        failures = 0
        number = 0
        while not self._stop.is_set():
            session = _Session(self, number)
            number += 1
            session.thread.start()
            while session.thread.is_alive() and not self._stop.is_set():
                session.thread.join(SUPERVISOR_POLL_S)
                if session.stuck(time.monotonic()):
                    session.abandoned = True
                    session.outcome = "stuck"
                    self._count("read_errors")
                    log.warning("video source %s: capture stuck, abandoning it", self.uri)
                    break
            if self._stop.is_set():
                session.thread.join(timeout=1.0)  # release the capture before stop() returns, if it can
                break
            if session.outcome == "eof" and session.delivered > 0:
                if not config.loop:
                    self._finished = True
                    self._slot.close()
                    return
                failures = 0
                continue  # a looping file restarts at once; that is not a reconnect
            if session.delivered > 0:
                failures = 0
            self.last_error = f"video source {self.uri}: {session.outcome.replace('_', ' ')}"
            delay = min(config.reconnect_max_s, config.reconnect_min_s * (2**failures))
            failures += 1
            log.info("%s; reconnecting in %.1f s", self.last_error, delay)
            if self._stop.wait(delay):
                break
            self._count("reconnects")


def check(config: VideoSourceConfig) -> list[Finding]:
    """A file must exist and decode, a device node must exist and be readable; a stream is only reached
    when the daemon runs."""
    kind = uri_kind(config.uri)
    if kind == "stream":
        return [
            Finding(
                "uri",
                f"video source {redact(config.uri)}: a stream is not tried before the daemon runs",
                False,
            )
        ]
    if kind == "device":
        node = f"/dev/video{config.uri}" if isinstance(config.uri, int) else str(config.uri)
        if not os.path.exists(node):
            return [Finding("uri", f"video source {node}: no such device")]
        if not os.access(node, os.R_OK | os.W_OK):
            return [Finding("uri", f"video source {node}: this user may not open it (group video?)")]
        return []
    import cv2

    quiet = (
        cv2.utils.logging.LOG_LEVEL_ERROR
    )  # a file that is not a video is said once, here, not by OpenCV too
    louder = cv2.utils.logging.setLogLevel(quiet)
    try:
        VideoSource(config)._probe_file()
    except ConfigError as exc:
        return [Finding("uri", str(exc))]
    finally:
        cv2.utils.logging.setLogLevel(louder)
    return []


PLUGIN = SourcePlugin(key="video", config=VideoSourceConfig, source=VideoSource, check=check)
