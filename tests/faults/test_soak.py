"""The soak command (benchmarks/soak.py) in miniature: one minute of camera inference at 10 fps with one
broker restart, run as its own process like `python benchmarks/soak.py` (the 30-minute run is not CI's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.counting import ScenarioResult
from tests.faults.daemon_proc import REPO
from tests.faults.report import record


@pytest.mark.slow
def test_one_minute_soak_with_a_broker_restart_writes_its_report_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "soak.py"),
            "--minutes",
            "1",
            "--restart-every",
            "0.6",
            "--outage-s",
            "3",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    restarts = summary["restarts"]
    record(
        ScenarioResult(
            scenario="soak 1 min, 10 fps, 1 broker restart (3 s down)",
            produced=counts["produced"],
            delivered=counts["delivered"],
            missing=counts["missing"],
            duplicated=counts["duplicated"],
            dropped_counted=counts["dropped"],
            recovery_s=max((r["recovery_s"] for r in restarts), default=None),
            note=f"RSS {summary['rss_first_mib']:.0f} -> {summary['rss_last_mib']:.0f} MiB; "
            "30-minute figures: `python benchmarks/soak.py` ($EDGE_CACHE/soak/report.md)",
        )
    )
    report = (out / "report.md").read_text()
    png = (out / "soak.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "soak.png" in report and "| minute |" in report
    assert len(restarts) == 1 and restarts[0]["recovery_s"] < 60, restarts
    assert counts["produced"] > 300  # about 600 at 10 fps for a minute, less on a loaded machine
    assert counts["missing"] == 0 and counts["pending_at_exit"] == 0, counts
    assert summary["per_minute"] and all(m["publish_p50"] >= 0 for m in summary["per_minute"])
