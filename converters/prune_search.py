"""`--target-speedup X` / `--prune auto`: the pruning ratio is searched, not guessed.

Two phases over a grid of structured ratios (one ratio for every prunable channel group: a per-group
search in the manner of NetAdapt/AMC is the next step, not done here):

1. Speed. Each ratio is pruned, exported, quantized with the profile's scheme and timed against the
   unpruned fp32 model with real ONNX Runtime sessions on this machine, interleaved (the ratio of the
   fastest runs, which load on a shared host moves least); its int8 agreement
   before distillation is scored too. Distillation changes weights, not shapes, so this latency is the
   one the shipped model will have. The grid stops at the first ratio that reaches the target.
2. Accuracy. Starting from the smallest ratio that reaches the target (`--prune auto`: the largest of
   the grid), each candidate is distilled within the distillation budget, quantized and scored against
   the gate; on a miss the search bisects towards less pruning. The fastest ratio that passed is the one
   returned; when none passed, the unpruned model (int8 alone), which the normal gate then judges.

Every point tried is kept in the manifest (`pruning.search.points`) and drawn in the report: the curve of
speed against agreement.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters import accuracy

if TYPE_CHECKING:
    import torch

    from converters.packaging import Json
    from converters.pipeline import DistillPlan, RunContext
    from edge.tasks.base import Decoder

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
LATENCY_SAMPLES = 8  # calibration samples for the quantized copies that are only timed
LATENCY_BUDGET_S = 6.0


@dataclass
class SearchPoint:
    ratio: float
    macs_ratio: float
    latency_ratio: float  # int8 / unpruned fp32, fastest runs of one interleaved measurement
    speedup: float
    drop_points_raw: float  # int8 of the pruned model before distillation, against the reference
    agreement_raw: float
    distilled: bool = False
    drop_points: float | None = None  # after distillation + int8
    agreement: float | None = None
    agreement_confident: float | None = None
    distill_seconds: float | None = None
    passed: bool | None = None


def search_pruning(
    run: RunContext, teacher: torch.nn.Module, plan: DistillPlan
) -> tuple[torch.nn.Module, Json]:
    """The student to ship and its `pruning` record, which holds the search (`search`)."""
    from converters.export import export_onnx
    from converters.pipeline import _distill, _prune

    options = run.options
    target = options.target_speedup or 0.0
    names = [spec.name for spec in run.inputs]
    work = run.work / "search"
    work.mkdir(parents=True, exist_ok=True)
    reference_path = work / "reference.fp32.onnx"
    export_onnx(teacher, run.calib_feeds, names, reference_path)
    gate = _Gate(run, reference_path)

    points: list[SearchPoint] = []
    students: dict[float, tuple[torch.nn.Module, Json]] = {}
    for ratio in GRID:
        student, info = _prune(run, teacher, ratio)
        students[ratio] = (student, info)
        with run.stages.stage(f"search: time pruned {ratio}") as note:
            int8_path = _int8(run, student, work / f"p{ratio:g}", names, LATENCY_SAMPLES)
            latency = _latency_ratio(reference_path, int8_path, run.evaluation_set.feeds[0])
            evaluation = gate.score(int8_path)
            macs = _number(info["macs_after"]) / max(1.0, _number(info["macs_before"]))
            point = SearchPoint(
                ratio, round(macs, 3), round(latency, 3), round(1 / latency, 3),
                round(evaluation.drop_points, 3), round(evaluation.details.get("agreement_top1", float("nan")), 4),
            )  # fmt: skip
            points.append(point)
            note(f"int8 {point.latency_ratio:.2f}x fp32 latency ({point.speedup:.2f}x faster)")
        if target and point.speedup >= target:
            break

    reaching = [p for p in points if target and p.speedup >= target]
    ceiling = points.index(reaching[0]) if reaching else len(points) - 1
    # Bisection for the largest passing index, assuming more pruning never scores better; -1: unpruned.
    low, high, trial = -1, ceiling, ceiling
    while low < high:
        point = points[trial]
        student, info = students[point.ratio]
        student, info = copy.deepcopy(student), copy.deepcopy(info)
        if plan.enabled:
            student = _distill(run, student, teacher, info, plan)
            point.distilled = True
            record = info.get("distillation")
            point.distill_seconds = _number(record.get("seconds")) if isinstance(record, dict) else None
        with run.stages.stage(f"search: gate pruned {point.ratio}") as note:
            path = _int8(run, student, work / f"p{point.ratio:g}-distilled", names, len(run.calib_feeds))
            evaluation = gate.score(path)
            point.drop_points = round(evaluation.drop_points, 3)
            point.agreement = round(evaluation.details.get("agreement_top1", float("nan")), 4)
            point.agreement_confident = _round(evaluation.details.get("agreement_top1_confident"))
            point.passed = run.passes(evaluation)
            verdict = "pass" if point.passed else "miss"
            note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points: {verdict}")
        students[point.ratio] = (student, info)
        if point.passed:
            low = trial
        else:
            high = trial - 1
        trial = (low + high + 1) // 2

    search: Json = {
        "target_speedup": target or None,
        "grid": list(GRID),
        "points": [asdict(p) for p in points],
        "per_group": False,  # one ratio for all prunable channel groups
        "distillation_budget_per_point_s": plan.budget_s,
    }
    if low < 0:
        note_text = (
            "no pruned ratio tried passed --max-drop after distillation: the model is shipped unpruned"
        )
        search.update(chosen=0.0, note=note_text)
        first = students[GRID[0]][1]
        unpruned: Json = {
            "mode": options.prune_mode,
            "ratio": 0.0,
            "macs_before": first["macs_before"],
            "macs_after": first["macs_before"],
            "params_before": first["params_before"],
            "params_after": first["params_before"],
            "distillation": {"steps": 0},
            "notes": [note_text],
            "search": search,
        }
        return teacher, unpruned
    chosen = points[low]
    student, info = students[chosen.ratio]
    search["chosen"] = chosen.ratio
    if target and chosen.speedup < target:
        search["note"] = (
            f"the fastest ratio that passed ({chosen.ratio}) is {chosen.speedup:.2f}x faster than fp32, "
            f"short of the {target:g}x asked"
        )
    info["search"] = search
    return student, info


class _Gate:
    """Scores a candidate ONNX file against the unpruned reference the way the pipeline's gate does."""

    def __init__(self, run: RunContext, reference_path: Path) -> None:
        from converters.pipeline import _guess_task, _output_specs, _postprocess
        from edge.tasks.base import DecoderContext

        self.run = run
        self.reference = accuracy.run_onnx(reference_path, run.evaluation_set.feeds)
        specs = _output_specs(reference_path, self.reference)
        self.task = run.options.task or _guess_task(specs)
        context = DecoderContext.from_specs(run.inputs, specs, run.labels)
        postprocess = _postprocess(self.task, run.options.postprocess)
        self.decoder: Decoder = postprocess.decoder(context)
        self.detection_gate = accuracy.DetectionGate.of(postprocess, context)

    def score(self, path: Path) -> accuracy.Evaluation:
        outputs = accuracy.run_onnx(path, self.run.evaluation_set.feeds)
        return accuracy.evaluate(
            self.task,
            self.reference,
            outputs,
            self.run.evaluation_set.labels,
            self.run.metric_fn,
            decoder=self.decoder,
            detection_gate=self.detection_gate,
        )


