"""Video sources with real OpenCV decoding: clips written from real photos, HTTP MJPEG streams.

Clips carry their frame number as a block stamp (tests/assets_media.py), so each test checks which
frame OpenCV actually decoded, not just a counter. Every wait is bounded.
"""

from __future__ import annotations

import http.server
import itertools
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from edge.errors import ConfigError
from edge.sources import Frame, LatestFrameSlot, SourceConfig, open_source
from edge.sources.camera import VideoSource, VideoSourceConfig
from tests.assets_media import draw_stamp, labelled_clip, make_clip, photo, read_stamp


def read_for(source: object, seconds: float, step: float = 0.2) -> list[Frame]:
    frames: list[Frame] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        frame = source.read(step)  # type: ignore[attr-defined]
        if frame is not None:
            frames.append(frame)
        elif source.finished:  # type: ignore[attr-defined]
            break
    return frames


def wait_until(predicate: object, seconds: float) -> bool:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]


@pytest.fixture(scope="module")
def clip_20fps(cache_dir: Path) -> Path:
    return make_clip(None, ["chelsea", "coffee"], fps=20, seconds=1.5, codec="mp4v", stamp=True)


def test_latest_frame_slot_keeps_only_the_newest() -> None:
    slot = LatestFrameSlot()
    image = np.zeros((2, 2, 3), np.uint8)
    for index in range(10):
        slot.put(Frame(image, index, time.time(), time.monotonic(), "mem"))
    newest = slot.take(0.0)
    assert newest is not None and newest.index == 9
    assert slot.dropped == 9
    assert slot.take(0.0) is None  # nothing stale is left behind
    started = time.monotonic()
    assert slot.take(0.2) is None
    assert 0.15 <= time.monotonic() - started < 2.0
    slot.close()
    started = time.monotonic()
    assert slot.take(5.0) is None  # closing wakes a reader at once
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("codec", ["mp4v", "mjpg"])
def test_file_frames_arrive_in_order_then_finish(codec: str, cache_dir: Path) -> None:
    clip = make_clip(None, ["chelsea", "rocket"], fps=20, seconds=1.5, codec=codec, stamp=True)
    source = open_source({"type": "video", "uri": str(clip), "loop": False})
    source.start()
    try:
        frames = read_for(source, 10)
    finally:
        source.stop()
    assert source.finished
    stats = source.stats
    assert stats["frames_in"] == 30
    assert len(frames) + stats["frames_dropped"] == 30
    assert len(frames) >= 20
    assert [read_stamp(frame.data) for frame in frames] == [frame.index for frame in frames]
    assert [frame.index for frame in frames] == sorted({frame.index for frame in frames})
    monos = [frame.captured_mono for frame in frames]
    assert all(later > earlier for earlier, later in itertools.pairwise(monos))
    assert frames[0].data.shape == (240, 320, 3) and frames[0].data.dtype == np.uint8
    assert frames[0].uri == str(clip)
    # played like a camera at the file's 20 fps, not dumped at decoding speed
    assert monos[-1] - monos[0] >= 0.8 * (frames[-1].index - frames[0].index) / 20


def test_fps_cap_on_a_realtime_file(cache_dir: Path) -> None:
    clip = make_clip(None, ["coffee"], fps=30, seconds=3, codec="mjpg", stamp=True)
    source = VideoSource(VideoSourceConfig(uri=str(clip), fps=5))
    source.start()
    try:
        frames = read_for(source, 10)
    finally:
        source.stop()
    assert source.finished
    # 3 s of video at a 5 fps cap: about 15 frames, the rest skipped before retrieve (not "dropped")
    assert 11 <= source.stats["frames_in"] <= 17
    assert source.stats["frames_dropped"] == 0
    gaps = [later.index - earlier.index for earlier, later in itertools.pairwise(frames)]
    assert all(gap >= 5 for gap in gaps), gaps
    assert [read_stamp(frame.data) for frame in frames] == [frame.index for frame in frames]


def test_fps_cap_without_realtime_plays_every_frame_at_the_cap(clip_20fps: Path) -> None:
    source = VideoSource(VideoSourceConfig(uri=str(clip_20fps), fps=40, realtime=False))
    source.start()
    try:
        frames = read_for(source, 10)
    finally:
        source.stop()
    assert source.finished
    assert [frame.index for frame in frames] == list(range(30))  # none skipped
    assert [read_stamp(frame.data) for frame in frames] == list(range(30))
    elapsed = frames[-1].captured_mono - frames[0].captured_mono
    assert elapsed >= 0.8 * 29 / 40


