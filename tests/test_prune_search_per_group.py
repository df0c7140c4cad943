"""`--prune-search per-group` (the default with `--target-speedup` / `--prune auto`): the NetAdapt-style greedy
search over one ratio per stage, on the digits CNN with real int8 ORT timings and the real gate; the greedy
selection itself on given measurements; the stages it bundles channel groups into; the per-group pruner."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from converters.cli import build_parser, main  # noqa: E402
from converters.prune import channel_groups, prune_model  # noqa: E402
from converters.prune_search import MIN_SAVING, SearchPoint, choose, greedy_path, search_groups  # noqa: E402
from converters.sources import load_source  # noqa: E402
from edge.package import load_package  # noqa: E402
from examples import digits_cnn  # noqa: E402
from tests.test_convert_torch import FACTORY  # noqa: E402

DIGITS_STAGES = ["16x16", "8x8", "4x4"]  # conv 0, 3 | pool | conv 7, 10 | pool | conv 14, then the head


def _point(latency: float, agreement: float, ratios: dict[str, float] | None = None) -> SearchPoint:
    return SearchPoint(0.0, 1.0, latency, round(1 / latency, 3), 0.0, agreement, ratios=ratios)


def test_choose_takes_the_least_agreement_lost_per_latency_saved() -> None:
    current = _point(0.50, 0.95)
    cheap = _point(0.40, 0.93)  # 0.02 lost for 0.10 saved: 0.2 per unit
    big = _point(0.20, 0.80)  # 0.15 for 0.30: 0.5 per unit, the larger saving does not excuse it
    assert choose(current, [big, cheap]) is cheap
    # agreement that rises is noise on a few samples: counted as nothing lost, then the larger saving wins
    up_small, up_large = _point(0.45, 0.97), _point(0.30, 0.96)
    assert choose(current, [cheap, up_small, up_large]) is up_large
    # a proposal that saves less than a measurement's noise saves nothing, whatever its agreement
    assert choose(current, [_point(0.50 - MIN_SAVING / 2, 0.95), _point(0.55, 0.95)]) is None


class _Costs:
    """Given measurements: latency and agreement of a ratio vector, each group adding its own amount per
    step of 0.1 (what NetAdapt assumes within one step). Counts what was measured."""

    SAVING: ClassVar[dict[str, float]] = {"a": 0.06, "b": 0.03, "c": 0.05}  # latency ratio saved per step
    LOSS: ClassVar[dict[str, float]] = {"a": 0.06, "b": 0.005, "c": 0.02}  # agreement lost per step

    def __init__(self) -> None:
        self.measured: list[dict[str, float]] = []

    def measure(self, vector: dict[str, float], step: int, _base: SearchPoint | None) -> SearchPoint:
        self.measured.append(dict(vector))
        steps = {g: round(r / 0.1) for g, r in vector.items()}
        latency = 0.6 - sum(self.SAVING[g] * n for g, n in steps.items())
        agreement = 1.0 - sum(self.LOSS[g] * n for g, n in steps.items())
        point = _point(round(latency, 4), round(agreement, 4), dict(vector))
        point.step = step
        return point

    @staticmethod
    def next_ratio(group: str, ratio: float) -> float | None:
        return round(ratio + 0.1, 3) if ratio < 0.3 - 1e-9 else None


def test_greedy_path_raises_the_cheapest_group_first_and_stops_at_the_target() -> None:
    costs = _Costs()
    points, stopped = greedy_path(["a", "b", "c"], costs.measure, costs.next_ratio, 1 / 0.4, lambda: False)
    path = [p for p in points if p.accepted]
    # per unit saved: b loses 0.17, c 0.4, a 1.0; b is raised to its cap (0.3) before c, c before a
    assert [p.ratios for p in path] == [
        {"a": 0.0, "b": 0.0, "c": 0.0},
        {"a": 0.0, "b": 0.1, "c": 0.0},
        {"a": 0.0, "b": 0.2, "c": 0.0},
        {"a": 0.0, "b": 0.3, "c": 0.0},
        {"a": 0.0, "b": 0.3, "c": 0.1},
        {"a": 0.0, "b": 0.3, "c": 0.2},
        {"a": 0.0, "b": 0.3, "c": 0.3},
    ]
    assert stopped == "target" and path[-1].latency_ratio <= 0.4 < path[-2].latency_ratio
    assert points[0].step == 0 and all(p.step and p.step > 0 for p in points[1:])
    # lazy: every group measured once at the start, then mostly only the one taken (a full NetAdapt step
    # would measure all three every time: 18 proposals here)
    assert len(costs.measured) == len(points) and len(points) - 1 < 3 * (len(path) - 1)
    assert all(p.accepted is False for p in points if p not in path)


def test_greedy_path_stops_when_every_group_is_capped_or_the_budget_is_spent() -> None:
    costs = _Costs()
    points, stopped = greedy_path(["a", "b", "c"], costs.measure, costs.next_ratio, 0.0, lambda: False)
    assert stopped == "every group at its cap"
    assert [p for p in points if p.accepted][-1].ratios == {"a": 0.3, "b": 0.3, "c": 0.3}
    measured = iter([False, False])  # the start, then two proposals; then the clock says stop
    budgeted = _Costs()
    points, stopped = greedy_path(
        ["a", "b", "c"], budgeted.measure, budgeted.next_ratio, 0.0, lambda: next(measured, True)
    )
    assert stopped == "budget" and len(budgeted.measured) == 3
    # the step was cut short after a and b: the better of those two is still taken
    assert [p.ratios for p in points if p.accepted][-1] == {"a": 0.0, "b": 0.1, "c": 0.0}


def test_search_groups_are_the_stages_of_the_network() -> None:
    model = digits_cnn.build()
    example = (torch.zeros(1, 1, 16, 16),)
    groups = search_groups(model, example)
    assert [g.name for g in groups] == DIGITS_STAGES
    assert [g.roots for g in groups] == [["0", "3"], ["7", "10"], ["14"]]
    assert [g.channels for g in groups] == [[32, 32], [64, 64], [128]]
    # every channel group the pruner sees is searched, once
    assert sorted(r for g in groups for r in g.roots) == sorted(
        c.root for c in channel_groups(model, example)
    )


def test_a_network_at_one_feature_map_size_is_cut_into_runs_of_layers(tmp_path: Path) -> None:
    (tmp_path / "tiny_net.py").write_text(FACTORY)
    wide = load_source(f"{tmp_path / 'tiny_net.py'}:wide").module
    groups = search_groups(wide, (torch.zeros(1, 3, 32, 32),))
    assert [g.name for g in groups] == ["32x32.1", "32x32.2"]
    # conv 0's channels run through the depthwise conv 3, which torch-pruning roots their group at
    assert [g.roots for g in groups] == [["3"], ["5"]] and groups[0].layers == ["0", "3"]


def test_group_ratios_prune_only_the_groups_they_name() -> None:
    model = digits_cnn.build()
    x_test, y_test = digits_cnn.held_out_set()
    calibration = [torch.from_numpy(digits_cnn.load_split()[0][:64])]
    result = prune_model(
        model, torch.zeros(1, 1, 16, 16), 0.0, "structured", 8, calibration, group_ratios={"7": 0.5}
    )
    widths = [m.out_channels for m in result.model if isinstance(m, torch.nn.Conv2d)]
    assert widths == [32, 32, 32, 64, 128]
    assert result.macs_after < result.macs_before
    assert digits_cnn.accuracy(result.model, x_test, y_test) > 0.5  # cut by saliency, not at random


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("per_group")
    return {
        "root": root,
        "calib": digits_cnn.write_calib_npz(root / "calib.npz"),
        "test": digits_cnn.write_held_out_npz(root / "test.npz"),
        "labels": digits_cnn.write_labels(root / "labels.txt"),
    }


def _convert(data: dict[str, Path], out: str, *options: str) -> tuple[int, Path]:
    code = main(
        [f"{Path(digits_cnn.__file__)}:build", "--out", str(data["root"] / out), "--input-shape", "1,1,16,16",
         "--calib", str(data["calib"]), "--eval", str(data["test"]), "--labels", str(data["labels"]),
         "--formats", "onnx", "--max-drop", "100", "--distill-time", "2s", *options, "-q"]
    )  # fmt: skip
    return code, data["root"] / out


def test_prune_auto_searches_one_ratio_per_stage_and_the_package_records_the_path(
    digits_data: dict[str, Path],
) -> None:
    """`--prune auto`: no target, so the greedy path runs until the search budget (25 s here: 4-6
    measurements of 4-7 s) is spent or no step saves latency; a 100-point gate passes the end of the path,
    which ships."""
    code, out = _convert(digits_data, "auto.pkg", "--prune", "auto", "--prune-search-time", "25s", "--report")
    assert code == 0
    pruning = load_package(out).manifest.pruning
    assert pruning is not None
    search = pruning["search"]
    assert search["per_group"] is True and search["kind"] == "per-group"
    assert search["group_names"] == DIGITS_STAGES and search["budget_s"] == 25
    assert search["stopped"] in ("budget", "no proposal saves latency", "every group at its cap")
    points = search["points"]
    assert all(set(p["ratios"]) == set(DIGITS_STAGES) for p in points)
    assert all(p["latency_ratio"] > 0 and p["speedup"] == pytest.approx(1 / p["latency_ratio"], rel=0.01)
               for p in points)  # fmt: skip
    start = points[0]
    assert start["step"] == 0 and start["accepted"] and set(start["ratios"].values()) == {0.0}
    # the first step proposes each stage alone (in stage order), pruned from the teacher
    first = [p for p in points if p["step"] == 1][: len(DIGITS_STAGES)]
    assert len(first) >= 2
    assert [[g for g, r in p["ratios"].items() if r > 0] for p in first] == [[g] for g in DIGITS_STAGES][
        : len(first)
    ]
    path = [p for p in points if p["accepted"]]
    # each step taken saved latency against its base, timed in the same run (ratios from different runs
    # move with the host's load, so the path need not fall from one run to the next)
    assert len(path) >= 2 and all(
        p["base_latency_ratio"] is not None and p["latency_ratio"] < p["base_latency_ratio"] for p in path[1:]
    )
    chosen = search["chosen"]
    assert chosen == path[-1]["ratios"] == pruning["group_ratios"]
    assert len(set(chosen.values())) > 1  # not one ratio for all
    assert path[-1]["passed"] and path[-1]["distilled"]
    assert pruning["params_after"] < pruning["params_before"]
    assert 0 < pruning["ratio"] == path[-1]["ratio"] < 1
    report = (out / "report" / "report.md").read_text()
    assert "Per-group greedy search (NetAdapt)" in report and (out / "report" / "search.png").is_file()


def test_target_speedup_stops_the_path_at_the_first_vector_that_reaches_it(
    digits_data: dict[str, Path],
) -> None:
    """2x: one step of the 8x8 stage reaches it on a quiet host (unpruned int8 1.4x, that step 2.3x); on a
    loaded one, where this tiny model's int8/fp32 ratio moves, unpruned int8 may already be 2x faster,
    and then nothing is pruned."""
    code, out = _convert(digits_data, "target.pkg", "--target-speedup", "2")
    assert code == 0
    pruning = load_package(out).manifest.pruning
    assert pruning is not None
    search = pruning["search"]
    assert search["stopped"] == "target" and search["target_speedup"] == 2
    path = [p for p in search["points"] if p["accepted"]]
    assert path[-1]["speedup"] >= 2 and all(p["speedup"] < 2 for p in path[:-1])
    if len(path) == 1:
        assert search["chosen"] == 0.0 and "took no pruned candidate" in search["note"]
    else:
        assert search["chosen"] == path[-1]["ratios"] == pruning["group_ratios"] and path[-1]["passed"]


def test_cli_prune_search_options() -> None:
    args = build_parser().parse_args(["m.py:f", "--out", "o", "--target-speedup", "3"])
    assert args.prune_search == "per-group" and args.prune_search_time is None
    args = build_parser().parse_args(
        ["m.py:f", "--out", "o", "--prune", "auto", "--prune-search", "uniform", "--prune-search-time", "2m"]
    )
    assert args.prune_search == "uniform" and args.prune_search_time == 120
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.py:f", "--out", "o", "--prune-search", "layerwise"])
