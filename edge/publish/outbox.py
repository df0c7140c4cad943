"""Durable outbox: every prediction is persisted in SQLite before MQTT sees it and deleted only on ack.

`seq` is assigned here, at persist time, exactly once, and never reused: the next value lives in the
`meta` table (same transaction as the row) and, as a guard against losing the database itself, a
sidecar file `<db>.seq` holds a reserved high-water mark that is bumped every `SEQ_RESERVE` messages.
A corrupt database is moved aside and the next seq is seeded from the highest of what can still be read
from it and the sidecar, so a subscriber may see a gap after corruption but never a reused seq.

A full disk must not need a restart. With the disk full, SQLite cannot even delete acknowledged rows
(a delete appends to the WAL) nor checkpoint (the checkpoint grows the database file), so the outbox keeps
a pre-allocated reserve file `<db>.reserve` and the WAL under half of it. On SQLITE_FULL it
releases the reserve, so deletes and checkpoints can proceed, and stops storing: predictions made meanwhile
are counted in `disk_full` (their seqs are consumed, never reused). Every `RETRY_INTERVAL_S` it settles
acks, checkpoints, gives freed pages back to the filesystem (incremental vacuum) and, once the reserve
fits again with room to spare, re-creates it and stores again.

`MemoryOutbox` is the `outbox: {enabled: false}` variant: nothing persisted, nothing kept while the broker
is away.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import EdgeError

log = logging.getLogger(__name__)

SEQ_RESERVE = 1024
_ACK_CHUNK = 500  # below SQLite's bound-parameter limit
_MAX_TRACKED_IN_FLIGHT = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
RESERVE_MIN_BYTES = 128 * 1024
RESERVE_MAX_BYTES = 8 * 1024 * 1024
RETRY_INTERVAL_S = 0.5
_RECLAIM_BUDGET_S = 0.2  # per attempt: the inference worker waits on the same lock

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


def _is_disk_full(exc: sqlite3.Error) -> bool:
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
        return True
    text = str(exc).lower()
    return "full" in text or "no space" in text


def auto_reserve_bytes(directory: Path) -> int:
    """An eighth of the filesystem holding the outbox, within RESERVE_MIN_BYTES..RESERVE_MAX_BYTES."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return RESERVE_MIN_BYTES
    return min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, stat.f_blocks * stat.f_frsize // 8))


def _free_bytes(directory: Path) -> int:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