def test_file_at_full_speed_goes_at_the_readers_pace(clip_20fps: Path) -> None:
    source = VideoSource(VideoSourceConfig(uri=str(clip_20fps), realtime=False))
    source.start()
    frames: list[Frame] = []
    try:
        while len(frames) < 30:
            frame = source.read(5)
            if frame is None:
                break
            frames.append(frame)
            if len(frames) % 10 == 0:
                time.sleep(0.3)  # a slow model: a file has no clock, so nothing is skipped meanwhile
        assert source.read(2) is None
    finally:
        source.stop()
    assert source.finished
    assert [read_stamp(frame.data) for frame in frames] == list(range(30))
    assert source.stats["frames_dropped"] == 0


def frames_captured_within(source: VideoSource, window: float) -> list[Frame]:
    """Every frame read whose capture time falls within `window` seconds of the first one's.

    Reads go on past the window (or until the file ends), so the count does not depend on when the
    reader happened to stop; only the source's pacing decides which capture times land in the window.
    """
    first = source.read(10)
    assert first is not None, source.stats
    frames = [first]
    until = time.monotonic() + window + 1.0
    while time.monotonic() < until:
        frame = source.read(0.2)
        if frame is not None:
            frames.append(frame)
        elif source.finished:
            break
    return [frame for frame in frames if frame.captured_mono - first.captured_mono <= window]


# Bounds are loose on purpose (the machine is shared): each case must only stay apart from the others.
PACING_CASES = {
    # realtime false + fps 5 on a 25 fps clip: every frame, one per 0.2 s -> ~10 in 2 s
    "fps_cap_on_a_file": ({"realtime": False, "fps": 5}, 25, 5, 15),
    # realtime true on a 10 fps clip: the file's own rate -> ~20 in 2 s
    "realtime_at_the_files_rate": ({"realtime": True}, 10, 10, 30),
    # realtime true + fps 5 on a 25 fps clip: the file's clock, frames over the cap skipped -> ~10 in 2 s
    "realtime_with_a_cap": ({"realtime": True, "fps": 5}, 25, 5, 15),
    # realtime false, no fps: decoded flat out for benchmarks -> far more than any paced case
    "flat_out": ({"realtime": False}, 25, 60, None),
}


@pytest.mark.parametrize("case", list(PACING_CASES))
def test_file_pacing_over_a_two_second_window(case: str, cache_dir: Path) -> None:
    options, clip_fps, at_least, at_most = PACING_CASES[case]
    clip = make_clip(None, ["chelsea", "rocket"], fps=clip_fps, seconds=8, codec="mjpg", stamp=True)
    source = VideoSource(VideoSourceConfig(uri=str(clip), **options))
    source.start()
    try:
        frames = frames_captured_within(source, 2.0)
    finally:
        source.stop()
    assert len(frames) >= at_least, (case, len(frames), source.stats)
    if at_most is not None:
        assert len(frames) <= at_most, (case, len(frames), source.stats)
    assert [read_stamp(frame.data) for frame in frames] == [frame.index for frame in frames]
    steps = {later.index - earlier.index for earlier, later in itertools.pairwise(frames)}
    if options.get("realtime") and "fps" in options:
        assert min(steps) >= 3, steps  # 25 fps capped at 5: about four of every five frames skipped
    elif options.get("realtime") is False:
        assert steps == {1}, steps  # a file not played in real time skips nothing


def test_slow_consumer_gets_the_newest_frame_only(cache_dir: Path) -> None:
    clip = make_clip(None, ["astronaut"], fps=30, seconds=2, codec="mjpg", stamp=True)
    source = VideoSource(VideoSourceConfig(uri=str(clip), loop=True))
    source.start()
    try:
        assert source.read(5) is not None
        seen = []
        for _ in range(3):
            slept_at = time.monotonic()
            time.sleep(0.6)  # a slow model
            frame = source.read(2)
            assert frame is not None
            # a stale frame would have been captured just after the previous read, ~0.6 s ago
            assert frame.captured_mono > slept_at + 0.3
            assert read_stamp(frame.data) == frame.index % 60
            seen.append(frame.index)
    finally:
        source.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
    assert all(gap >= 9 for gap in gaps), seen  # ~18 frames were produced between reads
    assert source.stats["frames_dropped"] >= 20


def test_looping_file_restarts_and_never_finishes(clip_20fps: Path) -> None:
    source = VideoSource(VideoSourceConfig(uri=str(clip_20fps), loop=True))
    source.start()
    try:
        frames = read_for(source, 2.5)
    finally:
        source.stop()
    assert not source.finished
    assert frames[-1].index >= 35  # past the 30 frames of one pass
    assert [read_stamp(frame.data) for frame in frames] == [frame.index % 30 for frame in frames]
    assert source.stats["reconnects"] == 0


