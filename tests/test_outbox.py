"""The durable outbox on a real SQLite file: seq persistence, bound and drop accounting, recovery."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.publish.outbox import SEQ_RESERVE, MemoryOutbox, Outbox, OutboxError


def message(i: int, size: int = 0) -> dict[str, object]:
    return {"schema": "edge.prediction/1", "seq": None, "i": i, "pad": "x" * size}


def stored_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT seq FROM messages ORDER BY seq")]


def test_add_assigns_consecutive_seq_and_pending_is_oldest_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        payloads = [message(i) for i in range(5)]
        seqs = [outbox.add(p) for p in payloads]
        assert seqs == [1, 2, 3, 4, 5]
        assert [p["seq"] for p in payloads] == seqs  # written into the payload at persist time
        pending = outbox.pending(10)
        assert [seq for seq, _ in pending] == seqs
        assert [json.loads(data)["seq"] for _, data in pending] == seqs
        assert outbox.pending(2, after=3) == pending[3:5]
        outbox.ack(2)
        assert outbox.ack_many([1, 2, 99]) == 1  # already gone or never there: ignored
        assert outbox.depth == 3
        assert [seq for seq, _ in outbox.pending(10)] == [3, 4, 5]
        conn = sqlite3.connect(tmp_path / "outbox.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_seq_survives_restart_and_is_never_reused_after_acks(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        for i in range(7):
            outbox.add(message(i))
        outbox.ack_many(range(1, 8))
        assert outbox.depth == 0
    with Outbox(path) as outbox:
        assert outbox.add(message(7)) == 8
        assert outbox.boots == 2
    with Outbox(path) as outbox:
        assert [seq for seq, _ in outbox.pending(10)] == [8]
        assert outbox.add(message(8)) == 9


def test_bound_drops_oldest_and_counts_exactly(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    total = 400
    with Outbox(path, max_bytes=20_000) as outbox:
        for i in range(total):
            outbox.add(message(i, size=i % 300))
            assert outbox.size_bytes <= 20_000
        present = stored_seqs(path)
        missing = set(range(1, total + 1)) - set(present)
        assert outbox.dropped == len(missing) > 0
        assert present == list(range(min(present), total + 1))  # only the oldest ones went
        assert outbox.depth == len(present)
        dropped = outbox.dropped
    with Outbox(path, max_bytes=20_000) as outbox:
        assert outbox.dropped == dropped  # persisted
        assert outbox.depth == len(present)


def test_concurrent_adds_and_acks_keep_seq_unique_and_contiguous(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    got: list[list[int]] = [[], []]
    stop = threading.Event()
    acked: list[int] = []

    def produce(slot: int) -> None:
        for i in range(300):
            got[slot].append(outbox.add(message(i)))

    def consume() -> None:
        after = 0
        while not stop.is_set() or outbox.depth:
            rows = outbox.pending(50, after=after)
            if rows:
                after = rows[-1][0]
                outbox.ack_many(seq for seq, _ in rows)
                acked.extend(seq for seq, _ in rows)

    threads = [threading.Thread(target=produce, args=(s,)) for s in (0, 1)]
    consumer = threading.Thread(target=consume)
    consumer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    consumer.join(30)
    assert sorted(got[0] + got[1]) == list(range(1, 601))
    assert sorted(acked) == list(range(1, 601))
    assert outbox.depth == 0 and outbox.size_bytes == 0
    outbox.close()


def test_corrupt_database_is_moved_aside_and_seq_keeps_rising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        for i in range(10):
            outbox.add(message(i))
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="edge.publish.outbox"), Outbox(path) as outbox:
        assert outbox.recovered_from is not None and outbox.recovered_from.exists()
        assert outbox.recovered_from.name.startswith("outbox.db.corrupt-")
        assert outbox.depth == 0
        assert outbox.add(message(10)) > 10  # from the sidecar's reserved mark: a gap, never a reuse
    assert "corrupt" in caplog.text and str(outbox.recovered_from) in caplog.text


def test_deleted_database_seeds_seq_from_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        for i in range(SEQ_RESERVE + 5):  # crosses one reservation
            outbox.add(message(i))
    for leftover in tmp_path.glob("outbox.db*"):
        if not leftover.name.endswith(".seq"):
            leftover.unlink()
    with Outbox(path) as outbox:
        assert outbox.add(message(0)) > SEQ_RESERVE + 5


def test_disk_full_is_counted_and_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    pages = outbox._conn.execute("PRAGMA page_count").fetchone()[0]
    outbox._conn.execute(f"PRAGMA max_page_count={pages + 2}")  # SQLITE_FULL, as a full disk gives
    seqs = [outbox.add(message(i, size=3000)) for i in range(10)]
    assert outbox.disk_full > 0 and not outbox.storing
    assert seqs == list(range(1, 11))  # every seq consumed once, so subscribers see the gap
    assert outbox.depth == 10 - outbox.disk_full
    outbox._conn.execute("PRAGMA max_page_count=1073741823")
    assert outbox.recover_space() and outbox.storing  # (also retried on every add and ack)
    assert outbox.add(message(10)) == 11
    assert outbox.pending(100)[-1][0] == 11
    outbox.close()


def test_bad_bound_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="max_bytes"):
        Outbox(tmp_path / "outbox.db", max_bytes=0)


def test_truncated_database_is_recovered_without_reusing_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        for i in range(3000):
            outbox.add(message(i, size=200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])  # a torn copy, as a failing SD card leaves it
    with Outbox(path) as outbox:
        assert outbox.recovered_from is not None
        assert outbox.add(message(0)) > 3000
    with Outbox(path) as outbox:  # and the fresh database is healthy afterwards
        assert outbox.recovered_from is None
        assert outbox.depth == 1


def test_ack_of_a_row_dropped_in_flight_takes_it_back_out_of_dropped(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, max_bytes=5_000)
    for i in range(10):
        outbox.add(message(i, size=300))
    in_flight = [seq for seq, _ in outbox.pending(4)]  # handed to the publisher, not yet acked
    for i in range(10, 30):
        outbox.add(message(i, size=300))
    assert set(in_flight) <= set(range(1, outbox.dropped + 1))  # the bound dropped them meanwhile
    before = outbox.dropped
    assert outbox.ack_many(in_flight) == 0  # late PUBACKs: the broker has them after all
    assert outbox.dropped == before - len(in_flight)
    assert outbox.ack_many(in_flight) == 0 and outbox.dropped == before - len(in_flight)  # once only
    outbox.close()
    with Outbox(path, max_bytes=5_000) as reopened:
        assert reopened.dropped == before - len(in_flight)  # persisted


# -- a full disk: a real 1 MiB tmpfs (root only), or SQLite's page limit where that is enough ---------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: writes really fail with ENOSPC, as on a full SD card."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, timeout=10
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def fill_until_full(outbox: Outbox, size: int = 500) -> int:
    """Add until the first prediction is lost to the full disk; returns how many were stored."""
    for i in range(100_000):
        outbox.add(message(i, size=size))
        if outbox.disk_full:
            return outbox.depth
    raise AssertionError("the disk never filled")


def ack_everything(outbox: Outbox) -> None:
    after = 0
    while rows := outbox.pending(100, after):
        after = rows[-1][0]
        outbox.ack_many(seq for seq, _ in rows)


def fill_the_rest(directory: Path) -> Path:
    """Take every free block of the filesystem with one file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while file.write(block):
                pass
    return filler


