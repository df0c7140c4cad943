"""The fault suite's counted results: every scenario appends a `ScenarioResult`; at the end of the session
the markdown table goes to $EDGE_CACHE/faults/report.md and to the terminal."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from tests.faults.counting import ScenarioResult, markdown_table

RESULTS: list[ScenarioResult] = []


def record(result: ScenarioResult) -> ScenarioResult:
    RESULTS.append(result)
    return result


def report_path() -> Path:
    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    return cache / "faults" / "report.md"


def render(results: list[ScenarioResult]) -> str:
    header = (
        "# Fault suite: counted results\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
        f"({os.cpu_count()} CPUs), mosquitto + `edge-infer run` as real processes, QoS 1.\n"
        "`produced` = seqs the daemon's outbox assigned; `missing` = seqs in 1..produced the counting "
        "subscriber never received; `dropped (counted)` = the outbox's own drop counter.\n\n"
    )
    return header + markdown_table(results) + NOT_RUN


NOT_RUN = """
Limits of this table:
- 5 (disk full) only where a tmpfs can be mounted (root / CAP_SYS_ADMIN); skipped elsewhere.
- 9 swaps the same package (a reload of the configured path): the anti-rollback check refuses older
  versions, so alternating two packages would need 1,000 of them.
- 10 (clock jumps) runs under libfaketime (Debian `faketime`) with the real monotonic clock; skipped where
  it is not installed.
- The 30-minute soak is its own command (`python benchmarks/soak.py`, report and PNG in $EDGE_CACHE/soak);
  the load figures at full speed are `python benchmarks/load_bench.py`.
"""


def write_report(results: list[ScenarioResult]) -> Path | None:
    if not results:
        return None
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(results))
    os.replace(tmp, path)
    return path
