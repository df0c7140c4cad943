"""edge-sink against a real mosquitto and real databases (SQLite, and PostgreSQL at 127.0.0.1:5432)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge.errors import ConfigError
from edge.sink.config import load_sink_config
from edge.sink.service import Sink
from edge.sink.storage import Batch, PostgresStorage, Row, SqliteStorage, open_storage
from tests.broker import Mosquitto
from tests.daemon_helpers import wait_until
from tests.sink_helpers import (
    Fleet,
    gaps_json,
    new_boot,
    pg_query,
    pg_schema,
    pg_url,
    prediction,
    sink_config,
    start_sink,
)


def rows(url: str, schema: str, sql: str) -> list[tuple[Any, ...]]:
    """`sql` with `{t}` naming the table prefix of that database."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite://") :]) as db:
            return list(db.execute(sql.format(t="")).fetchall())
    return pg_query(sql.format(t=f'"{schema}".'))


def stored_keys(url: str, schema: str) -> list[tuple[str, int]]:
    return [
        (str(b), int(s)) for b, s in rows(url, schema, "SELECT boot_id, seq FROM {t}predictions ORDER BY 2")
    ]


def in_process(config_path: Path) -> Sink:
    sink = Sink(load_sink_config(config_path))
    sink.start()
    assert sink.wait_subscribed(10), "the sink's subscriptions were not granted"
    return sink


# -- config ------------------------------------------------------------------------------------------


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "sink.yaml"
    path.write_text("mqtt:\n  host: 127.0.0.1\n  grup: sinks\n")
    with pytest.raises(ConfigError, match=r"sink.yaml:3: mqtt.grup: unknown key$"):
        load_sink_config(path)
    path.write_text("database:\n  url: mysql://x\n")
    with pytest.raises(
        ConfigError, match=r"sink.yaml:2: database.url: Value error, must start with postgresql://"
    ):
        load_sink_config(path)
    path.write_text("schema: Robert'); DROP TABLE\n")
    with pytest.raises(ConfigError, match=r"sink.yaml:1: schema: Value error, must be 1-63 of a-z 0-9 _"):
        load_sink_config(path)
    path.write_text("web: {port: 8080}\nschema: fleet\n")
    config = load_sink_config(path)
    assert (config.web.port, config.web.addr, config.schema_, config.mqtt.group) == (
        8080,
        "127.0.0.1",
        "fleet",
        "sinks",
    )


# -- storing -----------------------------------------------------------------------------------------


def test_predictions_statuses_events_and_dead_letters_are_stored(
    tmp_path: Path, mosquitto: Mosquitto, database: tuple[str, str]
) -> None:
    url, schema = database
    config = sink_config(tmp_path / "sink.yaml", mosquitto.port, url, schema)
    fleet = Fleet(mosquitto.port)
    fleet.status("cam-01", "online", model={"name": "tiny-colour", "version": "1.0.0"})  # retained, before
    sink = in_process(config)
    try:
        boot = new_boot()
        fleet.publish("cam-01", boot, range(1, 301))
        fleet.publish("cam-01", boot, [5, 6, 300])  # redelivered: absorbed by the key, counted
        fleet.publish("cam-01", boot, range(311, 321))  # 301..310 never come
        bad_score = prediction("cam-01", boot, 400)
        bad_score["result"]["top_k"][0]["score"] = "high"
        fleet.send("cam-01/predictions", json.dumps(bad_score))
        fleet.send("cam-01/predictions", b"\x00\x01 not json")
        fleet.send("cam-01/predictions", json.dumps(prediction("cam-99", boot, 401)))
        fleet.send(
            "cam-01/events",
            json.dumps(
                {
                    "event": "model_swapped",
                    "device_id": "cam-01",
                    "ts": "2026-11-23T10:00:00.123Z",
                    "data": {"to": "2"},
                }
            ),
        )
        assert wait_until(lambda: sink.stored == 310 and sink.dead == 3 and sink.duplicates == 3, 15), (
            sink.stored,
            sink.dead,
            sink.duplicates,
        )
        assert wait_until(lambda: rows(url, schema, "SELECT count(*) FROM {t}events")[0][0] == 1, 5)
    finally:
        sink.stop()
    keys = stored_keys(url, schema)
    assert [s for _, s in keys] == [*range(1, 301), *range(311, 321)] and {b for b, _ in keys} == {boot}
    reasons = [r for (r,) in rows(url, schema, "SELECT reason FROM {t}dead_letters ORDER BY id")]
    assert reasons == [
        "edge/cam-01/predictions: result.top_k.0.score: 'high' is not of type 'number'",
        "edge/cam-01/predictions: payload is not JSON: Expecting value: line 1 column 1 (char 0)",
        "edge/cam-01/predictions: device_id: 'cam-99' is not the topic's 'cam-01'",
    ]
    (device,) = rows(
        url,
        schema,
        "SELECT device_id, state, model_name, model_version, predictions, duplicates, last_seq FROM {t}devices",
    )
    assert device == ("cam-01", "online", "tiny-colour", "1.0.0", 310, 3, 320)
    time.sleep(0.6)  # the grace period of the test config
    report = gaps_json(config)
    assert report == {
        "gaps": [{"device_id": "cam-01", "boot_id": boot, "from_seq": 301, "to_seq": 310}],
        "duplicates": 3,
    }
    fleet.close()


