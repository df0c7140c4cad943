from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Generated models, clips and photos are cached outside the repo (EDGE_CACHE)."""
    path = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker on a free port that the test may stop, kill, pause or restart."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        if broker.running:
            broker.resume()  # a paused broker cannot act on SIGTERM
        broker.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, schema) of an empty sink database: a SQLite file, or a PostgreSQL schema of the test's own
    (dropped after; tests/sink_helpers.py finds the server or starts a throwaway one, else skips)."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/predictions.db", "edge"
        return
    from tests.sink_helpers import pg_schema, pg_url

    with pg_schema() as schema:
        yield pg_url(), schema
