"""Load figures (issue 7), measured in one run against a private mosquitto:

1. several file cameras into one daemon (one model session shared through the frame queue);
2. several daemons (one sensor source each) into one broker.

    python benchmarks/load_bench.py [--cameras 3] [--fps 0] [--seconds-per-photo 4]
                                    [--daemons 3] [--windows 5000] [--rate 500]

`--fps 0` plays each clip as fast as it decodes (the daemon's ceiling); a number paces each camera.
Per camera and per daemon: produced, delivered, missing, duplicated, frames skipped before inference
(newest frame wins), throughput (predictions/s) and p50/p99 of the payload's capture-to-publish, counted
by the fault suite's counting subscriber (the same code as tests/faults/test_load.py, at a larger size).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.broker import Mosquitto  # noqa: E402
from tests.faults.counting import CountingSubscriber, markdown_table  # noqa: E402
from tests.faults.daemon_proc import PREFIX, DaemonProcess  # noqa: E402
from tests.faults.report import RESULTS  # noqa: E402
from tests.faults.test_load import (  # noqa: E402
    StreamFigures,
    cameras_into_one_daemon,
    daemons_into_one_broker,
)


def _run(workdir: Path, measure: Callable[..., list[StreamFigures]], **kwargs: Any) -> list[StreamFigures]:
    """One private broker, one counting subscriber and the daemons `measure` starts, all torn down after."""
    broker = Mosquitto(workdir / "broker").start()
    counter = CountingSubscriber(broker.port, prefix=PREFIX, client_id=f"load-bench-{os.getpid()}")
    daemons: list[DaemonProcess] = []
    try:
        counter.start()
        return measure(workdir, broker, counter, daemons, **kwargs)
    finally:
        for daemon in daemons:
            daemon.close()
        counter.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=3, help="file cameras into one daemon (0: skip)")
    parser.add_argument("--fps", type=float, default=0.0, help="per camera; 0: as fast as it decodes")
    parser.add_argument(
        "--seconds-per-photo", type=float, default=4.0, help="clip length: 5 photos at 10 fps each"
    )
    parser.add_argument("--daemons", type=int, default=3, help="daemons into one broker (0: skip)")
    parser.add_argument("--windows", type=int, default=5000, help="sensor windows each daemon replays")
    parser.add_argument("--rate", type=float, default=500.0, help="sensor windows per second per daemon")
    args = parser.parse_args(argv)
    if args.cameras < 0 or args.daemons < 0 or args.windows < 1 or args.rate <= 0 or args.fps < 0:
        parser.error("--cameras/--daemons >= 0, --windows >= 1, --rate > 0, --fps >= 0")
    pace = f"{args.fps:g} fps each" if args.fps else "full speed"
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        if args.cameras:
            print(f"{args.cameras} cameras ({pace}) -> 1 daemon ...", flush=True)
            for stream in _run(
                Path(tmp) / "cameras",
                cameras_into_one_daemon,
                cameras=args.cameras,
                fps=args.fps,
                seconds_per_photo=args.seconds_per_photo,
            ):
                stream.result(f"{args.cameras} cameras -> 1 daemon", f"; {pace}")
        if args.daemons:
            print(f"{args.daemons} daemons ({args.rate:g} windows/s each) -> 1 broker ...", flush=True)
            for stream in _run(
                Path(tmp) / "daemons",
                daemons_into_one_broker,
                count=args.daemons,
                windows=args.windows,
                rate=args.rate,
            ):
                stream.result(f"{args.daemons} daemons -> 1 broker", f"; {args.rate:g} windows/s offered")
    print(f"\n{os.cpu_count()} CPUs, mosquitto + `edge-infer run` as real processes, QoS 1\n")
    print(markdown_table(RESULTS))
    return 1 if any(r.missing for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
