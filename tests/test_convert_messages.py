"""Each pruning note and each float-model gate failure names its real cause: structured pruning is not
described with the unstructured caveat, pruning that removed nothing says so, and a float model that
fails its gate is told to prune less only when something was pruned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converters.cli import main
from edge.package import load_package
from tests.assets_models import write_photo_folder
from tests.test_convert_accuracy import HEAD, _photo_feeds, tiny_detector
from tests.test_convert_torch import FACTORY

EXACT = (
    "import numpy as np\n"
    "def exact(reference, candidate):\n"
    "    return float(np.mean([np.array_equal(r[0], c[0]) for r, c in zip(reference, candidate)]))\n"
    "def half(reference, candidate):\n"
    "    return 0.5\n"
)


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.py"
    path.write_text(EXACT)
    return path


def _convert(tmp_path: Path, source: str, *options: str) -> int:
    photos = write_photo_folder(tmp_path / "photos", 12, size=48)
    return main(
        [source, "--out", str(tmp_path / "pkg"), "--calib", str(photos), "--input-shape", "1,3,32,32",
         "--formats", "onnx", *options, "-q"]
    )  # fmt: skip


def _gate_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edge-convert: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_structured_pruning_report_has_no_unstructured_caveat(tmp_path: Path, factory: Path) -> None:
    assert (
        _convert(
            tmp_path,
            f"{factory}:wide",
            "--prune",
            "0.5",
            "--distill-time",
            "0",
            "--max-drop",
            "100",
            "--report",
        )
        == 0
    )
    pruning = load_package(tmp_path / "pkg").manifest.pruning
    assert pruning is not None and "gzip_ratio" not in pruning and "sparsity" not in pruning
    report = (tmp_path / "pkg" / "report" / "report.md").read_text()
    assert "structured pruning, ratio 0.5" in report and "whole channels removed" in report
    assert "Unstructured zeros" not in report and "no speed-up" not in report


def test_unstructured_pruning_report_keeps_its_caveat(tmp_path: Path, factory: Path) -> None:
    code = _convert(
        tmp_path, f"{factory}:wide", "--prune", "0.5", "--prune-mode", "unstructured", "--distill-time", "0",
        "--max-drop", "100",
        "--report",
    )  # fmt: skip
    assert code == 0
    report = (tmp_path / "pkg" / "report" / "report.md").read_text()
    assert "Unstructured zeros shrink the compressed file but dense kernels still multiply them" in report


def test_structured_pruning_that_removes_nothing_says_so(tmp_path: Path, factory: Path) -> None:
    # 64 channels asked to lose 5 % keep 64 once rounded up to x86-64-avx2's multiple of 16.
    code = _convert(
        tmp_path, f"{factory}:wide", "--prune", "0.05", "--profile", "x86-64-avx2", "--distill-time", "0",
        "--max-drop", "100",
        "--report",
    )  # fmt: skip
    assert code == 0
    pruning = load_package(tmp_path / "pkg").manifest.pruning
    assert pruning is not None and pruning["macs_after"] == pruning["macs_before"]
    notes = " ".join(pruning["notes"])
    assert "structured: nothing removed" in notes and "multiple of 16" in notes
    assert "whole channels removed" not in notes
    report = (tmp_path / "pkg" / "report" / "report.md").read_text()
    assert "structured: nothing removed" in report and "runs faster" not in report


def test_float_gate_after_pruning_says_prune_less(
    tmp_path: Path, factory: Path, metrics: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        _convert(
            tmp_path,
            f"{factory}:wide",
            "--prune",
            "0.5",
            "--distill-time",
            "0",
            "--metric",
            f"{metrics}:exact",
        )
        == 1
    )
    line = _gate_error(capsys)
    assert "the pruned float model drops" in line
    assert (
        "structured pruning at 0.5 costs it: prune less or distill the pruned model "
        "(--distill-time, --distill-steps)" in line
    )


def test_distillation_without_pruning_leaves_the_float_model_passing(
    tmp_path: Path, factory: Path, metrics: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _convert(tmp_path, f"{factory}:build", "--distill-steps", "3", "--metric", f"{metrics}:exact")
    assert code == 1
    line = _gate_error(capsys)
    # Distillation keeps its best held-out checkpoint (here the untouched model), so the float model
    # passes and what fails is int8 against an exact metric: the message must not blame pruning.
    assert "no recipe is within --max-drop" in line
    assert "prune less" not in line
    # a torch SOURCE whose int8 misses the gate is pointed at quantization-aware fine-tuning
    assert line.endswith("a torch SOURCE can be fine-tuned for int8 first: add --qat")


def test_float_gate_with_a_metric_that_fails_identical_outputs_blames_the_metric(
    tmp_path: Path, factory: Path, metrics: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _convert(tmp_path, f"{factory}:build", "--metric", f"{metrics}:half") == 1
    line = _gate_error(capsys)
    assert "nothing was pruned or distilled: the float model is the reference itself" in line
    assert f"--metric {metrics}:half scores identical outputs 0.5, not 1.0" in line
    assert "prune less" not in line


def test_detection_gate_with_boxes_of_no_area_blames_the_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = HEAD.copy()
    head[0, 2] = 0.0  # the confident class-0 box has no width
    source = tiny_detector(tmp_path / "det.onnx", head)
    model = onnx.load(str(source))
    weights = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(weights["w"]).copy()
    w[2] = 0.0  # ... on every image: no input moves that width away from zero
    weights["w"].CopyFrom(numpy_helper.from_array(w, "w"))
    onnx.save(model, str(source))
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in _photo_feeds(16)]))
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "--task", "detection", "-q"]
    )
    assert code == 1
    line = _gate_error(capsys)
    assert "nothing was pruned or distilled: the float model is the reference itself" in line
    assert "of its decoded boxes have no area" in line and "prune less" not in line
    assert not out.exists()


TIED = """
import torch
from torch import nn