def test_file_that_vanishes_and_comes_back_is_reconnected(clip_20fps: Path, tmp_path: Path) -> None:
    path = tmp_path / "camera.mp4"
    shutil.copy(clip_20fps, path)
    config = VideoSourceConfig(uri=str(path), loop=True, reconnect_min_s=0.2, reconnect_max_s=0.4)
    source = VideoSource(config)
    source.start()
    try:
        assert source.read(5) is not None
        path.unlink()  # the open capture plays out its pass, then reopening fails
        longest_read = 0.0
        until = time.monotonic() + 6
        while source.stats["reconnects"] < 2 and time.monotonic() < until:
            started = time.monotonic()
            source.read(0.2)
            longest_read = max(longest_read, time.monotonic() - started)
        assert source.stats["reconnects"] >= 2
        assert longest_read < 1.0  # read() is bounded by its timeout while the file is gone
        assert source.read(0.5) is None
        assert not source.finished
        shutil.copy(clip_20fps, path)
        frame = source.read(5)
        assert frame is not None, source.stats
        assert read_stamp(frame.data) == 0  # the file starts again from its first frame
    finally:
        source.stop()


def test_missing_or_undecodable_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"video source .*nowhere\.mp4: file not found"):
        open_source({"type": "video", "uri": str(tmp_path / "nowhere.mp4")})
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video\n")
    source = open_source({"type": "video", "uri": str(bogus)})
    with pytest.raises(ConfigError, match=r"notes\.mp4: OpenCV cannot decode") as caught:
        source.start()
    assert "\n" not in str(caught.value)


def test_video_config_validation() -> None:
    adapter: TypeAdapter[object] = TypeAdapter(SourceConfig)
    design_example = adapter.validate_python(
        {"type": "video", "uri": "rtsp://cam/stream", "fps": 5, "loop": False}
    )
    assert isinstance(design_example, VideoSourceConfig) and design_example.fps == 5
    parsed = adapter.validate_python({"type": "video", "uri": "2"})
    assert isinstance(parsed, VideoSourceConfig) and parsed.uri == 2  # a camera index
    with pytest.raises(ValidationError, match="fps"):
        adapter.validate_python({"type": "video", "uri": "a.mp4", "fps": 0})
    with pytest.raises(ValidationError, match="framerate"):
        adapter.validate_python({"type": "video", "uri": "a.mp4", "framerate": 5})
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        VideoSourceConfig(uri="rtsp://cam/stream", reconnect_min_s=5, reconnect_max_s=1)


# -- live HTTP streams ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MjpegServer:
    """A camera-like multipart/x-mixed-replace MJPEG server; frames carry a running number stamp."""

    def __init__(self, port: int, fps: float = 20.0) -> None:
        self.port = port
        self.fps = fps
        self.frame_number = 0
        self._image = photo("chelsea")
        self._server: http.server.ThreadingHTTPServer | None = None
        self._closing = threading.Event()

    def start(self) -> MjpegServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not outer._closing.is_set():
                        _ok, jpeg = cv2.imencode(".jpg", draw_stamp(outer._image, outer.frame_number))
                        body = jpeg.tobytes()
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body)
                            + body
                            + b"\r\n"
                        )
                        outer.frame_number += 1
                        time.sleep(1 / outer.fps)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._closing.clear()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


@pytest.fixture
def mjpeg_server() -> Iterator[MjpegServer]:
    server = MjpegServer(free_port()).start()
    yield server
    server.stop()


def test_http_mjpeg_stream_drops_and_reconnects(mjpeg_server: MjpegServer) -> None:
    config = VideoSourceConfig(
        uri=mjpeg_server.url, open_timeout_s=2, read_timeout_s=1, reconnect_min_s=0.2, reconnect_max_s=0.5
    )
    source = open_source(config)
    source.start()
    try:
        frames = read_for(source, 1.5)
        assert len(frames) >= 5
        stamps = [read_stamp(frame.data) for frame in frames]
        assert stamps == sorted(set(stamps))  # in order, never a repeat
        mjpeg_server.stop()  # the camera reboots
        assert wait_until(lambda: source.stats["reconnects"] >= 1, 8), source.stats
        started = time.monotonic()
        assert source.read(0.5) is None
        assert time.monotonic() - started < 1.5
        mjpeg_server.start()  # same port
        frame = source.read(8)
        assert frame is not None, source.stats
        assert frame.index > frames[-1].index
        assert not source.finished
    finally:
        source.stop()


