"""Distillation on the real EfficientNet-Lite0 with a small budget never leaves the pruned model worse
than pruning alone (issue 18: it once took pruned 0.1 from 0.885 to 0.744 agreement), judged by the
gate's own measure on crops distillation never trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
pytest.importorskip("efficientnet_lite_pytorch")

from converters.cli import main
from edge.package import load_package
from tests.assets_models import write_photo_folder

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_distilling_a_pruned_efficientnet_never_leaves_it_worse(tmp_path: Path) -> None:
    calib = write_photo_folder(tmp_path / "calib", 48, size=224, seed=1)
    held_out = write_photo_folder(tmp_path / "eval", 32, size=224, seed=2)

    def pruned_float(name: str, *extra: str) -> dict[str, float]:
        out = tmp_path / name
        code = main(
            [f"{REPO / 'examples' / 'efficientnet_lite0.py'}:build", "--out", str(out), "--calib", str(calib),
             "--eval", str(held_out), "--input-shape", "1,3,224,224", "--mean", "127,127,127",
             "--std", "128,128,128", "--task", "classification", "--prune", "0.1", "--max-drop", "100",
             "--formats", "onnx", "-q", *extra]
        )  # fmt: skip
        assert code == 0
        manifest = load_package(out).manifest
        assert manifest.pruning is not None and manifest.pruning["ratio"] == 0.1
        return {"drop": 100 * manifest.metrics["fp32"]["expected_top1_drop"], **manifest.metrics["fp32"]}

    alone = pruned_float("pruned", "--distill-time", "0")
    distilled = pruned_float("distilled", "--distill-time", "90s")
    assert alone["drop"] > 1.0  # pruning costs something for distillation to win back
    assert distilled["drop"] <= alone["drop"], (alone, distilled)
    assert distilled["agreement_top1"] >= alone["agreement_top1"] - 1 / 32, (alone, distilled)
