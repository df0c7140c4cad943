"""Fault scenarios (issue 7): a real mosquitto, the daemon as a real process, a counting subscriber.

Each test asserts its guarantee and appends its counted figures to the session's table (report.py), which
is written to $EDGE_CACHE/faults/report.md and printed at the end. The fast ones run in the default
suite; `tools/faults.sh` runs them all, slow ones included.

The load is a sensor file (real sensor source, real ONNX Runtime session of a tiny model) replayed at a
fixed rate of windows per second, so every scenario produces a known, steady stream of QoS 1 predictions.

Showing that the scenarios catch a broken guarantee ("disable the outbox"):
`test_scenario_1_fails_with_the_outbox_disabled` runs scenario 1 with `outbox: {enabled: false}` and shows
the same check failing, with its row in the table; the slow
`test_scenario_1_fails_when_the_outbox_cannot_hold_the_outage` does the same with the outbox cut to its
4 KiB minimum. By hand:
`EDGE_FAULTS_OUTBOX_MAX_BYTES=4096 tools/faults.sh -k sigterm_outage` fails with the count of lost seqs.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.counting import CountingSubscriber, ScenarioResult
from tests.faults.daemon_proc import (
    DEVICE,
    CommandClient,
    DaemonProcess,
    outbox_disk_bytes,
    read_outbox,
    rss_bytes,
)
from tests.faults.helpers import FaultRig
from tests.faults.report import record


def _wait(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _produced(daemon: DaemonProcess) -> int:
    return read_outbox(daemon.outbox_path)["next_seq"] - 1


def _recovery_after(rig: FaultRig, seen_before: int, since: float, timeout: float) -> float:
    """Seconds from `since` until the counter receives a seq above `seen_before` (inf if it never does)."""
    if _wait(lambda: rig.max_seen() > seen_before, timeout, 0.01):
        return time.monotonic() - since
    return float("inf")


def _result(
    name: str,
    counter: CountingSubscriber,
    produced: int,
    dropped: int,
    recovery: float | None,
    note: str,
) -> ScenarioResult:
    count = counter.snapshot(DEVICE)
    missing = count.missing(1, produced)
    return record(
        ScenarioResult(
            scenario=name,
            produced=produced,
            delivered=len(count.seqs & set(range(1, produced + 1))),
            missing=len(missing),
            duplicated=count.duplicates,
            dropped_counted=dropped,
            recovery_s=recovery,
            note=note,
        )
    )


def _result_of_stopped_daemon(
    rig: FaultRig,
    daemon: DaemonProcess,
    name: str,
    recovery: float | None,
    note: str,
    *,
    dropped: int | None = None,
) -> ScenarioResult:
    """The scenario's row once `daemon` has stopped: waits up to 20 s for the counter to see every seq the
    daemon produced. `dropped` defaults to the outbox's own drop counter."""
    produced = _produced(daemon)
    rig.counter.wait_for(DEVICE, produced, 20)
    if dropped is None:
        dropped = read_outbox(daemon.outbox_path)["dropped"]
    return _result(name, rig.counter, produced, dropped, recovery, note)


# ---------------------------------------------------------------------------------------------------------
# 1. the broker goes away while the daemon publishes


