"""Soak: camera inference at 10 fps from a looping clip for N minutes, with the broker restarted every M
minutes, against a private mosquitto on a free port. Not part of CI.

    python benchmarks/soak.py [--minutes 30] [--restart-every 5] [--outage-s 5] [--fps 10] [--out DIR]

The daemon is a real `edge-infer run` process (tests/faults/daemon_proc.py) serving the tiny image
classifier (tests/daemon_helpers.py) on a cached labelled clip; a counting subscriber (QoS 1, persistent
session) records every seq. Sampled over time: the daemon's RSS, the payload's own capture-to-publish
latency (`latency_ms.capture_to_publish`, capture to outbox) and capture-to-delivery (subscriber arrival
minus `source.captured_at`, same host clock, so it includes the broker outages).

At the end it prints produced/delivered/missing/duplicated, the RSS slope (MiB/hour, least squares over
the samples after the first minute of warm-up, and over the second half alone), latency p50/p99 per
minute, and writes `report.md`, `soak.png` (RSS and latency over time, restarts marked) and
`summary.json` to DIR (default $EDGE_CACHE/soak). Exit status 1 when a prediction is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.assets_media import labelled_clip  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.faults.counting import CountingSubscriber  # noqa: E402
from tests.faults.daemon_proc import (  # noqa: E402
    DEVICE,
    PREFIX,
    DaemonProcess,
    fault_config,
    read_outbox,
    rss_bytes,
)

RSS_SAMPLE_S = 2.0
WARMUP_S = 60.0


def default_out() -> Path:
    return Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime")) / "soak"


@dataclass
class Samples:
    """Everything measured over the run, in seconds since the daemon was started."""

    t0_mono: float = 0.0
    t0_wall: float = 0.0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    # (capture t, payload capture_to_publish ms, capture-to-delivery ms)
    latency: list[tuple[float, float, float]] = field(default_factory=list)
    restarts: list[dict[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_payload(self, payload: dict[str, Any]) -> None:
        arrived = time.time()
        try:
            captured = datetime.fromisoformat(payload["source"]["captured_at"]).timestamp()
            in_daemon = float(payload["latency_ms"]["capture_to_publish"])
        except (KeyError, TypeError, ValueError):
            return
        with self.lock:
            self.latency.append((captured - self.t0_wall, in_daemon, (arrived - captured) * 1e3))


def rss_slope_mib_per_hour(rss: list[tuple[float, float]], warmup_s: float = WARMUP_S) -> float:
    """Least-squares slope of RSS over time, ignoring the warm-up (arenas, caches and paho buffers)."""
    points = [(t, mib) for t, mib in rss if t >= warmup_s] or rss
    if len(points) < 2:
        return float("nan")
    t, mib = np.asarray(points, np.float64).T
    return float(np.polyfit(t / 3600.0, mib, 1)[0])


def per_minute(latency: list[tuple[float, float, float]]) -> list[dict[str, float]]:
    """p50/p99 of both latencies for each minute of capture time."""
    if not latency:
        return []
    arr = np.asarray(latency, np.float64)
    minutes = np.floor(np.maximum(arr[:, 0], 0) / 60.0).astype(int)
    rows = []
    for minute in range(int(minutes.max()) + 1):
        chosen = arr[minutes == minute]
        if len(chosen) == 0:
            continue
        rows.append(
            {
                "minute": minute,
                "n": len(chosen),
                "publish_p50": float(np.percentile(chosen[:, 1], 50)),
                "publish_p99": float(np.percentile(chosen[:, 1], 99)),
                "delivery_p50": float(np.percentile(chosen[:, 2], 50)),
                "delivery_p99": float(np.percentile(chosen[:, 2], 99)),
            }
        )
    return rows


def plot(samples: Samples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if samples.rss:
        t, mib = np.asarray(samples.rss).T
        ax_rss.plot(t / 60.0, mib, lw=1, color="tab:blue")
    ax_rss.set_ylabel("daemon RSS (MiB)")
    ax_rss.set_title("edge-infer soak: RSS and latency (broker restarts in red)")
    if samples.latency:
        arr = np.asarray(samples.latency)
        ax_lat.plot(arr[:, 0] / 60.0, arr[:, 2], ".", ms=1, alpha=0.4, label="capture to delivery")
        ax_lat.plot(arr[:, 0] / 60.0, arr[:, 1], ".", ms=1, alpha=0.4, label="capture to publish (payload)")
        ax_lat.set_yscale("log")
        ax_lat.legend(loc="upper right", markerscale=8)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("minutes")
    for restart in samples.restarts:
        for ax in (ax_rss, ax_lat):
            ax.axvspan(restart["stopped"] / 60.0, restart["started"] / 60.0, color="red", alpha=0.3)
            ax.axvline(restart["started"] / 60.0, color="red", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(summary: dict[str, Any], minutes: list[dict[str, float]]) -> str:
    counts = summary["counts"]
    lines = [
        "# Soak: camera inference with periodic broker restarts",
        "",
        f"Measured {summary['started']} on {summary['host']} ({os.cpu_count()} CPUs): "
        f"{summary['minutes']:g} min at {summary['fps']:g} fps (tiny image classifier, looping clip), "
        f"broker SIGTERM + {summary['outage_s']:g} s outage every {summary['restart_every']:g} min "
        f"({len(summary['restarts'])} restarts), QoS 1.",
        "",
        "| produced | delivered | missing | duplicated | dropped (counted) "
        "| RSS start | RSS end | RSS slope | RSS slope, 2nd half |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {counts['produced']} | {counts['delivered']} | {counts['missing']} | {counts['duplicated']} "
        f"| {counts['dropped']} | {summary['rss_first_mib']:.1f} MiB | {summary['rss_last_mib']:.1f} MiB "
        f"| {summary['rss_slope_mib_per_hour']:+.2f} MiB/h "
        f"| {summary['rss_slope_second_half_mib_per_hour']:+.2f} MiB/h |",
        "",
        "Broker restarts (recovery = broker back to the next new seq delivered): "
        + (
            ", ".join(f"{r['started'] / 60:.1f} min: {r['recovery_s']:.1f} s" for r in summary["restarts"])
            or "none"
        ),
        "",
        "Latency per minute of capture time, ms (publish = the payload's `capture_to_publish`, capture to "
        "outbox; delivery = subscriber arrival - `captured_at`, includes the broker outages):",
        "",
        "| minute | predictions | publish p50 | publish p99 | delivery p50 | delivery p99 |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {m['minute']} | {m['n']} | {m['publish_p50']:.1f} | {m['publish_p99']:.1f} "
            f"| {m['delivery_p50']:.1f} | {m['delivery_p99']:.1f} |"
            for m in minutes
        ),
        "",
        "![RSS and latency over time](soak.png)",
        "",
    ]
    return "\n".join(lines)


def run(minutes: float, restart_every: float, outage_s: float, fps: float, out: Path) -> dict[str, Any]:
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0)
    source = {"type": "video", "uri": str(clip.path), "fps": fps, "loop": True, "realtime": True}
    broker = Mosquitto(work / "broker").start()
    samples = Samples()
    counter = CountingSubscriber(broker.port, prefix=PREFIX, client_id="soak-counter")
    counter.on_payload = samples.on_payload
    daemon: DaemonProcess | None = None
    started_text = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        counter.start()
        config = fault_config(work, broker.port, windows=0, rate=0, loop=True, source=source)
        daemon = DaemonProcess(config, work)
        samples.t0_mono, samples.t0_wall = time.monotonic(), time.time()
        daemon.start()
        daemon.wait_ready()
        assert daemon.proc is not None
        end = samples.t0_mono + minutes * 60.0
        next_restart = samples.t0_mono + restart_every * 60.0
        next_report = samples.t0_mono + 60.0
        while (now := time.monotonic()) < end:
            if not daemon.running:
                raise RuntimeError(f"the daemon exited during the soak:\n{daemon.log_tail()}")
            samples.rss.append((now - samples.t0_mono, rss_bytes(daemon.proc.pid) / 2**20))
            if restart_every > 0 and now >= next_restart and now + outage_s < end:
                samples.restarts.append(restart_broker(broker, counter, samples, outage_s))
                next_restart += restart_every * 60.0
            if now >= next_report:
                count = counter.snapshot(DEVICE)
                print(
                    f"  {(now - samples.t0_mono) / 60:5.1f} min: {len(count.seqs)} delivered, "
                    f"RSS {samples.rss[-1][1]:.1f} MiB",
                    flush=True,
                )
                next_report += 60.0
            time.sleep(RSS_SAMPLE_S)
        exit_code = daemon.stop()
        if exit_code != 0:
            raise RuntimeError(f"the daemon exited with {exit_code} on SIGTERM:\n{daemon.log_tail()}")
        state = read_outbox(daemon.outbox_path)
        produced = state["next_seq"] - 1
        counter.wait_for(DEVICE, produced, 60)
    finally:
        counter.stop()
        if daemon is not None:
            daemon.close()
        broker.stop()
    count = counter.snapshot(DEVICE)
    summary = {
        "started": started_text,
        "host": os.uname().nodename,
        "minutes": minutes,
        "restart_every": restart_every,
        "outage_s": outage_s,
        "fps": fps,
        "counts": {
            "produced": produced,
            "delivered": len(count.seqs & set(range(1, produced + 1))),
            "missing": len(count.missing(1, produced)),
            "duplicated": count.duplicates,
            "dropped": state["dropped"],
            "pending_at_exit": len(state["pending"]),
        },
        "restarts": samples.restarts,
        "rss_first_mib": samples.rss[0][1] if samples.rss else float("nan"),
        "rss_last_mib": samples.rss[-1][1] if samples.rss else float("nan"),
        "rss_slope_mib_per_hour": rss_slope_mib_per_hour(samples.rss),
        # Allocators and caches settle during the first minutes: the second half shows a leak on its own.
        "rss_slope_second_half_mib_per_hour": rss_slope_mib_per_hour(samples.rss, minutes * 30.0),
        "rss_samples": [(round(t, 1), round(mib, 2)) for t, mib in samples.rss],
        "overall": (per_minute([(0.0, p, d) for _, p, d in samples.latency]) or [{}])[0],
    }
    by_minute = per_minute(samples.latency)
    summary["per_minute"] = by_minute
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(samples, out / "soak.png")
    (out / "report.md").write_text(render(summary, by_minute))
    return summary


def restart_broker(
    broker: Mosquitto, counter: CountingSubscriber, samples: Samples, outage_s: float
) -> dict[str, float]:
    stopped = time.monotonic()
    broker.stop()
    time.sleep(outage_s)
    seen_before = counter.snapshot(DEVICE).last_seq or 0
    broker.start()
    started = time.monotonic()
    recovery = float("inf")
    deadline = started + 60.0
    while time.monotonic() < deadline:
        if (counter.snapshot(DEVICE).last_seq or 0) > seen_before:
            recovery = time.monotonic() - started
            break
        time.sleep(0.05)
    return {
        "stopped": stopped - samples.t0_mono,
        "started": started - samples.t0_mono,
        "recovery_s": recovery,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak (default 30)")
    parser.add_argument(
        "--restart-every", type=float, default=5.0, help="minutes between broker restarts (0: none)"
    )
    parser.add_argument("--outage-s", type=float, default=5.0, help="seconds the broker stays down")
    parser.add_argument("--fps", type=float, default=10.0, help="camera frames per second")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default $EDGE_CACHE/soak)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.fps <= 0 or args.outage_s < 0 or args.restart_every < 0:
        parser.error("--minutes and --fps must be > 0, --outage-s and --restart-every >= 0")
    out = (args.out or default_out()).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"soak: {args.minutes:g} min at {args.fps:g} fps, broker restart every {args.restart_every:g} min "
        f"({args.outage_s:g} s down); report in {out}",
        flush=True,
    )
    summary = run(args.minutes, args.restart_every, args.outage_s, args.fps, out)
    counts = summary["counts"]
    print(
        f"produced {counts['produced']}, delivered {counts['delivered']}, missing {counts['missing']}, "
        f"duplicated {counts['duplicated']}, dropped (counted) {counts['dropped']}"
    )
    print(
        f"RSS {summary['rss_first_mib']:.1f} -> {summary['rss_last_mib']:.1f} MiB, "
        f"slope {summary['rss_slope_mib_per_hour']:+.2f} MiB/hour (least squares after {WARMUP_S:.0f} s), "
        f"{summary['rss_slope_second_half_mib_per_hour']:+.2f} MiB/hour over the second half"
    )
    print("restarts: " + ", ".join(f"recovery {r['recovery_s']:.1f} s" for r in summary["restarts"]))
    print("minute  n    publish p50/p99 ms   delivery p50/p99 ms")
    for m in summary["per_minute"]:
        print(
            f"{m['minute']:5d} {m['n']:5d}   {m['publish_p50']:7.1f} {m['publish_p99']:7.1f}"
            f"      {m['delivery_p50']:8.1f} {m['delivery_p99']:8.1f}"
        )
    print(f"written: {out / 'report.md'}, {out / 'soak.png'}")
    return 1 if counts["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