def test_a_status_offline_from_the_will_ends_the_online_it_belongs_to(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    url = f"sqlite://{tmp_path}/p.db"
    sink = in_process(sink_config(tmp_path / "sink.yaml", mosquitto.port, url))
    fleet = Fleet(mosquitto.port)
    try:
        state = lambda: rows(url, "", "SELECT state FROM devices WHERE device_id = 'cam-01'")  # noqa: E731
        fleet.status("cam-01", "online", since="2026-11-23T10:00:00.000Z")
        assert wait_until(lambda: state() == [("online",)], 5)
        # a Last Will carries the time of the connection it was set on (its ts is older than the online)
        will = {
            "state": "offline",
            "device_id": "cam-01",
            "ts": "2026-11-23T10:00:00.000Z",
            "since": "2026-11-23T10:00:00.000Z",
            "reason": "connection lost",
        }
        fleet.send("cam-01/status", json.dumps(will), retain=True)
        assert wait_until(lambda: state() == [("offline",)], 5)
        stale = {**will, "since": "2026-11-23T09:00:00.000Z", "ts": "2026-11-23T09:00:00.000Z"}
        fleet.status("cam-01", "online", since="2026-11-23T11:00:00.000Z")
        assert wait_until(lambda: state() == [("online",)], 5)
        fleet.send("cam-01/status", json.dumps(stale), retain=True)  # a will of an older connection
        fleet.send("cam-01/status", b"", retain=True)  # a retained status cleared: not a dead letter
        time.sleep(0.5)
        assert state() == [("online",)]
        assert rows(url, "", "SELECT count(*) FROM dead_letters") == [(0,)]
    finally:
        sink.stop()
        fleet.close()


def test_a_value_the_database_refuses_becomes_a_dead_letter_not_a_stuck_batch(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with pg_schema() as schema:
        sink = in_process(sink_config(tmp_path / "sink.yaml", mosquitto.port, pg_url(), schema))
        fleet = Fleet(mosquitto.port)
        try:
            boot = new_boot()
            poison = prediction("cam-01", boot, 3, label="nul\u0000byte")  # valid JSON, not storable as jsonb
            fleet.publish("cam-01", boot, [1, 2])
            fleet.send("cam-01/predictions", json.dumps(poison), wait=False)
            fleet.publish("cam-01", boot, [4, 5])
            assert wait_until(lambda: sink.stored == 4 and sink.dead == 1, 15), (sink.stored, sink.dead)
        finally:
            sink.stop()
            fleet.close()
        assert [s for _, s in stored_keys(pg_url(), schema)] == [1, 2, 4, 5]
        (reason,) = pg_query(f'SELECT reason FROM "{schema}".dead_letters')[0]
        assert reason.startswith("the database refused it:") and "\\u0000" in reason


# -- nothing lost --------------------------------------------------------------------------------------


def test_a_sigkilled_sink_restarted_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, mosquitto: Mosquitto, database: tuple[str, str]
) -> None:
    url, schema = database
    config = sink_config(
        tmp_path / "sink.yaml", mosquitto.port, url, schema, batch={"max_size": 100, "max_delay_ms": 20}
    )
    log = tmp_path / "sink.log"
    proc = start_sink(config, log)
    boot = new_boot()
    total = 3000
    fleet = Fleet(mosquitto.port)
    try:
        assert wait_until(lambda: "session present" in log.read_text(), 15), log.read_text()
        time.sleep(0.3)  # the subscriptions are granted right after the CONNACK
        sender = threading.Thread(target=fleet.publish, args=("cam-01", boot, range(1, total + 1), 3000))
        sender.start()
        assert wait_until(lambda: len(stored_keys(url, schema)) >= 500, 15), log.read_text()
        proc.send_signal(signal.SIGKILL)  # mid-stream: batches received, some committed, some not acked
        proc.wait(10)
        killed_at = len(stored_keys(url, schema))
        assert killed_at < total, "the kill came too late to test anything"
        proc = start_sink(config, log)
        sender.join(30)
        assert wait_until(lambda: len(stored_keys(url, schema)) >= total, 30), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fleet.close()
    keys = stored_keys(url, schema)
    assert [s for _, s in keys] == list(range(1, total + 1))  # none missing, none twice
    time.sleep(0.6)
    assert gaps_json(config)["gaps"] == []


def test_two_sinks_in_one_group_split_the_load(
    tmp_path: Path, mosquitto: Mosquitto, database: tuple[str, str]
) -> None:
    url, schema = database
    first = in_process(sink_config(tmp_path / "a.yaml", mosquitto.port, url, schema, mqtt={"client_id": "a"}))
    second = in_process(
        sink_config(tmp_path / "b.yaml", mosquitto.port, url, schema, mqtt={"client_id": "b"})
    )
    fleet = Fleet(mosquitto.port)
    try:
        boots = {device: new_boot() for device in ("cam-01", "cam-02")}
        for device, boot in boots.items():
            fleet.publish(device, boot, range(1, 1001))
        assert wait_until(lambda: first.stored + second.stored == 2000, 20), (first.stored, second.stored)
    finally:
        first.stop()
        second.stop()
        fleet.close()
    assert first.stored > 200 and second.stored > 200  # mosquitto alternates between the members
    assert first.duplicates == second.duplicates == 0
    counts = rows(
        url,
        schema,
        "SELECT device_id, count(*), count(DISTINCT seq), max(seq) FROM {t}predictions GROUP BY 1 ORDER BY 1",
    )
    assert counts == [("cam-01", 1000, 1000, 1000), ("cam-02", 1000, 1000, 1000)]
    # both sinks counted into the same device rows
    assert rows(url, schema, "SELECT device_id, predictions FROM {t}devices ORDER BY 1") == [
        ("cam-01", 1000),
        ("cam-02", 1000),
    ]


def test_a_broker_restart_mid_stream_loses_nothing_and_metrics_say_what_happened(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # group: null, unshared subscriptions: mosquitto 2.0 restores a persistent session's plain
    # subscriptions after a restart but not its shared ones (docs/contracts.md says so)
    url = f"sqlite://{tmp_path}/p.db"
    config = sink_config(
        tmp_path / "sink.yaml", mosquitto.port, url, metrics={"port": 0}, mqtt={"group": None}
    )
    sink = in_process(config)
    boot = new_boot()
    try:
        fleet = Fleet(mosquitto.port, client_id="fleet")
        fleet.publish("cam-01", boot, range(1, 501))
        fleet.close()
        mosquitto.restart()  # persistence: the session and what it had not acknowledged are kept
        fleet = Fleet(mosquitto.port, client_id="fleet")
        fleet.publish("cam-01", boot, range(501, 1001))  # most likely before the sink is back: queued for it
        fleet.close()
        assert wait_until(lambda: len(stored_keys(url, "")) == 1000, 20), len(stored_keys(url, ""))
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{sink.metrics_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.metrics_port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        sink.stop()
    assert [s for _, s in stored_keys(url, "")] == list(range(1, 1001))
    stored = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("edge_sink_predictions_stored_total")
        )
    )
    assert stored == 1000 == sink.stored  # new rows only: a redelivery after the restart is a duplicate
    assert "edge_sink_mqtt_connected 1.0" in metrics
    assert 'edge_sink_messages_total{kind="predictions"}' in metrics
    assert "edge_sink_capture_to_commit_seconds_count" in metrics


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_are_applied_once_when_sinks_start_together(tmp_path: Path, kind: str) -> None:
    def race(make: Any) -> list[int]:
        barrier = threading.Barrier(4)
        results: list[int] = []
        errors: list[BaseException] = []

        def one() -> None:
            storage = make()
            try:
                barrier.wait()
                results.append(storage.migrate())
            except BaseException as exc:  # collected: the assertion below names it
                errors.append(exc)
            finally:
                storage.close()

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        return sorted(results)

    if kind == "sqlite":
        path = tmp_path / "p.db"
        assert race(lambda: SqliteStorage(path)) == [0, 0, 0, 1]
        assert rows(f"sqlite://{path}", "", "SELECT version FROM schema_migrations") == [(1,)]
    else:
        with pg_schema() as schema:
            assert race(lambda: PostgresStorage(pg_url(), schema)) == [0, 0, 0, 1]
            assert pg_query(f'SELECT version FROM "{schema}".schema_migrations') == [(1,)]


def test_gaps_command_prints_text_and_a_missing_database_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.sink_helpers import REPO

    url = f"sqlite://{tmp_path}/p.db"
    storage = open_storage(url, "edge")
    storage.migrate()
    storage.close()
    config = sink_config(tmp_path / "sink.yaml", 1883, url)
    out = subprocess.run(
        [sys.executable, "-m", "edge.sink", "gaps", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (0, "0 gap(s), 0 missing prediction(s), 0 duplicate(s)\n")
    bad = sink_config(tmp_path / "bad.yaml", 1883, "postgresql://root@127.0.0.1:1/test")
    out = subprocess.run(
        [sys.executable, "-m", "edge.sink", "gaps", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("edge-sink: database postgresql://127.0.0.1:1/test: cannot connect:")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_clean_stop_under_load_is_prompt_and_the_next_sink_gets_the_rest(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    url = f"sqlite://{tmp_path}/p.db"
    config = sink_config(tmp_path / "sink.yaml", mosquitto.port, url)
    sink = in_process(config)
    fleet = Fleet(mosquitto.port)
    boot = new_boot()
    sender = threading.Thread(target=fleet.publish, args=("cam-01", boot, range(1, 4001), 2000))
    sender.start()
    try:
        assert wait_until(lambda: sink.stored >= 500, 10)
        started = time.monotonic()
        sink.stop()  # messages keep arriving: they are left to the session, not waited for
        assert time.monotonic() - started < 5
        stored_at_stop = sink.stored
        sink = in_process(config)
        sender.join(30)
        assert wait_until(lambda: len(stored_keys(url, "")) == 4000, 20), len(stored_keys(url, ""))
    finally:
        sink.stop()
        fleet.close()
    assert stored_at_stop < 4000
    assert [s for _, s in stored_keys(url, "")] == list(range(1, 4001))


def test_gaps_are_kept_up_to_date_incrementally(database: tuple[str, str]) -> None:
    """Late rows split and close known gaps; a hole younger than the grace period waits; each stream
    is read only from where the last round stopped (streams.checked_seq)."""
    url, schema = database
    storage = open_storage(url, schema)
    storage.migrate()
    boot, other = new_boot(), new_boot()

    def put(seqs: Any, boot_id: str = boot) -> None:
        batch = Batch()
        for seq in seqs:
            body = prediction("cam-01", boot_id, seq)
            batch.predictions.append(
                Row(
                    "cam-01",
                    boot_id,
                    seq,
                    body["ts"],
                    "m",
                    "1",
                    json.dumps(body["result"]),
                    json.dumps(body),
                    body["source"]["captured_at"],
                )
            )
        storage.write(batch)

    def spans(grace: float = 0.0) -> list[tuple[str, int, int]]:
        return [(g.boot_id, g.from_seq, g.to_seq) for g in storage.refresh_gaps(grace)]

    try:
        put([*range(1, 11), *range(15, 21)])
        assert spans() == [(boot, 11, 14)]
        put([12])
        assert spans() == [(boot, 11, 11), (boot, 13, 14)]
        put([30])
        assert spans(grace=3600) == [(boot, 11, 11), (boot, 13, 14)]  # 21..29 is still young
        put([11, 13, 14])
        assert spans(grace=3600) == []
        assert spans() == [(boot, 21, 29)]
        put([100], other)
        assert [g for g in spans() if g[0] == other] == []  # a new boot's first row is no gap
        put([102], other)
        assert sorted(spans()) == sorted([(boot, 21, 29), (other, 101, 101)])
        checked = dict(rows(url, schema, "SELECT boot_id, checked_seq FROM {t}streams"))
        assert {str(k): v for k, v in checked.items()} == {boot: 30, other: 102}
    finally:
        storage.close()


def test_a_database_outage_holds_the_acknowledgements_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A PostgreSQL of the test's own, stopped (immediate: no goodbye to its clients) mid-stream and
    started again: the sink retries the batch it holds, acknowledges nothing meanwhile, and stores all."""
    from tests.sink_helpers import ThrowawayPostgres

    try:
        server = ThrowawayPostgres().start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot start a PostgreSQL of the test's own: {exc}")
    try:
        sink = in_process(sink_config(tmp_path / "sink.yaml", mosquitto.port, server.url, "edge"))
        fleet = Fleet(mosquitto.port)
        boot = new_boot()
        try:
            fleet.publish("cam-01", boot, range(1, 301))
            assert wait_until(lambda: sink.stored == 300, 10)
            server.stop()
            fleet.publish("cam-01", boot, range(301, 601))  # the broker acknowledges; the sink cannot store
            assert wait_until(lambda: sink.metrics.db_errors._value.get() > 0, 10)
            assert sink.stored == 300
            server.start()
            assert wait_until(lambda: sink.stored == 600, 30), sink.stored
        finally:
            sink.stop()
            fleet.close()
        import psycopg

        with psycopg.connect(server.url) as conn:
            seqs = [s for (s,) in conn.execute("SELECT seq FROM edge.predictions ORDER BY seq")]
        assert seqs == list(range(1, 601))
    finally:
        server.remove()


def test_a_sink_started_before_its_broker_says_why_once_and_connects_when_it_comes(tmp_path: Path) -> None:
    from tests.broker import free_port

    port = free_port()
    config = sink_config(tmp_path / "sink.yaml", port, f"sqlite://{tmp_path}/p.db")
    log = tmp_path / "sink.log"
    proc = start_sink(config, log)
    broker = Mosquitto(tmp_path / "late-broker", port=port)
    try:
        assert wait_until(lambda: "cannot connect" in log.read_text(), 15), log.read_text()
        time.sleep(2.5)  # a few more attempts: still one line
        assert log.read_text().count("cannot connect") == 1, log.read_text()
        assert f"mqtt cannot connect to 127.0.0.1:{port}: ConnectionRefusedError" in log.read_text()
        broker.start()
        assert wait_until(lambda: "mqtt connected" in log.read_text(), 20), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        broker.stop()


def test_the_fleet_summary_reads_every_result_a_person_would() -> None:
    from edge.sink.fleet import summarize

    assert (
        summarize({"type": "classification", "top_k": [{"label": "tabby", "score": 0.714}]}) == "tabby 0.71"
    )
    detections = [{"label": "car"}, {"label": "person"}, {"label": "car"}]
    assert summarize({"type": "detection", "detections": detections}) == "2 car, 1 person"
    assert summarize({"type": "voice-activity", "speech": True, "probability": 0.931}) == "speech 0.93"
    assert summarize({"type": "voice-activity", "speech": False, "probability": 0.1}) == "no speech 0.10"
    assert summarize({"type": "text-recognition", "text": "GATE 42", "confidence": 0.9}) == "'GATE 42'"
    assert summarize(json.dumps({"type": "embedding", "dims": 384, "vector": [], "normalized": True})) == (
        "384-d vector"
    )
    assert summarize({"type": "raw", "outputs": []}) == "raw" and summarize("not json") == "?"
