"""`edge-infer bench`: real sessions, interleaved comparison, cold start in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.cli import main as cli_main
from tests.test_backends_support import classifier_package, face_detector_package


def test_bench_json_reports_percentiles_provider_and_cold_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = classifier_package(tmp_path / "cls")
    code = cli_main(
        ["bench", str(package), "--json", "--seconds", "0.3", "--threads", "1", "--profile", "x86-64-generic"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    (subject,) = report["subjects"]
    lat = subject["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert subject["provider"] == "CPUExecutionProvider" and subject["runs"] >= 3
    assert subject["throughput_per_s"] == pytest.approx(1000 / lat["mean"], rel=1e-2)
    cold = subject["cold"]
    assert cold["cold_start_ms"] > cold["load_and_self_check_ms"] > 0 and cold["peak_rss_mb"] > 10
    assert report["peak_rss_mb"] > 10


def test_compare_two_packages_interleaved_prints_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = classifier_package(tmp_path / "small", size=16)
    large = classifier_package(tmp_path / "large", size=96)
    code = cli_main(
        [
            "bench",
            str(small),
            "--compare",
            str(large),
            "--json",
            "--seconds",
            "0.5",
            "--no-cold-start",
            "--profile",
            "x86-64-generic",
            "--threads",
            "1",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    a, b = report["subjects"]
    assert abs(a["runs"] - b["runs"]) <= 1  # interleaved: one of each per round
    assert report["ratios"]["p50_b_over_a"] == pytest.approx(
        b["latency_ms"]["p50"] / a["latency_ms"]["p50"], rel=1e-3
    )
    assert report["ratios"]["p50_b_over_a"] > 1.0  # 36x the pixels costs more


def test_real_tflite_on_litert_text_output(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = face_detector_package(tmp_path / "face", cache_dir)
    code = cli_main(
        ["bench", str(package), "--backend", "litert", "--seconds", "0.3", "--profile", "x86-64-generic"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "litert xnnpack" in out and "p99" in out and "cold start" in out


def test_compare_backend_without_that_artifact_is_a_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    package = face_detector_package(tmp_path / "face", cache_dir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "bench",
            str(package),
            "--compare-backend",
            "onnxruntime",
            "--seconds",
            "0.1",
            "--profile",
            "x86-64-generic",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]  # TFLite's C++ logs an INFO line of its own before it
    assert last.startswith("edge-infer bench: error:") and "package has no onnx artifact" in last


def test_missing_package_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", str(tmp_path / "nope")]) == 2
    assert "nope: neither a package directory nor a package .tar" in capsys.readouterr().err


def test_interleaved_latency_runs_blocks_after_a_pause_and_times_only_the_block() -> None:
    """Subjects run in rotating blocks, each after a pause longer than ONNX Runtime's spin-wait, so no
    subject is timed beside another's spinning thread pool; warm-up calls are not timed."""
    import time

    from edge.bench import SPIN_SETTLE_S, interleaved_latency_ms

    calls: list[tuple[str, float]] = []

    def runner(name: str) -> Callable[[], None]:
        return lambda: calls.append((name, time.perf_counter()))

    samples = interleaved_latency_ms({"a": runner("a"), "b": runner("b")}, rounds=3, block=4, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"a": 12, "b": 12}
    order = "".join(name for name, _ in calls)
    assert order == "aaaaabbbbb" + "bbbbbaaaaa" + "aaaaabbbbb"  # rotating start, warm-up + block each
    block_starts = [i for i in range(5, len(calls), 5)]
    for start in block_starts:
        assert calls[start][1] - calls[start - 1][1] >= SPIN_SETTLE_S
    assert samples["a"][0] >= 0
    single = interleaved_latency_ms({"only": runner("only")}, budget_s=0.0, block=3, warmup=0)
    assert len(single["only"]) == 3  # one round at least, and no pause needed with nothing else running
    with pytest.raises(ValueError):
        interleaved_latency_ms({"a": runner("a")})
