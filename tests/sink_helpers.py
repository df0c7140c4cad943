"""Real parts for the consuming side's tests: predictions published the way the daemon publishes them
(`edge.publish.payload.build_prediction`, QoS 1, MQTT 5), a PostgreSQL schema of one's own, sink configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.publish.payload import build_prediction

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PG = os.environ.get("EDGE_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
_pg: dict[str, str] = {}


def _reachable(url: str) -> str | None:
    """None if `url` answers, else why not (one line)."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=3).close()
        return None
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ThrowawayPostgres:
    """initdb + pg_ctl on a free port in a temporary directory (as user postgres when we are root), so a
    test may stop and start it. `start()` raises RuntimeError naming what is missing."""

    def __init__(self) -> None:
        import pwd
        import tempfile

        from tests.broker import free_port

        self.tools = {
            name: shutil.which(name) or f"/usr/lib/postgresql/15/bin/{name}" for name in ("initdb", "pg_ctl")
        }
        if not all(Path(path).exists() for path in self.tools.values()):
            raise RuntimeError("no initdb/pg_ctl (apt-get install postgresql)")
        self.prefix: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user for initdb") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            [*self.prefix, self.tools["initdb"], "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> ThrowawayPostgres:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        subprocess.run(
            [
                *self.prefix,
                self.tools["pg_ctl"],
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                log,
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            [*self.prefix, self.tools["pg_ctl"], "-D", str(self.data), "-m", mode, "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _throwaway_postgres() -> str:
    """A `ThrowawayPostgres` for the rest of the process (stopped at exit); its URL."""
    import atexit

    server = ThrowawayPostgres().start()
    atexit.register(server.remove)
    return server.url


def pg_url() -> str:
    """The test PostgreSQL: EDGE_TEST_PG (default the machine's 127.0.0.1:5432 database `test`) if it
    answers, else a throwaway server for this process; skips the test naming what is missing."""
    if "url" in _pg:
        return _pg["url"]
    if "skip" in _pg:
        pytest.skip(_pg["skip"])
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _pg["skip"] = "psycopg is not installed (pip install 'edge-runtime[sink]')"
        pytest.skip(_pg["skip"])
    why = _reachable(DEFAULT_PG)
    if why is None:
        _pg["url"] = DEFAULT_PG
        return DEFAULT_PG
    try:
        _pg["url"] = _throwaway_postgres()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _pg["skip"] = f"no PostgreSQL at {DEFAULT_PG} ({why}) and no throwaway server: {exc}"
        pytest.skip(_pg["skip"])
    return _pg["url"]


def prediction(device: str, boot: str, seq: int, label: str = "red") -> dict[str, Any]:
    now = time.time()
    return build_prediction(
        device_id=device,
        boot_id=boot,
        seq=seq,
        ts=now,
        source={"uri": "file:///clip.mp4", "frame": seq, "captured_at": now - 0.005},
        model={"name": "tiny-colour", "version": "1.0.0", "sha256": "0" * 64},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 5.0, "preprocess": 0.1, "inference": 0.5, "postprocess": 0.1},
        result={"type": "classification", "top_k": [{"label": label, "index": 0, "score": 0.9}]},
    )


class Fleet:
    """A paho MQTT 5 client publishing as many devices (QoS 1); `publish` waits for every PUBACK."""

    def __init__(self, port: int, prefix: str = "edge", client_id: str = "") -> None:
        import paho.mqtt.client as paho

        self.prefix = prefix
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not connected.wait(10):
            raise TimeoutError("fleet publisher: no CONNACK within 10 s")

    def send(self, topic: str, payload: bytes | str, retain: bool = False, wait: bool = True) -> Any:
        info = self.client.publish(f"{self.prefix}/{topic}", payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(10)
        return info

    def publish(self, device: str, boot: str, seqs: Any, rate: float | None = None) -> None:
        infos = []
        interval = 1.0 / rate if rate else 0.0
        for seq in seqs:
            body = json.dumps(prediction(device, boot, seq), separators=(",", ":"))
            infos.append(self.send(f"{device}/predictions", body, wait=False))
            if interval:
                time.sleep(interval)
        for info in infos:
            info.wait_for_publish(30)

    def status(self, device: str, state: str, **extra: Any) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        body = {"state": state, "device_id": device, "ts": now, "since": extra.pop("since", now), **extra}
        self.send(f"{device}/status", json.dumps(body), retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def new_boot() -> str:
    return str(uuid.uuid4())


@contextmanager
def pg_schema() -> Iterator[str]:
    """A uniquely named schema in the test database, dropped afterwards; skips naming what is missing."""
    import psycopg

    conn = psycopg.connect(pg_url(), autocommit=True, connect_timeout=3)
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.close()


def pg_query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(pg_url(), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description is not None else []


def sink_config(path: Path, port: int, database: str, schema: str = "edge", **over: Any) -> Path:
    data: dict[str, Any] = {
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "topic_prefix": "edge",
            "group": "sinks",
            "client_id": "sink-1",
            "session_expiry_s": 600,
        },
        "database": {"url": database},
        "schema": schema,
        "batch": {"max_size": 200, "max_delay_ms": 20},
        "gaps": {"grace_s": 0.5, "interval_s": 0.5},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_sink(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "edge.sink", *args, "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def gaps_json(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "edge.sink", "gaps", "--config", str(config), "--json"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def have_postgres_tools() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None