def test_full_disk_recovers_while_running_once_acks_free_space(small_disk: Path) -> None:
    path = small_disk / "outbox.db"
    outbox = Outbox(path, max_bytes=64 << 20)  # the disk, not the bound, is the limit
    assert outbox.reserve.stat().st_size == outbox.reserve_bytes > 0
    stored = fill_until_full(outbox)
    assert stored > 100 and not outbox.storing
    assert not outbox.reserve.exists()  # given up so the deletes below have room
    lost = [outbox.add(message(i)) for i in range(50)]
    assert outbox.disk_full == 51 and outbox.depth == stored
    ack_everything(outbox)  # the broker is back
    assert outbox.depth == 0
    assert outbox.recover_space() and outbox.storing
    assert outbox.reserve.stat().st_size == outbox.reserve_bytes  # ready for the next time
    assert path.stat().st_size < 256 << 10  # freed pages went back to the filesystem
    seq = outbox.add(message(0))
    assert seq == lost[-1] + 1 and outbox.pending(10)[-1][0] == seq  # stored again, no seq reused
    outbox.close()
    with Outbox(path, max_bytes=64 << 20) as reopened:
        assert reopened.add(message(1)) == seq + 1


def test_without_the_reserve_a_full_disk_cannot_even_delete(small_disk: Path) -> None:
    """Why the reserve exists: with no room left, SQLite cannot write the WAL frames a delete needs."""
    outbox = Outbox(small_disk / "outbox.db", max_bytes=64 << 20, reserve_bytes=0)
    stored = fill_until_full(outbox)
    ack_everything(outbox)
    assert outbox.depth == stored  # nothing could be deleted ...
    assert not outbox.recover_space()  # ... so nothing can be stored either
    outbox.close()


