"""Load (issue 7): several sources into one daemon, several daemons into one broker, counted per source and
per device by the counting subscriber.

1. Three file cameras (copies of one finite clip, so three URIs) into one daemon: one model session
   serves them all through the shared frame queue.
2. Three daemons (three devices, three outboxes) replaying a finite sensor file into one broker.

`produced` is exact per device (the outbox's seq counter) and `missing` is the seqs the subscriber never
received: a prediction lost after inference. Per camera, `produced` counts the predictions that carry its
URI (exact while nothing is missing); frames that never reached inference because a newer one replaced
them (newest frame wins, by design) are `skipped`, in the note, not missing.

Per stream: throughput (predictions/s between its first and last arrival) and p50/p99 of the payload's
own `latency_ms.capture_to_publish`. benchmarks/load_bench.py runs the same at a larger size.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.broker import Mosquitto
from tests.faults.counting import CountingSubscriber, ScenarioResult
from tests.faults.daemon_proc import DEVICE, DaemonProcess, fault_config, read_outbox
from tests.faults.report import record


@dataclass
class StreamFigures:
    """One source of one daemon, or one daemon of several."""

    name: str
    produced: int
    delivered: int
    missing: int
    duplicated: int
    dropped: int
    offered: int
    skipped: int
    per_second: float
    p50_ms: float
    p99_ms: float

    def result(self, scenario: str, note: str = "") -> ScenarioResult:
        return record(
            ScenarioResult(
                scenario=f"{scenario}: {self.name}",
                produced=self.produced,
                delivered=self.delivered,
                missing=self.missing,
                duplicated=self.duplicated,
                dropped_counted=self.dropped,
                recovery_s=None,
                note=f"{self.offered} frames offered, {self.skipped} skipped before inference; "
                f"{self.per_second:.1f} predictions/s; capture to publish p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms{note}",
            )
        )


class Arrivals:
    """Every payload the counting subscriber receives, keyed by device and by source URI."""

    def __init__(self, counter: CountingSubscriber):
        self._lock = threading.Lock()
        # key -> [(arrival monotonic, seq, frame index, capture_to_publish ms)]
        self.by_source: dict[str, list[tuple[float, int, int, float]]] = defaultdict(list)
        self.by_device: dict[str, list[tuple[float, int, int, float]]] = defaultdict(list)
        counter.on_payload = self.add

    def add(self, payload: dict[str, Any]) -> None:
        row = (
            time.monotonic(),
            int(payload["seq"]),
            int(payload["source"]["frame"]),
            float(payload["latency_ms"]["capture_to_publish"]),
        )
        with self._lock:
            self.by_source[payload["source"]["uri"]].append(row)
            self.by_device[payload["device_id"]].append(row)

    def figures(
        self, rows: list[tuple[float, int, int, float]], name: str, offered: int, **counts: int
    ) -> StreamFigures:
        with self._lock:
            rows = list(rows)
        arrived = [r[0] for r in rows]
        span = max(arrived) - min(arrived) if len(arrived) > 1 else float("nan")
        latency = np.asarray([r[3] for r in rows] or [np.nan], np.float64)
        return StreamFigures(
            name=name,
            offered=offered,
            skipped=offered - len({r[2] for r in rows}),
            per_second=(len({r[1] for r in rows}) - 1) / span if span > 0 else float("nan"),
            p50_ms=float(np.percentile(latency, 50)),
            p99_ms=float(np.percentile(latency, 99)),
            **counts,
        )


def cameras_into_one_daemon(
    workdir: Path,
    broker: Mosquitto,
    counter: CountingSubscriber,
    daemons: list[DaemonProcess],
    *,
    cameras: int,
    fps: float,
    seconds_per_photo: float,
) -> list[StreamFigures]:
    """`cameras` finite clips (fps 0: as fast as each decodes) into one daemon, which exits at their end."""
    from tests.assets_media import labelled_clip

    clip = labelled_clip(fps=10.0, seconds_per_photo=seconds_per_photo)
    paths = []
    for n in range(1, cameras + 1):
        paths.append(workdir / f"cam-{n}.mp4")
        shutil.copy(clip.path, paths[-1])
    sources = [
        {"type": "video", "uri": str(path), "loop": False, "realtime": False, **({"fps": fps} if fps else {})}
        for path in paths
    ]
    arrivals = Arrivals(counter)
    config = fault_config(workdir, broker.port, windows=0, rate=0, loop=False, sources=sources)
    daemon = DaemonProcess(config, workdir)
    daemons.append(daemon)
    daemon.start()
    daemon.wait_ready()
    assert daemon.wait_exit(600) == 0, daemon.log_tail()  # every file played out, the outbox flushed
    state = read_outbox(daemon.outbox_path)
    produced = state["next_seq"] - 1
    counter.wait_for(DEVICE, produced, 30)
    device = counter.snapshot(DEVICE)
    figures = []
    for path in paths:
        rows = arrivals.by_source[str(path)]
        seqs = {r[1] for r in rows}
        figures.append(
            arrivals.figures(
                rows,
                path.name,
                offered=clip.frame_count,
                produced=len(seqs),
                delivered=len(seqs),
                missing=0,
                duplicated=len(rows) - len(seqs),
                dropped=0,
            )
        )
    figures.append(
        arrivals.figures(
            arrivals.by_device[DEVICE],
            f"all {cameras} (device {DEVICE})",
            offered=cameras * clip.frame_count,
            produced=produced,
            delivered=len(device.seqs & set(range(1, produced + 1))),
            missing=len(device.missing(1, produced)),
            duplicated=device.duplicates,
            dropped=state["dropped"],
        )
    )
    # Frame indexes repeat across cameras: the device row's `skipped` must count (uri, frame) pairs.
    figures[-1].skipped = sum(f.skipped for f in figures[:-1])
    return figures


def daemons_into_one_broker(
    workdir: Path,
    broker: Mosquitto,
    counter: CountingSubscriber,
    daemons: list[DaemonProcess],
    *,
    count: int,
    windows: int,
    rate: float,
) -> list[StreamFigures]:
    """`count` daemons, each replaying `windows` sensor windows at `rate`/s once, into one broker."""
    arrivals = Arrivals(counter)
    started = []
    for n in range(1, count + 1):
        home = workdir / f"daemon-{n}"
        home.mkdir()
        config = fault_config(
            home, broker.port, windows=windows, rate=rate, loop=False, device_id=f"load-{n:02d}"
        )
        daemons.append(DaemonProcess(config, home))
        started.append(daemons[-1].start())
    figures = []
    for n, daemon in enumerate(started, 1):
        assert daemon.wait_exit(600) == 0, daemon.log_tail()
        assert daemon.notify.lines("READY=1"), daemon.log_tail()
        state = read_outbox(daemon.outbox_path)
        produced = state["next_seq"] - 1
        device = f"load-{n:02d}"
        counter.wait_for(device, produced, 30)
        count_ = counter.snapshot(device)
        figures.append(
            arrivals.figures(
                arrivals.by_device[device],
                device,
                offered=windows,
                produced=produced,
                delivered=len(count_.seqs & set(range(1, produced + 1))),
                missing=len(count_.missing(1, produced)),
                duplicated=count_.duplicates,
                dropped=state["dropped"],
            )
        )
    return figures


def test_three_cameras_share_one_daemon_and_lose_nothing(
    tmp_path: Path, broker: Mosquitto, counter: CountingSubscriber, daemons: list[DaemonProcess]
) -> None:
    fps = 25.0
    figures = cameras_into_one_daemon(
        tmp_path, broker, counter, daemons, cameras=3, fps=fps, seconds_per_photo=1.0
    )
    for stream in figures:
        stream.result("L1. 3 cameras -> 1 daemon", f"; {fps:g} fps offered per camera")
    *cams, device = figures
    assert device.missing == 0 and device.duplicated == 0 and device.dropped == 0, device
    assert device.produced == sum(cam.produced for cam in cams) == device.offered - device.skipped
    for cam in cams:
        assert cam.produced > cam.offered // 2 and cam.duplicated == 0, cam
        assert 0 <= cam.p50_ms <= cam.p99_ms < 60_000, cam


def test_three_daemons_share_one_broker_and_lose_nothing(
    tmp_path: Path, broker: Mosquitto, counter: CountingSubscriber, daemons: list[DaemonProcess]
) -> None:
    windows, rate = 400, 100.0
    figures = daemons_into_one_broker(tmp_path, broker, counter, daemons, count=3, windows=windows, rate=rate)
    for stream in figures:
        stream.result("L2. 3 daemons -> 1 broker", f"; sensor {rate:g} windows/s each")
    for stream in figures:
        assert stream.produced == stream.offered - stream.skipped > windows // 2, stream
        assert stream.missing == 0 and stream.duplicated == 0 and stream.dropped == 0, stream
        assert 0 <= stream.p50_ms <= stream.p99_ms < 60_000, stream
