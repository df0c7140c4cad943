"""`--target-speedup X` / `--prune auto`: the ratio is searched with real int8 ORT timings and the gate,
every point tried is in the manifest and the report; and the distillation defaults that come with pruning."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")

from converters.cli import AUTO, build_parser, main, parse_duration
from converters.pipeline import DEFAULT_DISTILL_SECONDS, ConvertOptions, distill_plan
from converters.prune_search import GRID
from edge.package import load_package
from tests.assets_models import write_photo_folder
from tests.test_convert_messages import EXACT
from tests.test_convert_torch import FACTORY


def _convert(tmp_path: Path, *options: str) -> int:
    (tmp_path / "net.py").write_text(FACTORY)
    (tmp_path / "metrics.py").write_text(EXACT)
    photos = write_photo_folder(tmp_path / "photos", 12, size=48)
    return main(
        [f"{tmp_path / 'net.py'}:wide", "--out", str(tmp_path / "pkg"), "--calib", str(photos),
         "--input-shape", "1,3,32,32", "--formats", "onnx", "--distill-time", "2s",
         "--prune-search", "uniform", *options, "-q"]
    )  # fmt: skip


def test_prune_auto_times_every_ratio_and_ships_the_fastest_that_passes(tmp_path: Path) -> None:
    assert _convert(tmp_path, "--prune", "auto", "--max-drop", "100", "--report") == 0
    manifest = load_package(tmp_path / "pkg").manifest
    pruning = manifest.pruning
    assert pruning is not None
    search = pruning["search"]
    assert [p["ratio"] for p in search["points"]] == list(GRID)
    assert all(p["latency_ratio"] > 0 and p["speedup"] == pytest.approx(1 / p["latency_ratio"], rel=0.01)
               for p in search["points"])  # fmt: skip
    # everything passes a 100-point gate: the first trial, the largest ratio, is the one shipped
    assert search["chosen"] == GRID[-1] and pruning["ratio"] == GRID[-1]
    tried = [p for p in search["points"] if p["passed"] is not None]
    assert [p["ratio"] for p in tried] == [GRID[-1]] and tried[0]["distilled"]
    assert pruning["distillation"]["budget_s"] == 2.0
    report = (tmp_path / "pkg" / "report" / "report.md").read_text()
    assert "## Pruning search" in report and "search.png" in report
    assert (tmp_path / "pkg" / "report" / "search.png").is_file()


def test_a_target_out_of_reach_says_how_far_it_got(tmp_path: Path) -> None:
    assert _convert(tmp_path, "--target-speedup", "1000", "--max-drop", "100") == 0
    search = load_package(tmp_path / "pkg").manifest.pruning["search"]  # type: ignore[index]
    assert search["target_speedup"] == 1000 and len(search["points"]) == len(GRID)
    assert "short of the 1000x asked" in search["note"]


def test_when_no_pruned_ratio_passes_the_model_is_shipped_unpruned(tmp_path: Path) -> None:
    """An exact-match metric fails every pruned model: the bisection walks down to nothing pruned."""
    code = _convert(
        tmp_path, "--prune", "auto", "--metric", f"{tmp_path / 'metrics.py'}:exact", "--max-drop", "1"
    )
    pruning = load_package(tmp_path / "pkg").manifest.pruning if code == 0 else None
    assert code in (0, 1)  # the int8 model then meets the same gate as any other
    if pruning is not None:
        search = pruning["search"]
        assert search["chosen"] == 0.0 and pruning["ratio"] == 0.0
        assert all(p["passed"] in (None, False) for p in search["points"])
        assert "shipped unpruned" in search["note"]


def test_distillation_comes_with_pruning_and_its_budget_is_stated() -> None:
    plan = distill_plan(ConvertOptions(source="x", out=Path("o"), prune=0.3))
    assert plan.enabled and plan.budget_s == DEFAULT_DISTILL_SECONDS and plan.default
    assert "the default with pruning; --distill-time to change" in plan.describe()
    off = distill_plan(ConvertOptions(source="x", out=Path("o"), prune=0.3, distill_time=0))
    assert not off.enabled
    steps = distill_plan(ConvertOptions(source="x", out=Path("o"), prune=0.3, distill_steps=50))
    assert (steps.steps, steps.budget_s, steps.describe()) == (50, None, "50 steps")
    nothing = distill_plan(ConvertOptions(source="x", out=Path("o")))
    assert not nothing.enabled
    searched = distill_plan(ConvertOptions(source="x", out=Path("o"), target_speedup=3.0))
    assert searched.enabled and searched.default


def test_cli_parses_durations_auto_and_targets() -> None:
    assert [parse_duration(t) for t in ("90s", "20m", "1h", "1h30m", "45")] == [90, 1200, 3600, 5400, 45]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")
    args = build_parser().parse_args(["m.py:f", "--out", "o", "--prune", "auto", "--distill-time", "20m"])
    assert args.prune == AUTO and args.distill_time == 1200
    args = build_parser().parse_args(["m.py:f", "--out", "o", "--target-speedup", "3"])
    assert args.target_speedup == 3.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.py:f", "--out", "o", "--target-speedup", "0"])
