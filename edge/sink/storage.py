"""Storage of the sink: PostgreSQL (psycopg 3) or SQLite (the standard library), same tables.

Every `write()` is one transaction: predictions (INSERT ... ON CONFLICT (device_id, boot_id, seq) DO
NOTHING, so a redelivered message is absorbed and counted as a duplicate), dead letters, events and the
devices' rows. The sink acknowledges the MQTT messages of a batch only after `write()` returned.

Migrations are numbered and recorded in `schema_migrations`; they run inside one transaction that first
takes a PostgreSQL advisory lock (SQLite: `BEGIN IMMEDIATE`), so sinks starting together apply each
migration once. With the TimescaleDB extension available, `predictions` becomes a hypertable.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from edge.client import Event, Status
from edge.errors import EdgeError

log = logging.getLogger(__name__)


class StorageError(EdgeError):
    """The database refused or could not be reached; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Row:
    """One prediction, ready to store (JSON as text)."""

    device_id: str
    boot_id: str
    seq: int
    ts: str
    model_name: str
    model_version: str
    result: str
    payload: str
    captured_at: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.device_id, self.boot_id, self.seq)


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str


@dataclass
class Batch:
    predictions: list[Row] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """The latest JPEG of a label on a source (`{prefix}/{device}/{source}/{label}/snapshot`, retained);
    empty `jpeg`: the retained message was cleared."""

    device_id: str
    source: str
    label: str
    jpeg: bytes


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    duplicates: int
    inserted_rows: tuple[Row, ...] = ()


@dataclass(frozen=True)
class GapRow:
    device_id: str
    boot_id: str
    from_seq: int
    to_seq: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
        }


class Storage(Protocol):
    kind: str

    def migrate(self) -> int: ...
    def write(self, batch: Batch) -> WriteResult: ...
    def refresh_gaps(self, grace_s: float) -> list[GapRow]: ...
    def gaps(self) -> tuple[list[GapRow], int]: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def close(self) -> None: ...


def _dedupe(rows: Sequence[Row]) -> tuple[list[Row], int]:
    """Rows sorted by key (so concurrent sinks lock rows in one order), a key repeated in the batch once."""
    unique: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        unique.setdefault(row.key, row)
    return [unique[key] for key in sorted(unique)], len(rows) - len(unique)


