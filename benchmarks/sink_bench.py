"""edge-sink ingest rate into PostgreSQL from a pre-filled broker backlog, with 1 and 2 sink workers.

    python benchmarks/sink_bench.py [--messages 50000] [--workers 1,2] [--devices 4] [--json]
    python benchmarks/sink_bench.py --chaos [--seconds 60] [--kills 5]   # 3 real daemons, SIGKILLs

Ingest: each run starts a private mosquitto, creates the sinks' persistent sessions (sinks started, then
stopped), publishes `--messages` predictions (the daemon's payload, QoS 1) while no sink runs, then starts
the workers (`python -m edge.sink`, one shared-subscription group) and reports rows / (last received_at -
first received_at) from the database, plus the wall time from start to the last row.

Chaos: 3 real `edge-infer run` daemons (tiny model, a looped clip) publish into 2 sinks for `--seconds`;
the sinks are SIGKILLed `--kills` times and the broker restarted once; then the daemons stop (flushing
their outboxes) and the run reports missing and duplicate rows per device, and capture -> commit
latency p50/p99 from the database.

PostgreSQL: EDGE_TEST_PG (default postgresql://root@127.0.0.1:5432/test); a schema per run, dropped after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from tests.broker import Mosquitto
from tests.sink_helpers import DEFAULT_PG, REPO, Fleet, sink_config, start_sink

PG_URL = DEFAULT_PG


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return f"{model}; {os.cpu_count()} cpus; flags: {' '.join(wanted) or 'none of avx2/avx512/vnni/amx'}"


def query(sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        cur = conn.execute(sql)
        return list(cur.fetchall()) if cur.description is not None else []


def wait_rows(schema: str, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = int(query(f'SELECT count(*) FROM "{schema}".predictions')[0][0])
        if count >= expected:
            break
        time.sleep(0.2)
    return count


def wait_log(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no '{text}' within {timeout} s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ingest(workers: int, messages: int, devices: int, batch: int, work: Path) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    broker = Mosquitto(work / f"broker-{workers}").start()
    try:
        configs = [
            sink_config(
                work / f"sink-{workers}-{i}.yaml",
                broker.port,
                PG_URL,
                schema,
                mqtt={"client_id": f"bench-{i}", "receive_maximum": 4 * batch},
                batch={"max_size": batch, "max_delay_ms": 20},
                gaps={"grace_s": 30, "interval_s": 3600},
            )
            for i in range(workers)
        ]
        logs = [work / f"sink-{workers}-{i}.log" for i in range(workers)]
        procs = [start_sink(c, log) for c, log in zip(configs, logs, strict=True)]
        for log in logs:
            wait_log(log, "session present")
        time.sleep(0.5)
        stop(procs)  # the sessions stay: the broker queues the backlog for them
        fleet = Fleet(broker.port)
        started = time.monotonic()
        per = messages // devices
        for d in range(devices):
            fleet.publish(f"cam-{d:02d}", str(uuid.uuid4()), range(1, per + 1))
        publish_s = time.monotonic() - started
        fleet.close()
        total = per * devices
        started = time.monotonic()
        procs = [start_sink(c, log) for c, log in zip(configs, logs, strict=True)]
        stored = wait_rows(schema, total, 600)
        wall = time.monotonic() - started
        stop(procs)
        ((first, last, distinct),) = query(
            f'SELECT min(received_at), max(received_at), count(DISTINCT (device_id, boot_id, seq)) FROM "{schema}".predictions'
        )
        span = (last - first).total_seconds()
        return {
            "workers": workers,
            "messages": total,
            "stored": stored,
            "distinct": distinct,
            "publish_rate": round(total / publish_s),
            "ingest_rate": round(stored / span) if span > 0 else None,
            "wall_s_including_start": round(wall, 2),
        }
    finally:
        broker.stop()
        query(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def chaos(seconds: float, kills: int, work: Path) -> dict[str, Any]:
    from tests.assets_media import labelled_clip
    from tests.daemon_helpers import make_tiny_package, write_config

    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    broker = Mosquitto(work / "broker-chaos").start()
    clip = labelled_clip(fps=10.0, seconds_per_photo=1.0).path
    models = work / "models"
    make_tiny_package(models / "v1")
    daemons: list[subprocess.Popen[bytes]] = []
    sinks: list[subprocess.Popen[bytes]] = []
    try:
        configs = [
            sink_config(
                work / f"chaos-sink-{i}.yaml",
                broker.port,
                PG_URL,
                schema,
                mqtt={"client_id": f"chaos-{i}"},
                gaps={"grace_s": 5, "interval_s": 5},
            )
            for i in range(2)
        ]
        logs = [work / f"chaos-sink-{i}.log" for i in range(2)]
        sinks = [start_sink(c, log) for c, log in zip(configs, logs, strict=True)]
        for log in logs:
            wait_log(log, "session present")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for d in range(3):
            config = write_config(
                work / f"daemon-{d}.yaml",
                device_id=f"cam-{d:02d}",
                profile="x86-64-avx2",
                model=str(models / "v1"),
                source={"type": "video", "realtime": False, "uri": str(clip), "fps": 30, "loop": True},
                mqtt={
                    "host": "127.0.0.1",
                    "port": broker.port,
                    "qos": 1,
                    "topic_prefix": "edge",
                    "reconnect_max_s": 1.0,
                },
                outbox={"path": str(work / f"outbox-{d}.db")},
                metrics=None,
            )
            log = (work / f"daemon-{d}.log").open("ab")
            daemons.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        step = seconds / (kills + 2)
        events = []
        for k in range(kills):
            time.sleep(step)
            victim = k % 2
            sinks[victim].send_signal(signal.SIGKILL)
            sinks[victim].wait(10)
            time.sleep(0.5)
            sinks[victim] = start_sink(configs[victim], logs[victim])
            events.append(f"SIGKILL sink {victim}")
            if k == kills // 2:
                broker.restart()
                events.append("broker restart")
        time.sleep(step)
        stop(daemons)  # SIGTERM: each flushes its outbox
        time.sleep(3)
        counts = query(
            f'''SELECT device_id, count(*), count(DISTINCT (boot_id, seq)), min(seq), max(seq)
                FROM "{schema}".predictions GROUP BY 1 ORDER BY 1'''
        )
        # wait until nothing more arrives
        for _ in range(60):
            time.sleep(1)
            again = query(f'''SELECT device_id, count(*), count(DISTINCT (boot_id, seq)), min(seq), max(seq)
                              FROM "{schema}".predictions GROUP BY 1 ORDER BY 1''')
            if again == counts:
                break
            counts = again
        ((p50, p99),) = query(
            f'''SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - captured_at)),
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - captured_at))
                FROM "{schema}".predictions'''
        )
        stop(sinks)
        import sqlite3

        def pending(d: int) -> int:  # rows of the daemon's outbox the broker never acknowledged
            with sqlite3.connect(work / f"outbox-{d}.db") as db:
                return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])

        per_device = [
            {
                "device": dev,
                "rows": rows,
                "seqs": f"{lo}..{hi}",
                "missing": (hi - lo + 1) - distinct + (lo - 1),  # holes, and any seq below the first
                "duplicate_rows": rows - distinct,
                "outbox_left": pending(index),
            }
            for index, (dev, rows, distinct, lo, hi) in enumerate(counts)
        ]
        return {
            "events": events,
            "devices": per_device,
            "missing": sum(d["missing"] for d in per_device),
            "duplicate_rows": sum(d["duplicate_rows"] for d in per_device),
            "capture_to_commit_ms_p50": round(p50 * 1000, 1),
            "capture_to_commit_ms_p99": round(p99 * 1000, 1),
        }
    finally:
        stop(daemons)
        stop(sinks)
        broker.stop()
        query(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--chaos", action="store_true", help="3 real daemons, sink SIGKILLs and a broker restart"
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(f"host: {cpu_flags()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sink-bench-") as tmp:
        work = Path(tmp)
        if args.chaos:
            results: Any = chaos(args.seconds, args.kills, work)
        else:
            results = [
                ingest(int(w), args.messages, args.devices, args.batch, work) for w in args.workers.split(",")
            ]
    if args.json:
        print(json.dumps({"host": cpu_flags(), "results": results}, indent=2))
    elif args.chaos:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(
                f"{r['workers']} worker(s): {r['stored']}/{r['messages']} stored ({r['distinct']} distinct), "
                f"{r['ingest_rate']} predictions/s ingest, {r['wall_s_including_start']} s wall "
                f"(backlog published at {r['publish_rate']}/s)"
            )
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    raise SystemExit(main())
