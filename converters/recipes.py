"""The accuracy-driven recipe search for image/tensor models (Intel Neural Compressor's tuning loop is the
anchor): compression recipes in order of expected speed, each built, scored against fp32 by the gate's
own measure, and the first one within `--max-drop` kept. Every recipe tried is recorded (the manifest's
`metrics.recipes`, with the latency `_measure` times for all of them in one interleaved run, and size).

The recipes, fastest expected first:
1. `qdq-<method>-per-channel`: static QDQ over every op ORT quantizes, the calibration `--calib-method`
   asks for (MinMax by default), weights per output channel, bias correction;
2. the other calibration methods: Percentile (99.999 %) and Entropy (KL) clip activation outliers that
   MinMax keeps; their histograms are collected one sample at a time on at most HISTOGRAM_SAMPLES samples
   (held all at once they took ~4 GB for 64 samples of a small CNN);
3. `qdq-minmax-per-tensor`: one scale per weight tensor (a model whose channels share a range may
   round better so);
4. `<best so far>+float-sensitive`: the best-scoring recipe above with its most sensitive weighted nodes
   kept in float, found by measured per-node sensitivity (`accuracy.search_exclusions`: SQNR each node
   adds, then the fewest of the ranked nodes that pass);
5. `qdq-conv-only`: only convolutions int8; the recurrent part, MatMul/Gemm (a classifier over
   thousands of characters) and every other op left float;
6. `fp16`: half-precision weights and compute with float32 I/O, the last resort: on CPUs without fp16
   arithmetic it is no faster than fp32, but it is within a hair of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters import accuracy
from converters.quantize import CalibrationMethodName, PreparedModel, convert_fp16, quantize_model
from edge.errors import EdgeError
from edge.profiles import QuantizationScheme

HISTOGRAM_SAMPLES = 16
METHODS: tuple[CalibrationMethodName, ...] = ("minmax", "percentile", "entropy")
CONV_ONLY = ["Conv", "ConvTranspose"]
Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class CnnRecipe:
    name: str
    method: CalibrationMethodName = "minmax"
    per_channel: bool = True
    float_sensitive: bool = False  # keep the most sensitive nodes float (exclusion search)
    op_types: tuple[str, ...] | None = None  # quantize only these op types
    fp16: bool = False

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8"


def recipes(first_method: CalibrationMethodName = "minmax") -> list[CnnRecipe]:
    """The search order: the asked-for calibration first, then the rest of the list above."""
    methods = [first_method, *(m for m in METHODS if m != first_method)]
    listed = [CnnRecipe(f"qdq-{m}-per-channel", m) for m in methods]
    listed += [
        CnnRecipe("qdq-minmax-per-tensor", "minmax", per_channel=False),
        CnnRecipe("float-sensitive", float_sensitive=True),  # named after the recipe it starts from
        CnnRecipe("qdq-conv-only", "minmax", op_types=tuple(CONV_ONLY)),
        CnnRecipe("fp16", fp16=True),
    ]
    return listed


@dataclass
class Trial:
    """One recipe as built and scored: the shape of `text_quantize.RecipeResult` (same `to_dict` keys)."""

    recipe: CnnRecipe
    name: str
    path: Path | None
    evaluation: accuracy.Evaluation | None = None
    passed: bool = False
    latency_ms: float | None = None
    bytes: int = 0
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        scores = self.evaluation
        return {
            "recipe": self.name,
            "precision": self.recipe.precision,
            "passed": self.passed,
            "latency_ms_p50": self.latency_ms,
            "bytes": self.bytes,
            **({"metric": scores.metric, "drop_points": round(scores.drop_points, 3)} if scores else {}),
            **(
                {"agreement_top1": round(scores.details["agreement_top1"], 4)}
                if scores and "agreement_top1" in scores.details
                else {}
            ),
            **({"excluded_nodes": len(self.excluded)} if self.excluded else {}),
            **({"calibration_samples": self.samples} if self.samples else {}),
            **({"error": self.error} if self.error else {}),
        }


# Scores a model file on the evaluation samples against the reference.
Score = Callable[[Path], accuracy.Evaluation]


def search(
    prepared: PreparedModel,
    fp32_path: Path,
    calib: Feeds,
    evaluation_feeds: Feeds,
    scheme: QuantizationScheme,
    score: Score,
    limits: accuracy.GateLimits,
    work: Path,
    *,
    first_method: CalibrationMethodName = "minmax",
    order: list[CnnRecipe] | None = None,
    note: Callable[[str], None] = lambda text: None,
) -> list[Trial]:
    """Try the recipes in order until one passes; returns every trial (the last one passed, unless none
    did). A recipe that cannot be built is recorded with its error and the search goes on."""
    run = _Search(prepared, fp32_path, calib, evaluation_feeds, scheme, score, limits, work, note)
    trials: list[Trial] = []
    for recipe in order if order is not None else recipes(first_method):
        note(recipe.name)
        try:
            trial = run.build(recipe, trials)
        except EdgeError as exc:
            trial = Trial(recipe, recipe.name, None, error=str(exc).splitlines()[0])
        if trial.evaluation is not None:
            trial.passed = limits.passes(trial.evaluation)
        trials.append(trial)
        if trial.passed:
            break
    return trials


@dataclass(frozen=True)
class _Search:
    """What every trial of one search shares."""

    prepared: PreparedModel
    fp32_path: Path
    calib: Feeds
    evaluation_feeds: Feeds
    scheme: QuantizationScheme
    score: Score
    limits: accuracy.GateLimits
    work: Path
    note: Callable[[str], None]

    def build(self, recipe: CnnRecipe, earlier: list[Trial]) -> Trial:
        if recipe.fp16:
            path = self.work / "model.fp16.onnx"
            convert_fp16(self.fp32_path, path)
            return Trial(recipe, recipe.name, path, self.score(path), bytes=path.stat().st_size)
        if recipe.float_sensitive:
            return self._float_sensitive(recipe, earlier)
        feeds = self.calib[:HISTOGRAM_SAMPLES] if recipe.method != "minmax" else self.calib
        path = self._quantize(recipe, feeds, [], "all")
        return Trial(
            recipe, recipe.name, path, self.score(path), bytes=path.stat().st_size, samples=len(feeds)
        )

    def _quantize(self, recipe: CnnRecipe, feeds: Feeds, exclude: list[str], tag: str) -> Path:
        ops = "+".join(recipe.op_types) if recipe.op_types else "all"
        path = self.work / f"model.int8.{recipe.name}.{tag}.onnx"
        quantize_model(
            self.prepared,
            path,
            feeds,
            self.scheme.model_copy(update={"per_channel": recipe.per_channel}),
            recipe.method,
            exclude,
            self.work
            / f"calibration.{recipe.method}.{ops}.json",  # activation ranges: shared by same-calibration recipes
            op_types=list(recipe.op_types) if recipe.op_types else None,
        )
        return path

    def _float_sensitive(self, recipe: CnnRecipe, earlier: list[Trial]) -> Trial:
        """The best full-int8 trial so far with its most sensitive nodes kept in float."""
        built = [t for t in earlier if t.path is not None and t.evaluation is not None and not t.recipe.fp16]
        if not built:
            raise EdgeError("float-sensitive: no int8 recipe was built to start from")
        start = min(built, key=lambda t: t.evaluation.drop_points if t.evaluation else float("inf"))
        base = start.recipe
        feeds = self.calib[: start.samples] if start.samples else self.calib
        name = f"{base.name}+float-sensitive"

        def requantize(exclude: list[str], tag: str) -> accuracy.Candidate:
            path = self._quantize(base, feeds, exclude, f"float-{tag}")
            return accuracy.Candidate(path, self.score(path))

        assert start.path is not None and start.evaluation is not None
        try:
            found = accuracy.search_exclusions(
                self.prepared.path,
                self.prepared.node_names,
                accuracy.Candidate(start.path, start.evaluation),
                requantize,
                limits=self.limits,
                feeds=self.evaluation_feeds,
                work_dir=self.work,
                note=self.note,
            )
        except accuracy.GateError as exc:
            return Trial(recipe, name, None, error=str(exc).removeprefix("accuracy gate: "))
        path = found.chosen.path
        return Trial(
            CnnRecipe(name, base.method, base.per_channel, True, base.op_types),
            name,
            path,
            found.chosen.evaluation,
            bytes=path.stat().st_size,
            excluded=found.excluded,
            sensitivity=found.sensitivity,
            samples=len(feeds),
        )