def _device_updates(
    rows: Sequence[Row], inserted: set[tuple[str, str, int]], batch_dups: int, all_rows: Sequence[Row]
) -> list[tuple[str, int, int, str, int, str, str]]:
    """Per device: (device_id, stored, duplicates, last_boot_id, last_seq, model_name, model_version)."""
    per: dict[str, list[Any]] = {}
    for row in rows:
        entry = per.setdefault(row.device_id, [0, 0, row.boot_id, row.seq, row.model_name, row.model_version])
        if row.key in inserted:
            entry[0] += 1
        else:
            entry[1] += 1
        if row.seq >= entry[3]:
            entry[2:6] = [row.boot_id, row.seq, row.model_name, row.model_version]
    if batch_dups:  # repeats inside the batch itself
        seen: set[tuple[str, str, int]] = set()
        for row in all_rows:
            if row.key in seen:
                per[row.device_id][1] += 1
            seen.add(row.key)
    return [(device, *values) for device, values in sorted(per.items())]


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    from edge.client import parse_time

    return parse_time(str(value))


Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def _refresh_gaps(
    run: Run, p: str, t: str, grace_s: float, now: float, stamp: Callable[[float], Any]
) -> None:
    """Bring the gaps table up to date without reading again what was already checked.

    `streams.checked_seq` of a device and boot is a stored seq below which every hole is in `gaps`. A
    round (1) splits or removes the known gaps that late rows have since filled, reading only the rows
    inside them; (2) finds the streams that stored rows since the last round (the `received_at` index;
    `sink_meta.gaps_checked_at`, less a minute for transactions still open then) and those left with a
    young hole; (3) reads each from its checked_seq up, reporting each hole whose next row arrived
    `grace_s` ago or more; a younger hole stops the stream there, `pending`, for the next round. The
    writers never touch these tables: no row lock is shared between sinks for them.
    """
    filled: dict[tuple[Any, Any, int], list[int]] = {}
    spans: dict[tuple[Any, Any, int], tuple[int, Any]] = {}
    for device, boot, lo, hi, first_seen, seq in run(
        f"""SELECT g.device_id, g.boot_id, g.from_seq, g.to_seq, g.first_seen, p.seq FROM {t}gaps g
            JOIN {t}predictions p ON p.device_id = g.device_id AND p.boot_id = g.boot_id
             AND p.seq BETWEEN g.from_seq AND g.to_seq""",
        (),
    ):
        filled.setdefault((device, boot, lo), []).append(int(seq))
        spans[(device, boot, lo)] = (int(hi), first_seen)
    for (device, boot, lo), seqs in filled.items():
        hi, first_seen = spans[(device, boot, lo)]
        run(
            f"DELETE FROM {t}gaps WHERE device_id = {p} AND boot_id = {p} AND from_seq = {p}",
            (device, boot, lo),
        )
        edges = [lo - 1, *sorted(seqs), hi + 1]
        for a, b in itertools.pairwise(edges):
            if b > a + 1:
                run(
                    f"INSERT INTO {t}gaps (device_id, boot_id, from_seq, to_seq, first_seen) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p})",
                    (device, boot, a + 1, b - 1, first_seen),
                )
    last = run(f"SELECT value FROM {t}sink_meta WHERE key = 'gaps_checked_at'", ())
    recent = f"WHERE received_at > {p}" if last else ""
    for device, boot in run(
        f"SELECT DISTINCT device_id, boot_id FROM {t}predictions {recent}",
        (stamp(float(last[0][0]) - 60.0),) if last else (),
    ):
        run(
            f"INSERT INTO {t}streams (device_id, boot_id, pending) VALUES ({p}, {p}, {p}) "
            f"ON CONFLICT (device_id, boot_id) DO UPDATE SET pending = {p}",
            (device, boot, True, True),
        )
    for device, boot, checked in run(
        f"SELECT device_id, boot_id, checked_seq FROM {t}streams WHERE pending", ()
    ):
        rows = run(
            f"SELECT seq, received_at FROM {t}predictions WHERE device_id = {p} AND boot_id = {p} "
            f"AND seq >= {p} ORDER BY seq",
            (device, boot, checked),
        )
        mark = int(rows[0][0]) if rows else int(checked)  # a new stream starts at its first row
        young = False
        for (a, _), (b, received) in itertools.pairwise(rows):
            if b > a + 1:
                if now - _epoch(received) < grace_s:
                    young = True  # looked at again next round
                    break
                run(
                    f"INSERT INTO {t}gaps (device_id, boot_id, from_seq, to_seq, first_seen) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT DO NOTHING",
                    (device, boot, a + 1, b - 1, received),
                )
            mark = int(b)
        run(
            f"UPDATE {t}streams SET checked_seq = {p}, pending = {p} WHERE device_id = {p} AND boot_id = {p}",
            (mark, young, device, boot),
        )
    run(
        f"INSERT INTO {t}sink_meta (key, value) VALUES ('gaps_checked_at', {p}) "
        f"ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (repr(now),),
    )


def _model_of(status: Status) -> tuple[str | None, str | None]:
    model = status.model
    name, version = model.get("name"), model.get("version")
    return (str(name) if name is not None else None, str(version) if version is not None else None)


# ---------------------------------------------------------------------------------------------------------
# SQLite


_SQLITE_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE predictions (
            device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq INTEGER NOT NULL, ts TEXT NOT NULL,
            model_name TEXT NOT NULL, model_version TEXT NOT NULL, result TEXT NOT NULL, payload TEXT NOT NULL,
            captured_at TEXT, received_at TEXT NOT NULL,
            PRIMARY KEY (device_id, boot_id, seq)) WITHOUT ROWID""",
        "CREATE INDEX predictions_received_at ON predictions (received_at)",
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
            reason TEXT NOT NULL, received_at TEXT NOT NULL)""",
        """CREATE TABLE gaps (
            device_id TEXT NOT NULL, boot_id TEXT NOT NULL, from_seq INTEGER NOT NULL, to_seq INTEGER NOT NULL,
            first_seen TEXT NOT NULL, PRIMARY KEY (device_id, boot_id, from_seq))""",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY, state TEXT, status TEXT, status_ts TEXT, status_since TEXT,
            model_name TEXT, model_version TEXT, last_boot_id TEXT, last_seq INTEGER,
            last_seen TEXT, predictions INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, topic TEXT NOT NULL,
            event TEXT NOT NULL, ts TEXT, data TEXT NOT NULL, received_at TEXT NOT NULL)""",
        """CREATE TABLE streams (
            device_id TEXT NOT NULL, boot_id TEXT NOT NULL, checked_seq INTEGER NOT NULL DEFAULT 0,
            pending INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (device_id, boot_id))""",
        "CREATE TABLE sink_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE snapshots (
            device_id TEXT NOT NULL, source TEXT NOT NULL, label TEXT NOT NULL, jpeg BLOB NOT NULL,
            received_at TEXT NOT NULL, PRIMARY KEY (device_id, source, label))""",
    ],
]