def _int8(run: RunContext, model: torch.nn.Module, folder: Path, names: list[str], samples: int) -> Path:
    """`model` exported and quantized with the profile's scheme (no exclusion search); its path."""
    from converters.export import export_onnx
    from converters.quantize import prepare_for_quantization, quantize_model

    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model, run.calib_feeds, names, folder / "fp32.onnx")
    prepared = prepare_for_quantization(folder / "fp32.onnx", folder)
    path = folder / "int8.onnx"
    quantize_model(prepared, path, run.calib_feeds[:samples], run.profile.quantization, "minmax")
    return path


def _latency_ratio(reference_path: Path, int8_path: Path, feed: dict[str, np.ndarray]) -> float:
    from converters.packaging import measure_latency_ms

    latency = measure_latency_ms({"fp32": reference_path, "int8": int8_path}, feed, budget_s=LATENCY_BUDGET_S)
    # The fastest runs, not the medians: beside other jobs the p50 ratio of one model pair moved by up to
    # 0.1 between repeats here (EfficientNet's grid read 0.35x, 0.46x, 0.38x, 0.33x for 0.1-0.4 in one
    # search), the fastest-run ratio by about 0.01; the search ranks ratios, so it needs the steady one.
    return latency["int8"]["min"] / latency["fp32"]["min"]


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None or value != value else round(value, 4)
