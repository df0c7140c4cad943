"""Durable outbox: every prediction is persisted in SQLite before MQTT sees it and deleted only on ack.

`seq` is assigned here, at persist time, exactly once, and never reused: the next value lives in the
`meta` table (same transaction as the row) and, as a guard against losing the database itself, a
sidecar file `<db>.seq` holds a reserved high-water mark that is bumped every `SEQ_RESERVE` messages.
A corrupt database is moved aside and the next seq is seeded from the highest of what can still be read
from it and the sidecar, so a subscriber may see a gap after corruption but never a reused seq.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import EdgeError

log = logging.getLogger(__name__)

SEQ_RESERVE = 1024
_ACK_CHUNK = 500  # below SQLite's bound-parameter limit
_MAX_TRACKED_IN_FLIGHT = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT,
    payload BLOB NOT NULL,
    qos INTEGER,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


class OutboxError(EdgeError):
    """The outbox database cannot be opened or created."""


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    topic: str | None  # None: the publisher's predictions topic
    payload: bytes
    qos: int | None  # None: the publisher's configured QoS


def _is_disk_full(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "full" in text or "no space" in text


class Outbox:
    """SQLite (WAL, synchronous=NORMAL) queue of serialized messages, bounded by `max_bytes` of payload.

    Thread-safe: one connection guarded by a lock (the inference worker adds, the publisher reads/acks).
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise OutboxError(f"outbox.max_bytes: must be > 0, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.sidecar = self.path.with_name(self.path.name + ".seq")
        self._lock = threading.Lock()
        self._handed_out = 0  # highest seq returned by pending_messages (what may be in flight)
        self._dropped_in_flight: set[int] = set()
        self._closed = False
        self.disk_full = 0  # adds that failed because the disk (or the page limit) is full
        self.recovered_from: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create directory: {exc.strerror or exc}") from exc
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            self._conn = self._recover(exc)
        self._load_state()

    # -- opening and recovery -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Keep the WAL in proportion to the bound: with SQLite's defaults (1000 pages, no size limit) a
        # 32 KiB outbox grew a 4 MB WAL, so disk use was not bounded by max_bytes at all.
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, self.max_bytes // 4 // page_size)}")
        conn.execute(f"PRAGMA journal_size_limit={max(64 * 1024, self.max_bytes // 2)}")
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no result'}")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def _recover(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        salvaged = self._salvage_next_seq()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.replace(Path(str(aside) + suffix))
        log.error(
            "outbox %s is corrupt (%s); moved aside to %s and started a fresh one (next seq >= %d)",
            self.path,
            exc,
            aside,
            max(salvaged, self._sidecar_seq()),
        )
        self.recovered_from = aside
        try:
            conn = self._open()
        except sqlite3.DatabaseError as again:
            raise OutboxError(f"{self.path}: cannot create a fresh outbox: {again}") from again
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)",
            (max(salvaged, self._sidecar_seq()),),
        )
        return conn

    def _salvage_next_seq(self) -> int:
        """Best effort: the highest next seq readable from a damaged database (1 if nothing is)."""
        best = 1
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error:
            return best
        try:
            for query in ("SELECT value FROM meta WHERE key='next_seq'", "SELECT max(seq) + 1 FROM messages"):
                try:
                    row = conn.execute(query).fetchone()
                except sqlite3.Error:
                    continue
                if row and isinstance(row[0], int):
                    best = max(best, row[0])
        finally:
            conn.close()
        return best

    def _sidecar_seq(self) -> int:
        try:
            return int(self.sidecar.read_text().strip() or 1)
        except (OSError, ValueError):
            return 1

    def _write_sidecar(self, value: int) -> None:
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        try:
            tmp.write_text(f"{value}\n")
            os.replace(tmp, self.sidecar)
        except OSError as exc:  # a full disk must not stop predictions; the db still holds next_seq
            log.warning("outbox: cannot write %s: %s", self.sidecar, exc.strerror or exc)

    def _meta(self, key: str, default: int) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row and row[0] is not None else default

    def _load_state(self) -> None:
        conn = self._conn
        stored = self._meta("next_seq", 0)
        max_row = conn.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0
        # The sidecar only matters when the database lost its state (deleted, recovered, fresh): it is
        # ahead of the real next seq by up to SEQ_RESERVE, so using it always would leave a gap per restart.
        floor = stored if stored else self._sidecar_seq()
        self._next_seq = max(floor, max_row + 1)
        self._dropped = self._meta("dropped", 0)
        depth, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
        ).fetchone()
        self._depth = int(depth)
        self._bytes = int(size)
        boots = self._meta("boots", 0) + 1
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [
                ("next_seq", self._next_seq),
                ("dropped", self._dropped),
                ("boots", boots),
                ("booted_at", time.time()),
            ],
        )
        conn.execute("COMMIT")
        self.boots = boots
        self._reserved = self._next_seq + SEQ_RESERVE
        self._write_sidecar(self._reserved)

    # -- the queue ------------------------------------------------------------------------------

    def add(self, payload: dict[str, Any], topic: str | None = None, qos: int | None = None) -> int:
        """Assign the next seq (written into `payload["seq"]`), persist, and return it.

        A full disk does not raise: the seq is consumed (so it is never reused and subscribers see the
        gap), the failure is counted in `disk_full`, and the prediction is lost.
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            payload["seq"] = seq
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            if self._next_seq >= self._reserved:
                self._reserved = self._next_seq + SEQ_RESERVE
                self._write_sidecar(self._reserved)
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO messages(seq, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?)",
                    (seq, topic, data, qos, time.time()),
                )
                conn.execute("UPDATE meta SET value=? WHERE key='next_seq'", (self._next_seq,))
                doomed, freed = self._trim(len(data))
                dropped_now = len(doomed)
                if dropped_now:
                    conn.execute(
                        "UPDATE meta SET value=? WHERE key='dropped'", (self._dropped + dropped_now,)
                    )
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _is_disk_full(exc):
                    raise
                self.disk_full += 1
                if self.disk_full == 1 or self.disk_full % 1000 == 0:
                    log.error("outbox %s: %s; %d predictions lost so far", self.path, exc, self.disk_full)
                return seq
            self._depth += 1 - dropped_now
            self._bytes += len(data) - freed
            self._dropped += dropped_now
            if doomed and doomed[0] <= self._handed_out:
                # already handed to the publisher: if its ack still comes, it was not lost after all
                in_flight = [s for s in doomed if s <= self._handed_out]
                if len(self._dropped_in_flight) + len(in_flight) <= _MAX_TRACKED_IN_FLIGHT:
                    self._dropped_in_flight.update(in_flight)
            return seq

    def _trim(self, incoming: int) -> tuple[list[int], int]:
        """Inside the add transaction: delete oldest rows until the bound holds. Returns (seqs, bytes)."""
        excess = self._bytes + incoming - self.max_bytes
        if excess <= 0:
            return [], 0
        freed = 0
        cursor = self._conn.execute("SELECT seq, length(payload) FROM messages ORDER BY seq")
        doomed: list[int] = []
        for seq, size in cursor:
            doomed.append(seq)
            freed += size
            if freed >= excess:
                break
        cursor.close()
        self._conn.execute("DELETE FROM messages WHERE seq <= ?", (doomed[-1],))
        return doomed, freed

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # no transaction was open
            self._conn.execute("ROLLBACK")

    def pending_messages(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        """Up to `limit` stored messages with seq > `after`, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, topic, payload, qos FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            if rows:
                self._handed_out = max(self._handed_out, rows[-1][0])
        return [OutboxMessage(seq, topic, bytes(data), qos) for seq, topic, data, qos in rows]

    def pending(self, limit: int, after: int = 0) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, payload) pairs with seq > `after`, oldest first."""
        return [(m.seq, m.payload) for m in self.pending_messages(limit, after)]

    def ack(self, seq: int) -> None:
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many rows were deleted.

        An ack for a row the bound already dropped while it was in flight means it reached the broker
        after all: it is taken back out of `dropped`, so `dropped` counts only what was really lost.
        """
        keys = [int(s) for s in seqs]
        if not keys:
            return 0
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                freed = 0
                deleted = 0
                for start in range(0, len(keys), _ACK_CHUNK):
                    chunk = keys[start : start + _ACK_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    sizes = conn.execute(
                        f"DELETE FROM messages WHERE seq IN ({marks}) RETURNING length(payload)", chunk
                    ).fetchall()
                    deleted += len(sizes)
                    freed += sum(size for (size,) in sizes)
                delivered_after_drop = 0
                if deleted < len(keys) and self._dropped_in_flight:
                    delivered_after_drop = sum(1 for k in keys if k in self._dropped_in_flight)
                    if delivered_after_drop:
                        conn.execute(
                            "UPDATE meta SET value=? WHERE key='dropped'",
                            (self._dropped - delivered_after_drop,),
                        )
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _is_disk_full(exc):
                    raise
                self.disk_full += 1
                return 0  # the rows stay and are re-sent later: a duplicate, never a loss
            self._depth -= deleted
            self._bytes -= freed
            if delivered_after_drop:
                self._dropped -= delivered_after_drop
                self._dropped_in_flight.difference_update(keys)
            return deleted

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def stats(self) -> dict[str, int]:
        return {
            "depth": self._depth,
            "bytes": self._bytes,
            "dropped": self._dropped,
            "disk_full": self.disk_full,
            "next_seq": self._next_seq,
        }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