def test_an_ack_that_cannot_be_written_is_settled_later(small_disk: Path) -> None:
    """A PUBACK for a row the bound dropped in flight takes it out of `dropped`; when the disk was too full
    to write that ack, it used to be forgotten (by the outbox and by the publisher, which had already let
    the mid go), leaving `dropped` over-counting a delivered row for good."""
    path = small_disk / "outbox.db"
    outbox = Outbox(path, max_bytes=5_000, reserve_bytes=0)
    for i in range(10):
        outbox.add(message(i, size=300))
    in_flight = [seq for seq, _ in outbox.pending(4)]
    for i in range(10, 30):
        outbox.add(message(i, size=300))
    live = [seq for seq, _ in outbox.pending(100)]
    before = outbox.dropped
    assert set(in_flight) <= set(range(1, before + 1))
    outbox._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no WAL space left to reuse
    filler = fill_the_rest(small_disk)
    assert outbox.ack_many([*in_flight, *live[:3]]) == 0  # cannot be written now
    assert outbox.dropped == before and outbox.depth == len(live)
    filler.unlink()
    assert outbox.recover_space()  # settles the kept acks
    assert outbox.dropped == before - len(in_flight)
    assert outbox.depth == len(live) - 3
    outbox.close()
    with Outbox(path, max_bytes=5_000, reserve_bytes=0) as reopened:
        assert reopened.dropped == before - len(in_flight)
        assert [seq for seq, _ in reopened.pending(100)] == live[3:]


def test_duplicate_acks_in_one_batch_take_a_drop_back_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=5_000)
    for i in range(10):
        outbox.add(message(i, size=300))
    in_flight = [seq for seq, _ in outbox.pending(2)]
    for i in range(10, 30):
        outbox.add(message(i, size=300))
    before = outbox.dropped
    outbox.ack_many([*in_flight, *in_flight])
    assert outbox.dropped == before - len(in_flight)
    outbox.close()


def test_restart_while_the_disk_is_full_never_reuses_the_lost_seqs(tmp_path: Path) -> None:
    """Seqs consumed while nothing reached the database are covered by the sidecar's unsynced mark."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    for i in range(5):
        outbox.add(message(i))
    pages = outbox._conn.execute("PRAGMA page_count").fetchone()[0]
    outbox._conn.execute(f"PRAGMA max_page_count={pages}")
    lost = [outbox.add(message(i, size=5000)) for i in range(10)]
    assert outbox.disk_full == 10 and lost == list(range(6, 16))
    outbox.close()  # e.g. SIGTERM before space came back
    with Outbox(path) as reopened:
        assert reopened.add(message(0)) > 15
    with Outbox(path) as again:  # once stored again, the database is trusted: no gap per restart
        assert again.add(message(0)) == reopened.next_seq


def test_the_reserve_file_is_allocated_and_sized_from_the_filesystem(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        assert 128 << 10 <= outbox.reserve_bytes <= 8 << 20
        assert outbox.reserve.stat().st_blocks * 512 >= outbox.reserve_bytes  # not a sparse file
    with Outbox(tmp_path / "none.db", reserve_bytes=0) as outbox:
        assert not outbox.reserve.exists()
    with pytest.raises(OutboxError, match="reserve_bytes"):
        Outbox(tmp_path / "bad.db", reserve_bytes=-1)


# -- outbox: {enabled: false} ------------------------------------------------------------------------------


def test_memory_outbox_loses_what_is_made_while_the_broker_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    connected = [True]
    with caplog.at_level(logging.WARNING, logger="edge.publish.outbox"):
        outbox = MemoryOutbox(max_bytes=4096, is_connected=lambda: connected[0])
    assert "predictions are not persisted" in caplog.text
    assert [outbox.add(message(i)) for i in range(3)] == [1, 2, 3]
    connected[0] = False
    assert [outbox.add(message(i)) for i in range(3, 5)] == [4, 5]  # seq consumed: subscribers see a gap
    connected[0] = True
    assert outbox.add(message(5)) == 6
    assert outbox.dropped == 2
    assert [seq for seq, _ in outbox.pending(10)] == [1, 2, 3, 6]
    assert [seq for seq, _ in outbox.pending(10, after=2)] == [3, 6]
    assert json.loads(outbox.pending(1)[0][1])["seq"] == 1
    assert outbox.ack_many([1, 2, 2]) == 2 and outbox.depth == 2
    for i in range(20):  # the memory bound still holds, dropping (and counting) the oldest
        outbox.add(message(i, size=500))
    assert outbox.size_bytes <= 4096 and outbox.dropped > 2
    outbox.close()
    assert list(tmp_path.iterdir()) == []  # nothing persisted anywhere


def test_outbox_switch_in_the_config() -> None:
    from pydantic import ValidationError

    from edge.config import OutboxConfig

    assert OutboxConfig().enabled is True
    assert OutboxConfig.model_validate({"enabled": False}).enabled is False
    with pytest.raises(ValidationError, match="enabled"):
        OutboxConfig.model_validate({"enabled": "sometimes"})