def _broker_outage(
    rig: FaultRig,
    *,
    sig: int,
    windows: int,
    rate: float,
    outage_s: float,
    max_bytes: int = 0,  # 0: 16 MiB (holds the whole outage) or $EDGE_FAULTS_OUTBOX_MAX_BYTES
    label: str = "",
    subscriber_offline_s: float = 0.0,
) -> tuple[ScenarioResult, list[int], list[int], int]:
    window = 100
    max_bytes = max_bytes or int(os.environ.get("EDGE_FAULTS_OUTBOX_MAX_BYTES", 16 << 20))
    config = rig.config(
        windows=windows,
        rate=rate,
        loop=False,
        inflight_window=window,
        max_bytes=max_bytes,
    )
    daemon = rig.start(config)
    assert _wait(lambda: rig.max_seen() >= windows // 5, 60), daemon.log_tail()
    if subscriber_offline_s:
        # The broker now has to queue (and persist) what it acknowledges instead of passing it straight on.
        rig.counter.stop()
        time.sleep(subscriber_offline_s)
    rig.broker.stop(sig)
    unacked_at_stop = _settled_pending(daemon.outbox_path)
    seen_before = rig.max_seen()
    time.sleep(outage_s - 0.5)
    restarted = time.monotonic()
    rig.broker.start()
    if subscriber_offline_s:
        rig.counter.start()
    recovery = _recovery_after(rig, seen_before, restarted, 60)
    assert daemon.wait_exit(120) == 0, daemon.log_tail()  # the file ended; it flushed and exited
    state = read_outbox(daemon.outbox_path)
    produced = state["next_seq"] - 1
    assert state["pending"] == [], "the daemon exited with unacknowledged predictions"
    if not rig.counter.wait_for(DEVICE, produced, 30 if sig == signal.SIGTERM else 0.5):
        # After a broker SIGKILL some may be gone for good: wait for the newest, then a short grace.
        _wait(lambda: rig.max_seen() >= produced, 30)
        time.sleep(1.0)
    missing = rig.counter.snapshot(DEVICE).missing(1, produced)
    name = f"1. broker {signal.Signals(sig).name} {outage_s:g} s{label}"
    note = (
        f"{windows} windows at {rate:.0f}/s; in-flight window {window}; "
        f"{len(unacked_at_stop)} unacked in the outbox at the stop"
    )
    if subscriber_offline_s:
        note += f"; subscriber offline {subscriber_offline_s:.1f} s before the stop"
    if missing:
        note += f"; missing seqs {missing[0]}..{missing[-1]}"
        if not set(missing) & set(unacked_at_stop):
            note += ", all acked by the broker before the stop"
    result = _result(name, rig.counter, produced, state["dropped"], recovery, note)
    return result, missing, unacked_at_stop, window


def _settled_pending(outbox_path: Path, timeout: float = 10.0) -> list[int]:
    """The outbox rows still unacknowledged once the daemon has processed every PUBACK that arrived before
    the broker went away. A fixed sleep was not enough on a loaded machine: PUBACKs processed late made
    messages the broker had acknowledged (and then lost in a SIGKILL) look like ones the daemon never resent.
    """
    # The daemon keeps inferring while the broker is away: only rows that existed at the stop can settle.
    at_stop = read_outbox(outbox_path)["pending"]
    cutoff = max(at_stop, default=0)
    previous: list[int] | None = None
    stable_reads = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        pending = [seq for seq in read_outbox(outbox_path)["pending"] if seq <= cutoff]
        stable_reads = stable_reads + 1 if pending == previous else 0
        if stable_reads >= 4:  # unchanged for a full second: nothing left in flight to settle
            return pending
        previous = pending
    return previous or []


def _assert_outage(result: ScenarioResult, missing: list[int], unacked: list[int], window: int) -> None:
    assert result.produced > 0
    assert result.duplicated <= window, f"{result.duplicated} duplicates > in-flight window {window}"
    # Everything the daemon had not seen acknowledged when the broker went away was sent again.
    assert not set(missing) & set(unacked), (
        f"unacked seqs never delivered: {sorted(set(missing) & set(unacked))}"
    )
    assert result.dropped_counted == 0


def test_broker_sigterm_outage_loses_nothing(rig: FaultRig) -> None:
    result, missing, unacked, window = _broker_outage(
        rig, sig=signal.SIGTERM, windows=1500, rate=250, outage_s=3
    )
    _assert_outage(result, missing, unacked, window)
    assert missing == [], f"{len(missing)} predictions lost across a clean broker restart"
    assert result.recovery_s is not None and result.recovery_s < 10


def test_broker_sigkill_outage_resends_everything_unacked(rig: FaultRig) -> None:
    result, missing, unacked, window = _broker_outage(
        rig, sig=signal.SIGKILL, windows=1500, rate=250, outage_s=3
    )
    _assert_outage(result, missing, unacked, window)
    # Only what the broker acknowledged and had not persisted (autosave_interval 1 s) can be lost.
    assert all(seq < min(unacked, default=result.produced + 1) for seq in missing)


def test_broker_sigkill_with_subscriber_offline_loses_only_unpersisted_acked(rig: FaultRig) -> None:
    """With the subscriber away, the broker holds what it acknowledged; a SIGKILL loses what it had not
    yet saved (autosave_interval 1 s in tests/broker.py). The daemon cannot know: it saw the PUBACKs."""
    rate = 250
    result, missing, unacked, window = _broker_outage(
        rig,
        sig=signal.SIGKILL,
        windows=2000,  # the file must outlast the outage, or the daemon exits with a full outbox
        rate=rate,
        outage_s=2.5,
        label=", subscriber offline",
        subscriber_offline_s=1.5,
    )
    _assert_outage(result, missing, unacked, window)
    assert all(seq < min(unacked, default=result.produced + 1) for seq in missing)
    # About one autosave interval of acknowledged messages (two allowed: saving takes time under load).
    assert len(missing) <= 2 * rate + window


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_outage_10k_predictions(
    rig: FaultRig,
    sig: int,
) -> None:
    result, missing, unacked, window = _broker_outage(rig, sig=sig, windows=10_000, rate=400, outage_s=5)
    _assert_outage(result, missing, unacked, window)
    if sig == signal.SIGTERM:
        assert missing == []


@pytest.mark.slow
def test_scenario_1_fails_when_the_outbox_cannot_hold_the_outage(rig: FaultRig) -> None:
    """The guarantee check of scenario 1 is not vacuous: with the outbox cut to its 4 KiB minimum the same
    outage loses predictions and the check sees it (and the bound's drop counter counts them)."""
    result, missing, _unacked, _window = _broker_outage(
        rig,
        sig=signal.SIGTERM,
        windows=1500,
        rate=250,
        outage_s=3,
        max_bytes=4096,
        label=", outbox crippled to 4 KiB",
    )
    with pytest.raises(AssertionError):
        assert missing == []  # the very check test_broker_sigterm_outage_loses_nothing makes
    assert len(missing) == result.missing > 0
    assert result.dropped_counted >= result.missing  # the loss is at least counted


def test_scenario_1_fails_with_the_outbox_disabled(rig: FaultRig) -> None:
    """The guarantee check of scenario 1 is not vacuous: with `outbox: {enabled: false}` the same broker
    stop loses every prediction made while the broker is away, and the counting subscriber sees it."""
    windows, rate, outage_s = 1500, 250, 2.5
    config = rig.config(windows=windows, rate=rate, loop=False, outbox_enabled=False)
    daemon = rig.start(config)
    assert "predictions are not persisted" in daemon.log_tail(20_000)
    assert _wait(lambda: rig.max_seen() >= windows // 5, 60), daemon.log_tail()
    rig.broker.stop(signal.SIGTERM)
    seen_before = rig.max_seen()
    time.sleep(outage_s)
    restarted = time.monotonic()
    rig.broker.start()
    recovery = _recovery_after(rig, seen_before, restarted, 60)
    assert daemon.wait_exit(120) == 0, daemon.log_tail()  # the file ended; it flushed and exited
    summary = re.search(
        r"outbox disabled: (\d+) predictions made, (\d+) lost", daemon.log.read_text(errors="replace")
    )
    assert summary is not None, daemon.log_tail()
    produced, lost = int(summary[1]), int(summary[2])
    _wait(lambda: rig.max_seen() >= produced, 10)
    missing = rig.counter.snapshot(DEVICE).missing(1, produced)
    result = _result(
        f"1. broker SIGTERM {outage_s:g} s, outbox disabled",
        rig.counter,
        produced,
        lost,
        recovery,
        f"outbox disabled: {len(missing)} missing (seqs {_ranges(missing)}), {lost} counted as lost "
        f"while the broker was away; {windows} windows at {rate:.0f}/s",
    )
    with pytest.raises(AssertionError):
        assert missing == []  # the very check test_broker_sigterm_outage_loses_nothing makes
    assert result.missing == len(missing) > 0
    assert len(missing) <= lost  # every loss is at least counted
    assert not daemon.outbox_path.exists(), "the disabled outbox wrote a database"


# ---------------------------------------------------------------------------------------------------------
# 2. the daemon is SIGKILLed at random moments and restarted


def _daemon_kills(rig: FaultRig, kills: int) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    config = rig.config(windows=2000, rate=200, loop=True)
    daemon = rig.start(config)
    recoveries = []
    for _ in range(kills):
        time.sleep(rng.uniform(0.2, 1.5))
        daemon.kill()
        seen_before = rig.max_seen()
        restarted = time.monotonic()
        daemon.start()
        daemon.wait_ready()
        recoveries.append(_recovery_after(rig, seen_before, restarted, 30))
    time.sleep(1.0)
    assert daemon.stop() == 0, daemon.log_tail()
    state = read_outbox(daemon.outbox_path)
    produced = state["next_seq"] - 1
    assert state["pending"] == [], "a clean stop left unacknowledged predictions"
    rig.counter.wait_for(DEVICE, produced, 30)
    reused = rig.counter.ledger.reused()  # type: ignore[attr-defined]
    count = rig.counter.snapshot(DEVICE)
    result = _result(
        f"2. daemon SIGKILL x{kills}",
        rig.counter,
        produced,
        state["dropped"],
        max(recoveries),
        f"random kill moments (seed {seed}); {len(count.boot_ids)} boots seen; "
        f"recovery = restart to the next new seq, worst of {kills}",
    )
    assert result.missing == 0, f"missing seqs {count.missing(1, produced)[:20]}"
    assert reused == [], f"seqs reused with different payloads: {reused[:20]}"
    assert count.duplicates <= kills * INFLIGHT_WINDOW  # at most one window re-sent per restart
    assert len(count.boot_ids) >= kills + 1
    assert state["boots"] == kills + 1


def test_daemon_sigkilled_3_times_loses_nothing_and_never_reuses_seq(rig: FaultRig) -> None:
    _daemon_kills(rig, kills=3)


@pytest.mark.slow
def test_daemon_sigkilled_20_times_loses_nothing_and_never_reuses_seq(rig: FaultRig) -> None:
    _daemon_kills(rig, kills=20)


# ---------------------------------------------------------------------------------------------------------
# 3. the broker is away long enough to fill the outbox bound

# What SQLite adds to `max_bytes` of payload: row/page overhead and free pages in the main file (bounded
# here by a factor of two plus 64 KiB), and a WAL that grows up to its autocheckpoint (1000 pages of 4 KiB)
# before it is reset.
DB_OVERHEAD_FACTOR = 2
DB_OVERHEAD_BYTES = 64 << 10
WAL_LIMIT_BYTES = 1000 * 4096 + (64 << 10)
INFLIGHT_WINDOW = 100  # the config default fault_config uses


def test_outbox_bound_holds_and_drops_equal_missing_exactly(rig: FaultRig) -> None:
    max_bytes = 32 << 10
    config = rig.config(windows=2000, rate=250, loop=True, max_bytes=max_bytes)
    rig.broker.stop()  # the counter's session (and its subscription) is persisted; predictions pile up
    daemon = rig.start(config)
    peak = {"db": 0, "-wal": 0, "-shm": 0}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for key, size in outbox_disk_bytes(daemon.outbox_path).items():
            peak[key] = max(peak[key], size)
        if read_outbox(daemon.outbox_path)["dropped"] >= 500:
            break
        time.sleep(0.1)
    dropped_while_away = read_outbox(daemon.outbox_path)["dropped"]
    assert dropped_while_away >= 500, daemon.log_tail()
    restarted = time.monotonic()
    rig.broker.start()
    recovery = _recovery_after(rig, 0, restarted, 60)
    at_restart = _produced(daemon)
    assert _wait(lambda: rig.max_seen() >= at_restart, 60), daemon.log_tail()
    assert daemon.stop() == 0, daemon.log_tail()
    state = read_outbox(daemon.outbox_path)
    produced = state["next_seq"] - 1
    rig.counter.wait_for(DEVICE, produced, 2)
    count = rig.counter.snapshot(DEVICE)
    missing = count.missing(1, produced)
    result = _result(
        "3. outbox bound 32 KiB, broker away",
        rig.counter,
        produced,
        state["dropped"],
        recovery,
        f"peak on disk: db {peak['db'] // 1024} KiB, wal {peak['-wal'] // 1024} KiB, "
        f"shm {peak['-shm'] // 1024} KiB (bound {max_bytes // 1024} KiB of payload)",
    )
    assert state["pending"] == []
    assert peak["db"] <= DB_OVERHEAD_FACTOR * max_bytes + DB_OVERHEAD_BYTES, peak
    assert peak["-wal"] <= WAL_LIMIT_BYTES, peak
    assert result.duplicated <= INFLIGHT_WINDOW
    assert missing == list(range(1, len(missing) + 1)), "only the oldest predictions may be dropped"
    assert len(missing) <= state["dropped"], f"{len(missing)} missing but only {state['dropped']} counted"
    counted_but_delivered = state["dropped"] - len(missing)
    assert counted_but_delivered <= INFLIGHT_WINDOW
    if counted_but_delivered:
        # Known defect (reported on issue 7): when the broker returns while the outbox is still at its
        # bound, `Outbox._trim` deletes rows the publisher already handed to paho; they are delivered
        # anyway but counted as dropped, so the counter over-reports by up to the in-flight window.
        result.note += f"; {counted_but_delivered} counted as dropped were delivered (trimmed in flight)"
        pytest.xfail(
            f"drop counter {state['dropped']} != missing {len(missing)}: "
            f"{counted_but_delivered} in-flight rows trimmed and delivered anyway"
        )


# ---------------------------------------------------------------------------------------------------------
# 4. the broker stops answering (SIGSTOP): a black hole, not a closed socket


@pytest.mark.slow
def test_paused_broker_is_noticed_within_keepalive_and_drained_after(rig: FaultRig) -> None:
    keepalive = 5
    config = rig.config(windows=2000, rate=100, loop=True, keepalive=keepalive)
    daemon = rig.start(config)
    assert _wait(lambda: rig.max_seen() >= 100, 30), daemon.log_tail()
    log_before = daemon.log.read_text(errors="replace").count("mqtt disconnected")
    produced_at_pause = _produced(daemon)
    paused = time.monotonic()
    rig.broker.pause()
    try:
        noticed = _wait(
            lambda: daemon.log.read_text(errors="replace").count("mqtt disconnected") > log_before,
            3 * keepalive,
            0.1,
        )
        noticed_after = time.monotonic() - paused
        produced_in_pause = _produced(daemon) - produced_at_pause
    finally:
        rig.broker.resume()
    resumed = time.monotonic()
    seen_before = rig.max_seen()
    recovery = _recovery_after(rig, seen_before, resumed, 60)
    target = _produced(daemon)
    assert _wait(lambda: rig.max_seen() >= target, 60), daemon.log_tail()
    assert daemon.stop() == 0, daemon.log_tail()
    result = _result_of_stopped_daemon(
        rig,
        daemon,
        f"4. broker SIGSTOP (keepalive {keepalive} s)",
        recovery,
        f"disconnect noticed after {noticed_after:.1f} s; {produced_in_pause} predictions made while paused",
    )
    assert noticed and noticed_after <= 2 * keepalive + 1, f"noticed={noticed} after {noticed_after:.1f} s"
    assert produced_in_pause > 0, "inference stopped while the broker was unreachable"
    assert result.missing == 0


# ---------------------------------------------------------------------------------------------------------
# 5. the outbox's disk fills up


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10
    )
    return done.returncode == 0


@pytest.mark.slow
def test_full_disk_under_the_outbox_keeps_the_daemon_running_and_recovers(rig: FaultRig) -> None:
    """The outbox's filesystem (a 1 MiB tmpfs) fills while the broker is away. The daemon keeps inferring
    and counts every prediction it cannot store; once the broker is back and its acks free space, it
    stores and delivers new predictions again without a restart, and what is missing is exactly what it
    counted (no seq reused)."""
    state = rig.workdir / "state"
    if not _mount_tmpfs(state, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        config = rig.config(windows=2000, rate=250, loop=True, max_bytes=64 << 20)
        rig.broker.stop()  # predictions pile up until the 1 MiB filesystem is full
        daemon = rig.start(config)
        ready = time.monotonic()

        def logged(text: str) -> bool:
            return text in daemon.log.read_text(errors="replace")

        assert _wait(lambda: logged("predictions lost so far"), 60), daemon.log_tail()
        full_at = time.monotonic()
        time.sleep(2.0)
        assert daemon.running, f"the daemon died on a full disk:\n{daemon.log_tail()}"
        assert not logged("storing again"), "space came back while the broker was still away"
        restarted = time.monotonic()
        rig.broker.start()
        delivered_after = _recovery_after(rig, 0, restarted, 60)
        assert delivered_after < 60, "nothing stored before the disk filled was delivered"
        assert _wait(lambda: logged("storing again"), 60), daemon.log_tail()
        storing_after = time.monotonic() - restarted
        # Recovered: predictions made from now on are stored and delivered again.
        target = _produced(daemon) + 250
        assert _wait(lambda: rig.max_seen() >= target, 30), daemon.log_tail()
        commands = CommandClient(rig.broker.port)
        try:
            lost = int(commands.call("stats")["result"]["stats"]["outbox"]["disk_full"])
        finally:
            commands.close()
        assert daemon.stop() == 0, daemon.log_tail()
        outbox = read_outbox(daemon.outbox_path)
        produced = outbox["next_seq"] - 1
        _wait(lambda: rig.max_seen() >= produced, 10)
        missing = rig.counter.snapshot(DEVICE).missing(1, produced)
        reused = rig.counter.ledger.reused()  # type: ignore[attr-defined]
        runs = _ranges(missing)
        result = _result(
            "5. outbox on a full 1 MiB tmpfs",
            rig.counter,
            produced,
            lost,
            storing_after,
            f"disk full {full_at - ready:.0f} s into the outage; {lost} predictions "
            f"made while it was full counted in disk_full (seqs {runs}); first delivery "
            f"{delivered_after:.1f} s after the broker returned; recovery = broker back to storing again, "
            "no restart",
        )
        assert outbox["pending"] == []
        assert lost > 0 and len(missing) == lost, f"{len(missing)} missing, {lost} counted: {runs}"
        assert reused == [], f"seqs reused with different payloads: {reused[:20]}"
        assert result.delivered > lost and daemon.starts == 1
    finally:
        for proc in rig.daemons:
            proc.kill()
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=10)


def _ranges(seqs: list[int]) -> str:
    """`3..7, 12` for [3, 4, 5, 6, 7, 12]."""
    runs: list[str] = []
    start = prev = None
    for seq in [*seqs, None]:
        if seq is not None and prev is not None and seq == prev + 1:
            prev = seq
            continue
        if start is not None:
            runs.append(f"{start}..{prev}" if prev != start else f"{start}")
        start = prev = seq
    return ", ".join(runs) or "none"


# ---------------------------------------------------------------------------------------------------------
# 6. a corrupt outbox database at start


def test_corrupt_outbox_is_moved_aside_and_a_fresh_one_serves(rig: FaultRig) -> None:
    config = rig.config(windows=2000, rate=100, loop=True)
    state_dir = rig.workdir / "state"
    state_dir.mkdir()
    garbage = b"this is not an SQLite database\0" * 512
    (state_dir / "outbox.db").write_bytes(garbage)
    started = time.monotonic()
    daemon = rig.start(config)
    assert _wait(lambda: rig.max_seen() >= 20, 30), daemon.log_tail()
    first_prediction = time.monotonic() - started
    log = daemon.log.read_text(errors="replace")
    assert daemon.stop() == 0, daemon.log_tail()
    line = next((ln for ln in log.splitlines() if "is corrupt" in ln), None)
    assert line is not None and "moved aside" in line, log[-3000:]
    aside = [
        p for p in state_dir.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    result = _result_of_stopped_daemon(
        rig,
        daemon,
        "6. corrupt outbox at start",
        first_prediction,
        f"moved aside to {aside[0].name}; recovery = start to 20 predictions delivered",
    )
    assert result.missing == 0


# ---------------------------------------------------------------------------------------------------------
# 7. the camera's file disappears and comes back


def test_vanished_source_reconnects_within_5_s_of_returning(rig: FaultRig) -> None:
    import shutil

    from tests.assets_media import labelled_clip

    camera = rig.workdir / "cam.mp4"
    shutil.copy(labelled_clip(fps=10.0, seconds_per_photo=1.0).path, camera)
    source = {
        "type": "video",
        "uri": str(camera),
        "fps": 20,
        "loop": True,
        "realtime": False,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 0.4,
    }
    config = rig.config(windows=0, rate=0, loop=True, source=source)
    daemon = rig.start(config)
    assert _wait(lambda: rig.max_seen() >= 10, 30), daemon.log_tail()
    away = camera.with_name("cam.away.mp4")
    camera.rename(away)  # the open capture plays out its pass, then every reopen fails

    def stalled() -> bool:
        before = rig.max_seen()
        time.sleep(1.0)
        return rig.max_seen() == before

    assert _wait(stalled, 20, 0), "predictions kept coming without the file"
    seen_before = rig.max_seen()
    away.rename(camera)
    returned = time.monotonic()
    recovery = _recovery_after(rig, seen_before, returned, 20)
    assert _wait(lambda: rig.max_seen() >= seen_before + 10, 20), "the stream did not resume"
    assert daemon.stop() == 0, daemon.log_tail()
    result = _result_of_stopped_daemon(
        rig,
        daemon,
        "7. source file gone and back",
        recovery,
        "recovery = file back to the next prediction delivered (reconnect backoff 0.2-0.4 s)",
    )
    assert recovery <= 5.0, f"no prediction within 5 s of the file coming back ({recovery:.1f} s)"
    assert result.missing == 0


# ---------------------------------------------------------------------------------------------------------
# 8. the watchdog: pings come from the inference loop and stop when the process does


def test_watchdog_pings_stop_when_the_daemon_is_frozen(rig: FaultRig) -> None:
    config = rig.config(windows=2000, rate=100, loop=True)
    daemon = rig.start(config, watchdog_usec=400_000)  # a ping every 0.1 s
    assert _wait(lambda: len(daemon.notify.lines("WATCHDOG=1")) >= 5, 10), daemon.log_tail()
    daemon.signal(signal.SIGSTOP)
    time.sleep(0.5)  # a ping sent just before the stop may still be on its way to our reader thread
    settled = len(daemon.notify.lines("WATCHDOG=1"))
    time.sleep(1.5)
    during = daemon.notify.lines("WATCHDOG=1")[settled:]
    daemon.signal(signal.SIGCONT)
    thawed = time.monotonic()
    back = daemon.notify.wait_for("WATCHDOG=1", 5, after=thawed)
    assert daemon.stop() == 0, daemon.log_tail()
    result = _result_of_stopped_daemon(
        rig,
        daemon,
        "8. watchdog while frozen (SIGSTOP 2 s)",
        None if back is None else back - thawed,
        f"{len(during)} pings while frozen; WATCHDOG_USEC 400000; recovery = SIGCONT to the next ping",
        dropped=0,
    )
    assert during == [], "watchdog pings kept coming from a frozen process"
    assert back is not None, "no watchdog ping after SIGCONT"
    assert result.missing == 0


# ---------------------------------------------------------------------------------------------------------
# 9. hot swap under load


def _hot_swaps(rig: FaultRig, swaps: int) -> int:
    """Reload the configured package `swaps` times over MQTT while predictions flow; returns RSS growth."""
    config = rig.config(windows=2000, rate=200, loop=True)
    daemon = rig.start(config)
    assert daemon.proc is not None
    commands = CommandClient(rig.broker.port)
    try:
        warm = min(5, swaps)
        failures = []
        rss_after_warmup = 0
        started = time.monotonic()
        for n in range(swaps):
            reply = commands.call("reload", {}, timeout=60)
            if not reply.get("ok"):
                failures.append(reply)
            if n + 1 == warm:
                rss_after_warmup = rss_bytes(daemon.proc.pid)
        swap_s = (time.monotonic() - started) / swaps
        rss_end = rss_bytes(daemon.proc.pid)
    finally:
        commands.close()
    assert daemon.stop() == 0, daemon.log_tail()
    growth = rss_end - rss_after_warmup
    result = _result_of_stopped_daemon(
        rig,
        daemon,
        f"9. hot swap x{swaps} under load",
        None,
        f"{swap_s * 1e3:.0f} ms per swap; RSS {rss_after_warmup / 2**20:.1f} MiB after {warm} swaps, "
        f"{rss_end / 2**20:.1f} MiB after {swaps} ({growth / 2**20:+.1f} MiB)",
    )
    assert failures == [], failures[:3]
    assert result.missing == 0
    return growth


def test_hot_swap_10_times_under_load_loses_nothing(rig: FaultRig) -> None:
    _hot_swaps(rig, swaps=10)


@pytest.mark.slow
def test_hot_swap_1000_times_under_load_loses_nothing_and_rss_stays_flat(rig: FaultRig) -> None:
    growth = _hot_swaps(rig, swaps=1000)
    # Flat: a leaked ORT session per swap (tens of MiB each for real models) would show long before this.
    assert growth < 64 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 1000 swaps"
