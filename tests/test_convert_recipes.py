"""The recipe search (converters.recipes) on tiny graphs built with onnx.helper: recipes are tried in
order until one passes the gate, that one is kept, and every recipe tried is listed with its score."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters import recipes
from converters.accuracy import Evaluation, GateLimits, evaluate, run_onnx
from converters.quantize import per_channel_weight_scales, prepare_for_quantization
from edge.profiles import load_profile
from tests.assets_models import outlier_model, photo_crops


def _feeds(count: int, size: int = 16) -> list[dict[str, np.ndarray]]:
    images = [
        ((c[:, :, ::-1].astype(np.float32) - 127) / 128).transpose(2, 0, 1) for c in photo_crops(count, size)
    ]
    return [{"input": np.ascontiguousarray(image[None])} for image in images]


def _search(tmp_path: Path, max_drop: float, order: list[recipes.CnnRecipe]) -> list[recipes.Trial]:
    source = outlier_model(tmp_path / "outlier.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    feeds = _feeds(12)
    reference = run_onnx(source, feeds)

    def score(path: Path) -> Evaluation:
        return evaluate("raw", reference, run_onnx(path, feeds))

    scheme = load_profile("x86-64-vnni").quantization
    limits = GateLimits(max_drop)
    return recipes.search(prepared, source, feeds, feeds, scheme, score, limits, tmp_path, order=order)


def test_the_first_recipe_that_passes_is_kept_and_later_ones_are_not_tried(tmp_path: Path) -> None:
    order = [
        recipes.CnnRecipe("qdq-minmax-per-tensor", "minmax", per_channel=False),
        recipes.CnnRecipe("float-sensitive", float_sensitive=True),
        recipes.CnnRecipe("fp16", fp16=True),
    ]
    trials = _search(tmp_path, 1.0, order)
    # full int8 is ruined by the outlier channel; keeping the sensitive `mix` float passes; fp16 is never built
    assert [t.name for t in trials] == ["qdq-minmax-per-tensor", "qdq-minmax-per-tensor+float-sensitive"]
    assert [t.passed for t in trials] == [False, True]
    first, chosen = trials
    assert first.evaluation is not None and first.evaluation.drop_points > 1.0
    assert chosen.evaluation is not None and chosen.evaluation.drop_points <= 1.0
    assert "mix" in chosen.excluded and chosen.sensitivity and chosen.recipe.per_channel is False
    assert chosen.path is not None and set(per_channel_weight_scales(chosen.path)) == {"head"}
    listed = [t.to_dict() for t in trials]
    assert listed[1]["recipe"] == chosen.name and listed[1]["passed"] is True
    assert listed[1]["excluded_nodes"] == len(chosen.excluded) and listed[1]["bytes"] > 0
    assert listed[0]["drop_points"] > 1.0 and listed[0]["metric"] == "output_cosine"


def test_every_recipe_is_listed_when_none_passes(tmp_path: Path) -> None:
    order = recipes.recipes()
    trials = _search(tmp_path, -1.0, order)  # nothing can be better than fp32 itself
    assert [t.recipe.name for t in trials] == [r.name for r in order]
    assert not any(t.passed for t in trials)
    for trial in trials:
        if trial.recipe.float_sensitive:  # its search gives up at half the nodes in float, and says so
            assert trial.path is None and trial.error is not None and "still drops" in trial.error
        else:
            assert trial.evaluation is not None and trial.path is not None and trial.path.is_file()
    by_name = {t.name: t for t in trials}
    fp16 = by_name["fp16"].evaluation
    int8 = by_name["qdq-minmax-per-channel"].evaluation
    assert fp16 is not None and int8 is not None and fp16.drop_points < int8.drop_points
    histogram = by_name["qdq-entropy-per-channel"]
    assert histogram.samples == min(12, recipes.HISTOGRAM_SAMPLES)


def test_the_search_order_starts_with_the_asked_calibration() -> None:
    names = [r.name for r in recipes.recipes("percentile")]
    assert names == [
        "qdq-percentile-per-channel", "qdq-minmax-per-channel", "qdq-entropy-per-channel",
        "qdq-minmax-per-tensor", "float-sensitive", "qdq-conv-only", "fp16",
    ]  # fmt: skip