class _OutboxCounters:
    """What the SQLite outbox and the memory-only one report alike (stats, Prometheus, the `stats` reply)."""

    _bytes: int
    _dropped: int
    _next_seq: int
    disk_full: int

    @property
    def depth(self) -> int:
        raise NotImplementedError

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
            "depth": self.depth,
            "bytes": self._bytes,
            "dropped": self._dropped,
            "disk_full": self.disk_full,
            "next_seq": self._next_seq,
        }

    def pending_messages(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        raise NotImplementedError

    def pending(self, limit: int, after: int = 0) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, payload) pairs with seq > `after`, oldest first."""
        return [(m.seq, m.payload) for m in self.pending_messages(limit, after)]

    def ack_many(self, seqs: Iterable[int]) -> int:
        raise NotImplementedError

    def ack(self, seq: int) -> None:
        self.ack_many((seq,))


class Outbox(_OutboxCounters):
    """SQLite (WAL, synchronous=NORMAL) queue of serialized messages, bounded by `max_bytes` of payload.

    Thread-safe: one connection guarded by a lock (the inference worker adds, the publisher reads/acks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        reserve_bytes: int | None = None,
    ) -> None:
        """`reserve_bytes`: disk space held back for deletes after a full disk (None: auto_reserve_bytes,
        0: no reserve)."""
        if max_bytes <= 0:
            raise OutboxError(f"outbox.max_bytes: must be > 0, got {max_bytes}")
        if reserve_bytes is not None and reserve_bytes < 0:
            raise OutboxError(f"outbox.reserve_bytes: must be >= 0, got {reserve_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.sidecar = self.path.with_name(self.path.name + ".seq")
        self.reserve = self.path.with_name(self.path.name + ".reserve")
        self._lock = threading.Lock()
        self._handed_out = 0  # highest seq returned by pending_messages (what may be in flight)
        self._dropped_in_flight: set[int] = set()
        self._unsettled_acks: set[int] = set()  # acked while the disk was too full to delete them
        self._closed = False
        self.disk_full = 0  # predictions lost because the disk (or the page limit) was full
        self._full = False  # not storing until space is recovered
        self._full_since = 0.0
        self._lost_at_full = 0
        self._last_attempt = 0.0
        self._sidecar_unsynced = False
        self.recovered_from: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create directory: {exc.strerror or exc}") from exc
        self.reserve_bytes = auto_reserve_bytes(self.path.parent) if reserve_bytes is None else reserve_bytes
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            self._conn = self._recover(exc)
        self._load_state()
        if self.reserve_bytes and not self._full and not self._make_reserve():
            log.warning(
                "outbox %s: cannot reserve %d KiB beside it; a full disk will lose predictions until the "
                "next start",
                self.path,
                self.reserve_bytes // 1024,
            )
            self.reserve_bytes = 0

    # -- opening and recovery -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        # Only takes effect on a new database (before WAL writes its header): freed pages can then be
        # given back to the filesystem after a full disk. Older databases are converted in _load_state.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Keep the WAL in proportion to the bound: with SQLite's defaults (1000 pages, no size limit) a
        # 32 KiB outbox grew a 4 MB WAL, so disk use was not bounded by max_bytes at all. It also stays
        # under half the reserve: once the disk is full the WAL can grow by at most what a failed
        # checkpoint still needed (< the threshold), so checkpointing it fits in the released reserve.
        # (A smaller WAL costs add() rate: 512 pages measured ~25 % slower than 1024 or more.)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        wal_bytes = min(self.max_bytes // 4, 4 << 20)
        if self.reserve_bytes:
            wal_bytes = min(wal_bytes, self.reserve_bytes // 2)
        self._wal_pages = max(8, wal_bytes // page_size)
        self._page_size = page_size
        conn.execute(f"PRAGMA wal_autocheckpoint={self._wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit={max(64 * 1024, 2 * self._wal_pages * page_size)}")
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

    def _read_sidecar(self) -> tuple[int, bool]:
        """(reserved mark, unsynced): unsynced means the database may hold an older next_seq than was used
        (written while the disk was full), so the mark must win over the database at the next start."""
        try:
            fields = self.sidecar.read_text().split()
            return int(fields[0]) if fields else 1, "unsynced" in fields[1:]
        except (OSError, ValueError):
            return 1, False

    def _sidecar_seq(self) -> int:
        return self._read_sidecar()[0]

    def _write_sidecar(self, value: int) -> None:
        text = f"{value}{' unsynced' if self._sidecar_unsynced else ''}\n".encode()
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        try:
            tmp.write_bytes(text)
            os.replace(tmp, self.sidecar)
            return
        except OSError as exc:
            first = exc
            with contextlib.suppress(OSError):
                tmp.unlink()
        try:  # no room for a new file: overwrite in place, which needs no new block
            fd = os.open(self.sidecar, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, text, 0)
                os.ftruncate(fd, len(text))
            finally:
                os.close(fd)
        except OSError:  # a full disk must not stop predictions; the db still holds next_seq
            log.warning("outbox: cannot write %s: %s", self.sidecar, first.strerror or first)

    def _meta(self, key: str, default: int) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row and row[0] is not None else default

    def _load_state(self) -> None:
        conn = self._conn
        stored = self._meta("next_seq", 0)
        max_row = conn.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0
        # The sidecar only matters when the database lost its state (deleted, recovered, fresh) or could
        # not keep it (marked unsynced while the disk was full): it is ahead of the real next seq by up to
        # SEQ_RESERVE, so using it always would leave a gap per restart.
        mark, unsynced = self._read_sidecar()
        floor = max(stored, mark) if unsynced or not stored else stored
        self._next_seq = max(floor, max_row + 1)
        self._dropped = self._meta("dropped", 0)
        depth, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
        ).fetchone()
        self._depth = int(depth)
        self._bytes = int(size)
        if not depth and int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 0:
            with contextlib.suppress(sqlite3.OperationalError):  # cheap while empty; else keep it as is
                conn.execute("VACUUM")
        boots = self._meta("boots", 0) + 1
        rows = [("next_seq", self._next_seq), ("dropped", self._dropped), ("boots", boots)]
        self.boots = boots
        self._reserved = self._next_seq + SEQ_RESERVE
        for _attempt in (1, 2):
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", rows)
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('booted_at', ?)", (time.time(),)
                )
                conn.execute("COMMIT")
                break
            except sqlite3.OperationalError as exc:
                self._rollback()
                if not _is_disk_full(exc):
                    raise
                self._enter_full(exc)  # releases a reserve left by the last run: one more try
        self._sidecar_unsynced = self._full
        self._write_sidecar(self._reserved)

    # -- the queue ------------------------------------------------------------------------------

    def add(self, payload: dict[str, Any], topic: str | None = None, qos: int | None = None) -> int:
        """Assign the next seq (written into `payload["seq"]`), persist, and return it.

        A full disk does not raise: the seq is consumed (so it is never reused and subscribers see the
        gap), the loss is counted in `disk_full`, and storing resumes once space is recovered.
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            payload["seq"] = seq
            if self._next_seq >= self._reserved:
                self._reserved = self._next_seq + SEQ_RESERVE
                self._write_sidecar(self._reserved)
            if self._full and not self._try_recover():
                self._count_lost()
                return seq
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
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
                self._enter_full(exc)
                self._count_lost()
                return seq
            if self._sidecar_unsynced:  # the database holds next_seq again
                self._sidecar_unsynced = False
                self._write_sidecar(self._reserved)
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

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many rows were deleted.

        An ack for a row the bound already dropped while it was in flight means it reached the broker
        after all: it is taken back out of `dropped`, so `dropped` counts only what was really lost.
        Acks that cannot be written (full disk) are kept and settled later, never forgotten: a forgotten
        ack would leave its row behind (re-sent after a restart) and, for a row dropped in flight, leave
        it counted as dropped although the broker has it.
        """
        keys = {int(s) for s in seqs}
        if not keys:
            return 0
        with self._lock:
            keys |= self._unsettled_acks
            try:
                deleted = self._delete_acked(keys)
            except sqlite3.OperationalError as exc:
                if not _is_disk_full(exc):
                    raise
                self._enter_full(exc)  # the released reserve is meant for exactly this delete
                try:
                    deleted = self._delete_acked(keys)
                except sqlite3.OperationalError as again:
                    if not _is_disk_full(again):
                        raise
                    self._unsettled_acks = keys
                    return 0
            self._unsettled_acks = set()
            if self._full:
                self._try_recover()
            return deleted

    def _delete_acked(self, keys: set[int]) -> int:
        """One transaction: delete `keys`, take rows dropped in flight back out of `dropped`."""
        conn = self._conn
        ordered = sorted(keys)
        try:
            conn.execute("BEGIN IMMEDIATE")
            freed = 0
            deleted = 0
            for start in range(0, len(ordered), _ACK_CHUNK):
                chunk = ordered[start : start + _ACK_CHUNK]
                marks = ",".join("?" * len(chunk))
                sizes = conn.execute(
                    f"DELETE FROM messages WHERE seq IN ({marks}) RETURNING length(payload)", chunk
                ).fetchall()
                deleted += len(sizes)
                freed += sum(size for (size,) in sizes)
            delivered_after_drop = 0
            if deleted < len(ordered) and self._dropped_in_flight:
                delivered_after_drop = len(keys & self._dropped_in_flight)
                if delivered_after_drop:
                    conn.execute(
                        "UPDATE meta SET value=? WHERE key='dropped'",
                        (self._dropped - delivered_after_drop,),
                    )
            conn.execute("COMMIT")
        except sqlite3.OperationalError:
            self._rollback()
            raise
        self._depth -= deleted
        self._bytes -= freed
        if delivered_after_drop:
            self._dropped -= delivered_after_drop
            self._dropped_in_flight.difference_update(keys)
        return deleted

    # -- full disk ------------------------------------------------------------------------------

    def _count_lost(self) -> None:
        self.disk_full += 1
        if self.disk_full == 1 or self.disk_full % 1000 == 0:
            log.error("outbox %s: disk full; %d predictions lost so far", self.path, self.disk_full)

    def _enter_full(self, exc: sqlite3.Error) -> None:
        """Stop storing; free the reserve so acks can delete rows and the WAL can be checkpointed."""
        self._last_attempt = time.monotonic()
        if self._full:
            return
        self._full = True
        self._full_since = time.monotonic()
        self._lost_at_full = self.disk_full
        released = self._release_reserve()
        log.error(
            "outbox %s: %s: not storing new predictions (each one counted as lost) until acknowledged "
            "ones free space%s",
            self.path,
            exc,
            f"; released the {released // 1024} KiB reserve for deletes and checkpoints" if released else "",
        )
        # Seqs are consumed while nothing reaches the database: a restart must not hand them out again.
        self._sidecar_unsynced = True
        self._reserved = self._next_seq + SEQ_RESERVE
        self._write_sidecar(self._reserved)
        self._checkpoint()

    def _try_recover(self, force: bool = False) -> bool:
        """At most every RETRY_INTERVAL_S: settle acks, give space back, and store again once the reserve
        (and room for a few WALs) fits. Returns whether the outbox stores again."""
        now = time.monotonic()
        if not force and now - self._last_attempt < RETRY_INTERVAL_S:
            return False
        self._last_attempt = now
        if self._unsettled_acks:
            try:
                self._delete_acked(self._unsettled_acks)
                self._unsettled_acks = set()
            except sqlite3.OperationalError as exc:
                if not _is_disk_full(exc):
                    raise
                return False
        self._reclaim(float("inf") if force else now + _RECLAIM_BUDGET_S)
        headroom = 4 * self._wal_pages * self._page_size
        if _free_bytes(self.path.parent) < self.reserve_bytes + headroom:
            return False
        if self.reserve_bytes and not self._make_reserve():
            return False
        self._full = False
        log.warning(
            "outbox %s: space recovered after %.1f s, storing again; %d predictions lost while the disk "
            "was full",
            self.path,
            now - self._full_since,
            self.disk_full - self._lost_at_full,
        )
        return True

    def recover_space(self) -> bool:
        """Try to leave the full-disk state now (otherwise tried on adds and acks); True if storing."""
        with self._lock:
            return not self._full or self._try_recover(force=True)

    @property
    def storing(self) -> bool:
        """False while a full disk keeps new predictions out."""
        return not self._full

    def _checkpoint(self) -> bool:
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError:
            return False
        return not busy

    def _reclaim(self, deadline: float) -> None:
        """Checkpoint, then hand free pages back to the filesystem a WAL's worth at a time."""
        self._checkpoint()
        chunk = max(1, self._wal_pages // 2)
        conn = self._conn
        try:
            free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                return  # a database from before auto_vacuum that was not empty at open: reuse, no shrink
            while free_pages and time.monotonic() < deadline:
                conn.execute(f"PRAGMA incremental_vacuum({chunk})").fetchall()
                if not self._checkpoint():
                    break
                left = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if left >= free_pages:
                    break
                free_pages = left
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise

    def _make_reserve(self) -> bool:
        """Allocate (not just size: a sparse file frees nothing) the reserve file; False if it won't fit."""
        try:
            if self.reserve.stat().st_blocks * 512 >= self.reserve_bytes:
                return True
        except OSError:
            pass
        try:
            with open(self.reserve, "wb") as file:
                try:
                    os.posix_fallocate(file.fileno(), 0, self.reserve_bytes)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise
                    block = b"\0" * (64 * 1024)  # the filesystem cannot fallocate: write it out
                    for offset in range(0, self.reserve_bytes, len(block)):
                        file.write(block[: self.reserve_bytes - offset])
                    file.flush()
                    os.fsync(file.fileno())
            return True
        except OSError:
            self._release_reserve()
            return False

    def _release_reserve(self) -> int:
        try:
            size = self.reserve.stat().st_size
            self.reserve.unlink()
        except OSError:
            return 0
        return size

    @property
    def depth(self) -> int:
        return self._depth

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


class MemoryOutbox(_OutboxCounters):
    """`outbox: {enabled: false}`: the same queue interface with nothing persisted.

    A prediction made while `is_connected()` is false is lost at once (counted in `dropped`); one made
    while connected waits in memory only for the publisher to hand it to MQTT with the configured QoS
    (so a broker restart right then is still covered by the MQTT session). A restart loses what is queued
    and starts seq again at 1 (the new boot_id tells the runs apart).
    """

    disk_full = 0
    boots = 1
    recovered_from: Path | None = None
    storing = True  # memory never fills a disk

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, is_connected: Callable[[], bool] | None = None):
        if max_bytes <= 0:
            raise OutboxError(f"outbox.max_bytes: must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.is_connected: Callable[[], bool] = is_connected or (lambda: True)
        self._lock = threading.Lock()
        self._rows: dict[int, OutboxMessage] = {}  # insertion order is seq order
        self._next_seq = 1
        self._bytes = 0
        self._dropped = 0
        log.warning(
            "outbox disabled (outbox.enabled: false): predictions are not persisted; every prediction made "
            "while the broker is away, and any not yet sent at a restart, is lost"
        )

    def add(self, payload: dict[str, Any], topic: str | None = None, qos: int | None = None) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            payload["seq"] = seq
            if not self.is_connected():
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("outbox disabled and broker away: %d predictions lost so far", self._dropped)
                return seq
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            self._rows[seq] = OutboxMessage(seq, topic, data, qos)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._rows:
                oldest = next(iter(self._rows))
                self._bytes -= len(self._rows.pop(oldest).payload)
                self._dropped += 1
            return seq

    def pending_messages(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        with self._lock:
            out: list[OutboxMessage] = []
            for seq, row in self._rows.items():
                if seq > after:
                    out.append(row)
                    if len(out) >= limit:
                        break
            return out

    def ack_many(self, seqs: Iterable[int]) -> int:
        deleted = 0
        with self._lock:
            for seq in {int(s) for s in seqs}:
                row = self._rows.pop(seq, None)
                if row is not None:
                    self._bytes -= len(row.payload)
                    deleted += 1
        return deleted

    @property
    def depth(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._lock:
            log.info(
                "outbox disabled: %d predictions made, %d lost (broker away or memory bound), %d unsent at "
                "stop",
                self._next_seq - 1,
                self._dropped,
                len(self._rows),
            )

    def __enter__(self) -> MemoryOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