def tied():
    # two classes fp32 itself can hardly tell apart: rows 1e-4 apart, so int8 rounds them alike and
    # flips about half the answers while the expected drop (p_fp32 of the answers swapped) stays ~0
    torch.manual_seed(0)
    head = nn.Linear(16, 2)
    with torch.no_grad():
        head.weight[1] = head.weight[0] + 1e-4 * torch.randn(16)
        head.bias[1] = head.bias[0]
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
"""


def test_an_agreement_floor_keeps_the_search_going_past_a_recipe_the_expected_drop_passes(
    tmp_path: Path,
) -> None:
    factory = tmp_path / "tied.py"
    factory.write_text(TIED)
    assert _convert(tmp_path, f"{factory}:tied") == 0
    metrics = load_package(tmp_path / "pkg").manifest.metrics
    assert metrics["recipe"] == "qdq-minmax-per-channel" and metrics["agreement_top1"] < 0.9
    assert metrics["gate"]["drop_points"] < 0.01 and "min_agreement" not in metrics["gate"]

    assert _convert(tmp_path, f"{factory}:tied", "--min-agreement", "0.9", "--force") == 0
    metrics = load_package(tmp_path / "pkg").manifest.metrics
    first = metrics["recipes"][0]
    assert first["recipe"] == "qdq-minmax-per-channel" and first["passed"] is False
    assert first["agreement_top1"] < 0.9  # passed the drop, failed the floor: the search went on
    assert metrics["recipe"] != first["recipe"] and metrics["agreement_top1"] >= 0.9
    assert metrics["gate"]["min_agreement"] == 0.9 and metrics["gate"]["passed"] is True


def test_agreement_floors_are_for_classifiers(
    tmp_path: Path, factory: Path, metrics: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _convert(tmp_path, f"{factory}:build", "--metric", f"{metrics}:half", "--max-drop", "100",
                    "--min-confident-agreement", "0.99")  # fmt: skip
    assert code == 2
    assert _gate_error(capsys).endswith(
        "--min-confident-agreement: the user_metric gate has no top-1 agreement (classifiers only)"
    )
    with pytest.raises(SystemExit):
        main(["x.onnx", "--out", str(tmp_path / "o"), "--min-agreement", "1.5"])
    assert "--min-agreement is a fraction in (0, 1], got '1.5'" in capsys.readouterr().err