def test_stalled_stream_never_hangs_read(tmp_path: Path) -> None:
    """A server that accepts and then says nothing: FFmpeg's timeouts end the attempt, retries are counted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered

    threading.Thread(target=accept_forever, daemon=True).start()
    config = VideoSourceConfig(
        uri=f"http://127.0.0.1:{port}/stream", open_timeout_s=0.5, read_timeout_s=0.5, reconnect_min_s=0.1
    )
    source = open_source(config)
    source.start()
    try:
        started = time.monotonic()
        assert source.read(0.3) is None
        assert time.monotonic() - started < 1.0
        assert wait_until(lambda: source.stats["reconnects"] >= 1, 10), source.stats
        assert wait_until(lambda: len(accepted) >= 2, 5)  # the retry's accept may land a moment later
    finally:
        source.stop()
        listener.close()
        for conn in accepted:
            conn.close()


class _HangingCaptureSource(VideoSource):
    """Fault injection: a backend that blocks inside open and ignores its timeout, as some drivers do."""

    def __init__(self, config: VideoSourceConfig) -> None:
        super().__init__(config)
        self.release = threading.Event()
        self.opens = 0

    def _open_capture(self) -> object:
        self.opens += 1
        if self.opens == 1:
            self.release.wait(30)
        return super()._open_capture()


def test_watchdog_abandons_a_capture_stuck_in_opencv(
    clip_20fps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edge.sources.camera.WATCHDOG_SLACK_S", 0.3)
    config = VideoSourceConfig(uri=str(clip_20fps), open_timeout_s=0.2, reconnect_min_s=0.1, loop=True)
    source = _HangingCaptureSource(config)
    source.start()
    try:
        frame = source.read(5)
        assert frame is not None, source.stats  # served by a fresh session while the first is still stuck
        assert source.stats["read_errors"] >= 1
        assert source.stats["reconnects"] >= 1
        assert source.opens >= 2
    finally:
        source.release.set()
        source.stop()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary (apt install ffmpeg)")
def test_ffmpeg_served_stream_restarts(clip_20fps: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/live.mjpg"
    command = [
        "ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip_20fps),
        "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", url,
    ]  # fmt: skip

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    server = serve()
    config = VideoSourceConfig(
        uri=url, open_timeout_s=2, read_timeout_s=1, reconnect_min_s=0.2, reconnect_max_s=0.5
    )
    source = open_source(config)
    try:
        time.sleep(0.3)  # ffmpeg opens its listening socket
        source.start()
        frames = read_for(source, 2)
        assert len(frames) >= 5, source.stats
        stamps = [read_stamp(frame.data) for frame in frames]
        assert all(later != earlier for earlier, later in itertools.pairwise(stamps))
        server.terminate()
        server.wait(timeout=5)
        assert wait_until(lambda: source.stats["reconnects"] >= 1, 8), source.stats
        server = serve()
        frame = source.read(10)
        assert frame is not None, source.stats
        assert frame.index > frames[-1].index
    finally:
        source.stop()
        server.terminate()
        server.wait(timeout=5)


def test_labelled_clip_shows_the_cat_where_it_says() -> None:
    clip = labelled_clip()
    cat_frames = [index for index in range(clip.frame_count) if clip.is_cat(index)]
    assert 0 < len(cat_frames) < clip.frame_count
    cat = photo("chelsea").astype(np.float32)
    capture = cv2.VideoCapture(str(clip.path))
    try:
        for index in range(clip.frame_count):
            ok, image = capture.read()
            assert ok
            distance = float(np.abs(image.astype(np.float32) - cat).mean())
            assert (distance < 12) == clip.is_cat(index), (index, clip.photo_at(index), distance)
    finally:
        capture.release()


def test_a_file_capped_by_fps_but_read_slowly_still_skips_no_frame(clip_20fps: Path) -> None:
    """`fps` caps how fast a non-realtime file is read; a reader slower than the cap gets every frame
    (the file is lossless), not the newest one."""
    source = VideoSource(VideoSourceConfig(uri=str(clip_20fps), realtime=False, loop=False, fps=200))
    assert source.lossless
    source.start()
    frames: list[Frame] = []
    try:
        while True:
            frame = source.read(0.5)
            if frame is not None:
                frames.append(frame)
                time.sleep(0.02)  # slower than the 5 ms the cap allows
            elif source.finished:  # checked only after an empty read: the last frame may be waiting
                break
    finally:
        source.stop()
    assert source.stats["frames_dropped"] == 0
    assert [f.index for f in frames] == list(range(len(frames))) and len(frames) == source.stats["frames_in"]