_SQLITE_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


class SqliteStorage:
    """One file, WAL mode; several sinks may share it (writes are serialized by SQLite's lock)."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"database {path}: cannot open: {exc}", retry=False) from exc
        self._lock = threading.Lock()  # the writer and the page's readers share the connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"database {self.path}: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def migrate(self) -> int:
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
            )
            done = {version for (version,) in db.execute("SELECT version FROM schema_migrations")}
            applied = 0
            for version, statements in enumerate(_SQLITE_MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute(f"INSERT INTO schema_migrations VALUES (?, {_SQLITE_NOW})", (version,))
                applied += 1
            return applied

    def write(self, batch: Batch) -> WriteResult:
        rows, batch_dups = _dedupe(batch.predictions)
        try:
            with self._transaction() as db:
                inserted: set[tuple[str, str, int]] = set()
                for row in rows:
                    cur = db.execute(
                        "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                        f"{_SQLITE_NOW}) ON CONFLICT DO NOTHING",
                        (
                            row.device_id,
                            row.boot_id,
                            row.seq,
                            row.ts,
                            row.model_name,
                            row.model_version,
                            row.result,
                            row.payload,
                            row.captured_at,
                        ),
                    )
                    if cur.rowcount == 1:
                        inserted.add(row.key)
                for update in _device_updates(rows, inserted, batch_dups, batch.predictions):
                    db.execute(
                        f"""INSERT INTO devices (device_id, predictions, duplicates, last_boot_id, last_seq,
                                model_name, model_version, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, {_SQLITE_NOW})
                            ON CONFLICT (device_id) DO UPDATE SET
                              predictions = predictions + excluded.predictions,
                              duplicates = duplicates + excluded.duplicates,
                              last_boot_id = excluded.last_boot_id, last_seq = excluded.last_seq,
                              model_name = excluded.model_name, model_version = excluded.model_version,
                              last_seen = excluded.last_seen""",
                        update,
                    )
                for letter in batch.dead_letters:
                    db.execute(
                        f"INSERT INTO dead_letters (topic, payload, reason, received_at) VALUES (?, ?, ?, {_SQLITE_NOW})",
                        (letter.topic, letter.payload, letter.reason),
                    )
                for event in batch.events:
                    db.execute(
                        f"INSERT INTO events (device_id, topic, event, ts, data, received_at) "
                        f"VALUES (?, ?, ?, ?, ?, {_SQLITE_NOW})",
                        (event.device_id, event.topic, event.event, event.ts, json.dumps(event.data)),
                    )
                for snap in batch.snapshots:
                    if snap.jpeg:
                        db.execute(
                            f"""INSERT INTO snapshots VALUES (?, ?, ?, ?, {_SQLITE_NOW})
                                ON CONFLICT (device_id, source, label) DO UPDATE
                                SET jpeg = excluded.jpeg, received_at = excluded.received_at""",
                            (snap.device_id, snap.source, snap.label, snap.jpeg),
                        )
                    else:
                        db.execute(
                            "DELETE FROM snapshots WHERE device_id = ? AND source = ? AND label = ?",
                            (snap.device_id, snap.source, snap.label),
                        )
                for status in batch.statuses:
                    name, version = _model_of(status)
                    db.execute(
                        """INSERT INTO devices (device_id, state, status, status_ts, status_since,
                               model_name, model_version) VALUES (?, ?, ?, ?, ?, ?, ?)
                           ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,
                             status = excluded.status, status_ts = excluded.status_ts,
                             status_since = excluded.status_since,
                             model_name = coalesce(excluded.model_name, model_name),
                             model_version = coalesce(excluded.model_version, model_version)
                           WHERE status_ts IS NULL OR excluded.status_ts >= status_ts
                             OR (excluded.state = 'offline' AND excluded.status_since >= status_since)""",
                        (
                            status.device_id,
                            status.state,
                            json.dumps(status.payload),
                            status.ts,
                            status.since,
                            name,
                            version,
                        ),
                    )
        except sqlite3.Error as exc:
            retry = isinstance(exc, sqlite3.OperationalError)
            raise StorageError(f"database {self.path}: {exc}", retry=retry) from exc
        stored = tuple(row for row in rows if row.key in inserted)
        return WriteResult(len(inserted), len(batch.predictions) - len(inserted), stored)

    def refresh_gaps(self, grace_s: float) -> list[GapRow]:
        with self._transaction() as db:

            def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                return list(db.execute(sql, tuple(params)).fetchall())

            from edge.publish.payload import rfc3339

            # received_at is this host's clock, as RFC 3339 text (text order is time order)
            _refresh_gaps(run, "?", "", grace_s, time.time(), rfc3339)
        return self.gaps()[0]

    def gaps(self) -> tuple[list[GapRow], int]:
        rows = self.query("SELECT device_id, boot_id, from_seq, to_seq FROM gaps ORDER BY 1, 2, 3")
        (dups,) = self.query("SELECT coalesce(sum(duplicates), 0) FROM devices")[0]
        return [GapRow(*row) for row in rows], int(dups)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, tuple(params)).fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_migrations(s: str) -> list[list[str]]:
    return [
        [
            f"""CREATE TABLE {s}.predictions (
                device_id text NOT NULL, boot_id uuid NOT NULL, seq bigint NOT NULL, ts timestamptz NOT NULL,
                model_name text NOT NULL, model_version text NOT NULL, result jsonb NOT NULL,
                payload jsonb NOT NULL, captured_at timestamptz,
                received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                PRIMARY KEY (device_id, boot_id, seq))""",
            f"CREATE INDEX predictions_received_at ON {s}.predictions (received_at)",
            f"""CREATE TABLE {s}.dead_letters (
                id bigserial PRIMARY KEY, topic text NOT NULL, payload bytea NOT NULL, reason text NOT NULL,
                received_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
            f"""CREATE TABLE {s}.gaps (
                device_id text NOT NULL, boot_id uuid NOT NULL, from_seq bigint NOT NULL, to_seq bigint NOT NULL,
                first_seen timestamptz NOT NULL, PRIMARY KEY (device_id, boot_id, from_seq))""",
            f"""CREATE TABLE {s}.devices (
                device_id text PRIMARY KEY, state text, status jsonb, status_ts timestamptz,
                status_since timestamptz, model_name text, model_version text, last_boot_id uuid,
                last_seq bigint, last_seen timestamptz, predictions bigint NOT NULL DEFAULT 0,
                duplicates bigint NOT NULL DEFAULT 0)""",
            f"""CREATE TABLE {s}.events (
                id bigserial PRIMARY KEY, device_id text NOT NULL, topic text NOT NULL, event text NOT NULL,
                ts timestamptz, data jsonb NOT NULL, received_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
            f"""CREATE TABLE {s}.streams (
                device_id text NOT NULL, boot_id uuid NOT NULL, checked_seq bigint NOT NULL DEFAULT 0,
                pending boolean NOT NULL DEFAULT false, PRIMARY KEY (device_id, boot_id))""",
            f"CREATE TABLE {s}.sink_meta (key text PRIMARY KEY, value text NOT NULL)",
            f"""CREATE TABLE {s}.snapshots (
                device_id text NOT NULL, source text NOT NULL, label text NOT NULL, jpeg bytea NOT NULL,
                received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                PRIMARY KEY (device_id, source, label))""",
        ],
    ]


def _lock_key(schema: str) -> int:
    """A stable 63-bit advisory lock key per schema."""
    return zlib.crc32(f"edge-sink:{schema}".encode()) << 16 | 0x5EED


class PostgresStorage:
    """psycopg 3; one connection for the writer, another for the page's and gap refresh's reads."""

    kind = "postgresql"

    def __init__(self, url: str, schema: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise StorageError(
                "database.url is PostgreSQL but psycopg is not installed: pip install 'edge-runtime[sink]'",
                retry=False,
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self.schema = schema
        self._s = f'"{schema}"'
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: Any = None
        self._reader: Any = None
        self._incoming_ready = False
        self._connect_writer()

    def _redacted(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        except self._psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"database {self._redacted()}: cannot connect: {first}") from exc

    def _connect_writer(self) -> None:
        if self._writer is None or self._writer.closed:
            self._writer = self._connect()
            self._incoming_ready = False  # the temporary table lives with its connection

    def migrate(self) -> int:
        s = self._s
        with self._write_lock:
            self._connect_writer()
            conn = self._writer
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.schema),))
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                    cur.execute(
                        f"CREATE TABLE IF NOT EXISTS {s}.schema_migrations "
                        "(version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    cur.execute(f"SELECT version FROM {s}.schema_migrations")
                    done = {version for (version,) in cur.fetchall()}
                    applied = 0
                    for version, statements in enumerate(_pg_migrations(s), start=1):
                        if version in done:
                            continue
                        for statement in statements:
                            cur.execute(statement)
                        if version == 1:
                            self._maybe_hypertable(cur)
                        cur.execute(f"INSERT INTO {s}.schema_migrations (version) VALUES (%s)", (version,))
                        applied += 1
                    return applied
            except self._psycopg.Error as exc:
                raise StorageError(
                    f"database {self._redacted()}: migration failed: {exc}", retry=False
                ) from exc

    def _maybe_hypertable(self, cur: Any) -> None:
        """TimescaleDB, when the server has it: chunks by seq (the primary key must hold the partition
        column, and (device_id, boot_id, seq) is the contract)."""
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        if cur.fetchone() is None:
            return
        try:  # a savepoint: installed but not preloaded (or no right to create it) is a plain table
            with cur.connection.transaction():
                cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                cur.execute(
                    "SELECT create_hypertable(%s, 'seq', chunk_time_interval => 1000000, if_not_exists => true)",
                    (f"{self.schema}.predictions",),
                )
        except self._psycopg.Error as exc:
            log.warning("TimescaleDB is available but predictions stays a plain table: %s", _first_line(exc))
            return
        log.info("predictions is a TimescaleDB hypertable")

    def write(self, batch: Batch) -> WriteResult:
        psycopg = self._psycopg
        s = self._s
        rows, batch_dups = _dedupe(batch.predictions)
        with self._write_lock:
            try:
                self._connect_writer()
                conn = self._writer
                created = False
                with conn.transaction(), conn.cursor() as cur:
                    inserted: set[tuple[str, str, int]] = set()
                    if rows:
                        # COPY into a temporary table, then one INSERT ... ON CONFLICT: 4-5x the rate of
                        # a multi-row INSERT of the same rows (the arrays' parsing dominates that one)
                        if not self._incoming_ready:
                            cur.execute(
                                f"CREATE TEMP TABLE IF NOT EXISTS edge_sink_incoming "
                                f"(LIKE {s}.predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                            )
                            created = True
                        with cur.copy(
                            "COPY edge_sink_incoming (device_id, boot_id, seq, ts, model_name, model_version, "
                            "result, payload, captured_at) FROM STDIN"
                        ) as copy:
                            for r in rows:
                                copy.write_row(
                                    (
                                        r.device_id,
                                        r.boot_id,
                                        r.seq,
                                        r.ts,
                                        r.model_name,
                                        r.model_version,
                                        r.result,
                                        r.payload,
                                        r.captured_at,
                                    )
                                )
                        cur.execute(
                            f"""INSERT INTO {s}.predictions SELECT * FROM edge_sink_incoming
                                ON CONFLICT (device_id, boot_id, seq) DO NOTHING
                                RETURNING device_id, boot_id::text, seq"""
                        )
                        inserted = {(d, b, int(q)) for d, b, q in cur.fetchall()}
                        updates = _device_updates(rows, inserted, batch_dups, batch.predictions)
                        cur.execute(
                            f"""INSERT INTO {s}.devices AS d (device_id, predictions, duplicates, last_boot_id,
                                   last_seq, model_name, model_version, last_seen)
                                SELECT *, clock_timestamp() FROM unnest(%s::text[], %s::bigint[], %s::bigint[],
                                   %s::uuid[], %s::bigint[], %s::text[], %s::text[])
                                ON CONFLICT (device_id) DO UPDATE SET
                                  predictions = d.predictions + excluded.predictions,
                                  duplicates = d.duplicates + excluded.duplicates,
                                  last_boot_id = excluded.last_boot_id, last_seq = excluded.last_seq,
                                  model_name = excluded.model_name, model_version = excluded.model_version,
                                  last_seen = excluded.last_seen""",
                            [list(column) for column in zip(*updates, strict=False)],
                        )
                    for letter in batch.dead_letters:
                        cur.execute(
                            f"INSERT INTO {s}.dead_letters (topic, payload, reason) VALUES (%s, %s, %s)",
                            (letter.topic, letter.payload, letter.reason),
                        )
                    for event in batch.events:
                        cur.execute(
                            f"INSERT INTO {s}.events (device_id, topic, event, ts, data) "
                            "VALUES (%s, %s, %s, %s, %s)",
                            (event.device_id, event.topic, event.event, event.ts, json.dumps(event.data)),
                        )
                    for snap in batch.snapshots:
                        if snap.jpeg:
                            cur.execute(
                                f"""INSERT INTO {s}.snapshots (device_id, source, label, jpeg)
                                    VALUES (%s, %s, %s, %s) ON CONFLICT (device_id, source, label) DO UPDATE
                                    SET jpeg = excluded.jpeg, received_at = excluded.received_at""",
                                (snap.device_id, snap.source, snap.label, snap.jpeg),
                            )
                        else:
                            cur.execute(
                                f"DELETE FROM {s}.snapshots WHERE device_id = %s AND source = %s AND label = %s",
                                (snap.device_id, snap.source, snap.label),
                            )
                    for status in batch.statuses:
                        name, version = _model_of(status)
                        cur.execute(
                            f"""INSERT INTO {s}.devices AS d (device_id, state, status, status_ts,
                                   status_since, model_name, model_version) VALUES (%s, %s, %s, %s, %s, %s, %s)
                                ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,
                                  status = excluded.status, status_ts = excluded.status_ts,
                                  status_since = excluded.status_since,
                                  model_name = coalesce(excluded.model_name, d.model_name),
                                  model_version = coalesce(excluded.model_version, d.model_version)
                                WHERE d.status_ts IS NULL OR excluded.status_ts >= d.status_ts
                                  OR (excluded.state = 'offline' AND excluded.status_since >= d.status_since)""",
                            (
                                status.device_id,
                                status.state,
                                json.dumps(status.payload),
                                status.ts,
                                status.since,
                                name,
                                version,
                            ),
                        )
                if created:  # committed: a rolled-back transaction takes the table with it
                    self._incoming_ready = True
            except psycopg.OperationalError as exc:
                self._drop_writer()
                raise StorageError(f"database {self._redacted()}: {_first_line(exc)}") from exc
            except psycopg.Error as exc:
                raise StorageError(f"database {self._redacted()}: {_first_line(exc)}", retry=False) from exc
        stored = tuple(row for row in rows if row.key in inserted)
        return WriteResult(len(inserted), len(batch.predictions) - len(inserted), stored)

    def _drop_writer(self) -> None:
        if self._writer is not None:
            with suppress(Exception):
                self._writer.close()
            self._writer = None

    def refresh_gaps(self, grace_s: float) -> list[GapRow]:
        """Bring the gaps table up to date (`_refresh_gaps`); one sink at a time (a second advisory
        lock), the others skip that round."""
        s = self._s
        with self._read_lock:
            conn = self._reader_conn()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (_lock_key(self.schema) + 1,))
                    row = cur.fetchone()
                    if row is not None and row[0]:

                        def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                            cur.execute(sql, tuple(params))
                            return list(cur.fetchall()) if cur.description is not None else []

                        # the database's clock wrote received_at: ages are measured on it
                        ((now,),) = run("SELECT extract(epoch FROM clock_timestamp())::float8", ())
                        _refresh_gaps(run, "%s", f"{s}.", grace_s, float(now), _utc)
            except self._psycopg.OperationalError as exc:
                self._reader = None
                raise StorageError(f"database {self._redacted()}: {_first_line(exc)}") from exc
        return self.gaps()[0]

    def _reader_conn(self) -> Any:
        if self._reader is None or self._reader.closed:
            self._reader = self._connect()
        return self._reader

    def gaps(self) -> tuple[list[GapRow], int]:
        s = self._s
        rows = self.query(f"SELECT device_id, boot_id::text, from_seq, to_seq FROM {s}.gaps ORDER BY 1, 2, 3")
        (dups,) = self.query(f"SELECT coalesce(sum(duplicates), 0) FROM {s}.devices")[0]
        return [GapRow(d, b, int(f), int(t)) for d, b, f, t in rows], int(dups)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            conn = self._reader_conn()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(sql, tuple(params))
                    return list(cur.fetchall())
            except self._psycopg.OperationalError as exc:
                self._reader = None
                raise StorageError(f"database {self._redacted()}: {_first_line(exc)}") from exc

    def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None


def _first_line(exc: BaseException) -> str:
    """The server's message on one line, with its detail (PostgreSQL's DETAIL) when it has one."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    diag = getattr(exc, "diag", None)
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    return f"{line} ({' '.join(detail.split())})" if detail else line


def open_storage(url: str, schema: str) -> Storage:
    if url.startswith("sqlite:///"):
        return SqliteStorage(Path(url[len("sqlite://") :]))
    return PostgresStorage(url, schema)
