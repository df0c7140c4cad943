"""`edge-infer demo` end to end: its own broker, the daemon, a subscriber printing predictions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.daemon_helpers import make_tiny_package

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^seq (\d+) frame (\d+) (red|green|blue|gray) [01]\.\d\d \(\d+\.\d ms, CPUExecutionProvider\)$"
)


def test_demo_prints_predictions_as_a_subscriber_receives_them(tmp_path: Path, cache_dir: Path) -> None:
    package = make_tiny_package(tmp_path / "pkg")
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "demo", "--package", str(package), "--count", "8", "--fps", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "EDGE_CACHE": str(cache_dir)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("seq ")]
    assert len(lines) >= 8, done.stdout
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    seqs = [int(m.group(1)) for m in parsed if m]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert "demo: serving tiny-colour 1.0.0 on onnxruntime/CPUExecutionProvider" in done.stdout
