"""`--target-speedup X` / `--prune auto`: the pruning ratios are searched, not guessed.

Two searches share the same second phase (`--prune-search`):

- `per-group` (the default), in the manner of NetAdapt (Yang et al. 2018): the prunable channel groups
  are bundled into a few search groups, the stages of the network (a run of layers at one feature-map
  size; `search_groups`), and each gets its own ratio. From the unpruned model, every step proposes
  raising one group's ratio by `STEP`, prunes the teacher with the resulting ratio vector, exports and
  quantizes it and measures it like the grid below; the proposal that loses the least agreement per unit of
  latency saved is taken, until the target is reached, no proposal saves latency any more, or the search
  budget (`--prune-search-time`, default `SEARCH_BUDGET_S`) is used up. Proposals not taken keep their
  measured cost as an estimate for the next step; only the one that ranks first is measured again (a lazy
  greedy search: one or two measurements a step instead of one per group). A proposal is timed in one
  interleaved run beside the path point it comes from and its saving read from that run (two separate
  runs on a shared host differ by more than one step saves); the start is the median of three runs. The
  channels' saliency is measured once on the teacher for all proposals. The accepted vectors form the
  path that phase 2 walks.
- `uniform`: one ratio for every prunable channel group, over a grid of ratios; the grid stops at the first
  ratio that reaches the target.

1. Speed. Each candidate is pruned, exported, quantized with the profile's scheme and timed against the
   unpruned fp32 model with real ONNX Runtime sessions on this machine, interleaved (the ratio of the
   fastest runs, which load on a shared host moves least); its int8 agreement before distillation is
   scored too. Distillation changes weights, not shapes, so this latency is the one the shipped model will
   have.
2. Accuracy. Starting from the end of the path (the grid's first ratio that reaches the target, the
   greedy path's last vector; `--prune auto`: the most pruned), each candidate is distilled within the
   distillation budget, quantized and scored against the gate; on a miss the search bisects back along the
   path towards less pruning. The fastest candidate that passed is the one returned; when none passed, the
   unpruned model (int8 alone), which the normal gate then judges.

Every point tried is kept in the manifest (`pruning.search.points`, with its ratio vector when per group)
and drawn in the report: the curve of speed against agreement.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from converters import accuracy

if TYPE_CHECKING:
    import torch

    from converters.packaging import Json
    from converters.pipeline import DistillPlan, RunContext
    from converters.prune import Saliency
    from edge.tasks.base import Decoder

SearchKind = Literal["per-group", "uniform"]
_T = TypeVar("_T")
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
LATENCY_SAMPLES = 8  # calibration samples for the quantized copies that are only timed
LATENCY_BUDGET_S = 6.0
STEP = 0.1  # per-group search: how much one proposal raises one group's ratio
MAX_GROUP_RATIO = 0.7
MAX_SEARCH_GROUPS = 8
SPLIT_SINGLE_STAGE = 4  # a network at one feature-map size is cut into this many runs of layers instead
SEARCH_BUDGET_S = 300.0
# Latency ratios below this apart are one measurement's noise here (fastest-run ratios repeat to ~0.01
# on a shared host): a proposal that saves less saves nothing.
MIN_SAVING = 0.005


@dataclass
class SearchPoint:
    ratio: float  # uniform: the ratio; per group: the share of prunable channels removed
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
    ratios: dict[str, float] | None = None  # per group: the ratio of every search group
    step: int | None = None  # per group: the greedy step that measured it (0: the unpruned start)
    accepted: bool | None = None  # per group: on the path (taken), or a proposal not taken
    # per group: the path point it was proposed from, int8, timed in the same interleaved run (x fp32)
    base_latency_ratio: float | None = None


@dataclass
class SearchGroup:
    """Channel groups searched with one ratio: a stage of the network, or a run of its layers."""

    name: str  # the stage's feature-map size ("56x56", "flat" after the spatial axes are gone)
    roots: list[str]  # the channel groups it bundles, by root layer (prune.ChannelGroup.root)
    channels: list[int]
    layers: list[str] = field(default_factory=list)  # the layers whose outputs it thins, in order

    def record(self) -> Json:
        first, last = (self.layers[0], self.layers[-1]) if self.layers else ("", "")
        return {"name": self.name, "channel_groups": len(self.roots), "channels": sum(self.channels),
                "layers": f"{first} .. {last}" if first != last else first}  # fmt: skip


def search_pruning(
    run: RunContext, teacher: torch.nn.Module, plan: DistillPlan
) -> tuple[torch.nn.Module, Json]:
    """The student to ship and its `pruning` record, which holds the search (`search`)."""
    from converters.export import export_onnx

    names = [spec.name for spec in run.inputs]
    work = run.work / "search"
    work.mkdir(parents=True, exist_ok=True)
    reference_path = work / "reference.fp32.onnx"
    export_onnx(teacher, run.calib_feeds, names, reference_path)
    probe = _Probe(run, work, names, reference_path)
    if run.options.prune_search == "uniform":
        return _uniform(run, teacher, plan, probe)
    return _per_group(run, teacher, plan, probe)


def _uniform(
    run: RunContext, teacher: torch.nn.Module, plan: DistillPlan, probe: _Probe
) -> tuple[torch.nn.Module, Json]:
    from converters.pipeline import _prune

    target = run.options.target_speedup or 0.0
    points: list[SearchPoint] = []
    students: list[tuple[torch.nn.Module, Json]] = []
    saliency = _measure_saliency(run, teacher)
    for ratio in GRID:
        student, info = _prune(run, teacher, ratio, saliency=saliency)
        students.append((student, info))
        with run.stages.stage(f"search: time pruned {ratio}") as note:
            point = probe.measure(student, info, f"p{ratio:g}")
            point.ratio = ratio
            points.append(point)
            note(f"int8 {point.latency_ratio:.2f}x fp32 latency ({point.speedup:.2f}x faster)")
        if target and point.speedup >= target:
            break
    reaching = [p for p in points if target and p.speedup >= target]
    ceiling = points.index(reaching[0]) if reaching else len(points) - 1
    labels = [f"p{p.ratio:g}" for p in points]
    low, shipped = _bisect(run, teacher, plan, probe, points, students.__getitem__, ceiling, labels)
    search: Json = {
        "target_speedup": target or None,
        "kind": "uniform",
        "grid": list(GRID),
        "points": [asdict(p) for p in points],
        "per_group": False,  # one ratio for all prunable channel groups
        "distillation_budget_per_point_s": plan.budget_s,
    }
    return _result(run, teacher, search, points, low, shipped, students[0][1])


def _per_group(
    run: RunContext, teacher: torch.nn.Module, plan: DistillPlan, probe: _Probe
) -> tuple[torch.nn.Module, Json]:
    import torch

    from converters.pipeline import _prune
    from converters.prune import kept_channel_count

    target = run.options.target_speedup or 0.0
    budget = run.options.prune_search_time
    budget = SEARCH_BUDGET_S if budget is None else budget
    round_to = run.profile.pruning.channel_multiple
    example = tuple(torch.from_numpy(run.calib_feeds[0][s.name]) for s in run.inputs)
    with run.stages.stage("search: channel groups") as note:
        groups = search_groups(teacher, example)
        note(", ".join(g.name for g in groups))
    saliency = _measure_saliency(run, teacher)
    by_name = {g.name: g for g in groups}
    pruned_info: list[Json] = []  # one pruned candidate's counts, for the record when none ships
    total_channels = sum(sum(g.channels) for g in groups) or 1

    def prune(vector: dict[str, float]) -> tuple[torch.nn.Module, Json]:
        ratios = {root: vector[g.name] for g in groups for root in g.roots}
        return _prune(run, teacher, 0.0, ratios, saliency) if any(ratios.values()) else (teacher, {})

    def measure(vector: dict[str, float], step: int, base: SearchPoint | None) -> SearchPoint:
        # Not kept: phase 2 prunes its few candidates again (deterministic, seconds) rather than hold
        # every proposal's model in memory through the search.
        student, info = prune(vector)
        if info and not pruned_info:
            pruned_info.append(info)
        title = ", ".join(f"{n} {r:g}" for n, r in vector.items() if r)
        with run.stages.stage(f"search: time {title or 'unpruned'}") as note:
            label = f"v{step}-{len(points_measured)}"
            # The start is what every first proposal is compared with and what the target is checked
            # on: the median of three runs, not one reading a busy moment can move.
            if base is None:
                point = probe.measure(student, info, label, repeats=3)
            else:
                point = probe.measure(student, info, label, probe.paths[files[id(base)]])
            files[id(point)] = label
            note(f"int8 {point.latency_ratio:.2f}x fp32 latency, agreement {point.agreement_raw:.3f}")
        removed = sum(c - kept_channel_count(c, vector[g.name], round_to) for g in groups for c in g.channels)
        point.ratio = round(removed / total_channels, 3)
        point.ratios = dict(vector)
        point.step = step
        points_measured.append(point)
        return point

    def next_ratio(name: str, ratio: float) -> float | None:
        group = by_name[name]
        now = [kept_channel_count(c, ratio, round_to) for c in group.channels]
        proposal = round(ratio + STEP, 3)
        while proposal <= MAX_GROUP_RATIO + 1e-9:
            # A step that removes no channel anywhere in the group (rounded up to channel_multiple) is
            # not worth an export: go on to the first ratio that does.
            if [kept_channel_count(c, proposal, round_to) for c in group.channels] != now:
                return proposal
            proposal = round(proposal + STEP, 3)
        return None

    points_measured: list[SearchPoint] = []
    files: dict[int, str] = {}  # id of a measured point -> its int8 file's label in probe.paths
    started = time.monotonic()
    points, stopped = greedy_path(
        [g.name for g in groups], measure, next_ratio, target, lambda: time.monotonic() - started > budget
    )
    seconds = round(time.monotonic() - started, 1)
    path = [p for p in points if p.accepted and p.step]
    labels = [f"v{p.step}" for p in path]
    low, shipped = _bisect(
        run, teacher, plan, probe, path, lambda i: prune(path[i].ratios or {}), len(path) - 1, labels
    )
    # nothing could be pruned at all: the counts come from a zero-ratio pass
    any_info = pruned_info[0] if pruned_info else _prune(run, teacher, 0.0)[1]
    search: Json = {
        "target_speedup": target or None,
        "kind": "per-group",
        "per_group": True,
        "groups": [g.record() for g in groups],
        "group_names": [g.name for g in groups],
        "step": STEP,
        "max_group_ratio": MAX_GROUP_RATIO,
        "budget_s": budget,
        "seconds": seconds,  # the speed phase; distillation is in each point's distill_seconds
        "stopped": stopped,
        "points": [asdict(p) for p in points],
        "distillation_budget_per_point_s": plan.budget_s,
    }
    student, info = _result(run, teacher, search, path, low, shipped, any_info)
    if low >= 0:
        chosen = path[low]
        info["ratio"] = chosen.ratio
        info["group_ratios"] = dict(chosen.ratios or {})
    return student, info


def greedy_path(
    groups: Sequence[str],
    measure: Callable[[dict[str, float], int, SearchPoint | None], SearchPoint],
    next_ratio: Callable[[str, float], float | None],
    target: float,
    out_of_time: Callable[[], bool],
) -> tuple[list[SearchPoint], str]:
    """NetAdapt's greedy loop over ratio vectors; every point measured, in order, and why it stopped.

    `measure(vector, step, base)` prunes, quantizes and times one vector (beside `base`, the path point
    it is proposed from; None for the start); `next_ratio(group, ratio)` is the
    group's next ratio to propose (None: the group is at its cap). The start (all zeros) and the proposals
    taken are marked `accepted`. A proposal measured from an earlier path point keeps its cost (agreement
    lost per latency saved, from that point) as an estimate: it is measured again only when it ranks first.
    When the time is up in the middle of a step, the best proposal measured in that step is taken.
    """
    vector = dict.fromkeys(groups, 0.0)
    start = measure(dict(vector), 0, None)
    start.accepted = True
    points, current = [start], start
    estimates: dict[str, tuple[SearchPoint, SearchPoint]] = {}  # group -> (measured from, proposal)
    while True:
        if target and current.speedup >= target:
            return points, "target"
        step = sum(1 for p in points if p.accepted)
        proposals = {g: r for g in groups if (r := next_ratio(g, vector[g])) is not None}
        if not proposals:
            return points, "every group at its cap"
        taken: str | None = None
        while taken is None:
            stale = [g for g in proposals if g not in estimates or estimates[g][0] is not current]
            ranked = sorted(proposals, key=lambda g: _rank(*estimates[g]) if g in estimates else (-1.0, 0.0))
            first = ranked[0]
            if first in stale:
                if out_of_time():
                    # the step is cut short: the best of what it measured from here is still a step
                    done = [estimates[g][1] for g in proposals if g not in stale]
                    best = choose(current, done)
                    if best is not None:
                        best.accepted = True
                    return points, "budget"
                proposal = measure({**vector, first: proposals[first]}, step, current)
                proposal.accepted = False
                points.append(proposal)
                estimates[first] = (current, proposal)
                continue
            if _saving(current, estimates[first][1]) < MIN_SAVING:
                if stale:  # an estimate from an older point may have moved; measure those before giving up
                    estimates.pop(stale[0], None)
                    continue
                return points, "no proposal saves latency"
            taken = first
        current = estimates.pop(taken)[1]
        current.accepted = True
        vector = dict(current.ratios or {**vector, taken: proposals[taken]})


def choose(current: SearchPoint, proposals: Sequence[SearchPoint]) -> SearchPoint | None:
    """The proposal that loses the least agreement per unit of latency saved from `current` (None: none
    saves `MIN_SAVING`)."""
    saving = [p for p in proposals if _saving(current, p) >= MIN_SAVING]
    return min(saving, key=lambda p: _rank(current, p)) if saving else None


def _rank(base: SearchPoint, proposal: SearchPoint) -> tuple[float, float]:
    """Sort key, smaller first: agreement lost per latency saved, then the larger saving.

    Agreement that rises after pruning is counted as none lost: on a few dozen samples it is the noise of
    one or two, and dividing a gain by the saving would favour the proposals that save least. A proposal
    that saves nothing ranks after every one that does."""
    saved = _saving(base, proposal)
    if saved < MIN_SAVING:
        return (math.inf, -saved)
    lost = max(0.0, _accuracy(base) - _accuracy(proposal))
    return (lost / saved, -saved)


def _saving(base: SearchPoint, proposal: SearchPoint) -> float:
    """Latency saved (x fp32). Timed beside its base in one run when it was (a shared host moves two
    separate runs apart more than one pruning step moves latency)."""
    if proposal.base_latency_ratio is not None:
        return proposal.base_latency_ratio - proposal.latency_ratio
    return base.latency_ratio - proposal.latency_ratio


def _accuracy(point: SearchPoint) -> float:
    """Top-1 agreement before distillation; tasks without one (detection, raw) use the gate's drop."""
    if point.agreement_raw == point.agreement_raw:
        return point.agreement_raw
    return 1.0 - point.drop_points_raw / 100.0


def search_groups(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[SearchGroup]:
    """The prunable channel groups bundled by stage: consecutive groups whose layers end at the same
    feature-map size (the smallest output of the layers a group thins: a strided depthwise conv puts its
    block in the stage it leads into). More than `MAX_SEARCH_GROUPS` stages are merged in runs; a network
    that never changes size is cut into `SPLIT_SINGLE_STAGE` runs of consecutive groups instead."""
    import torch

    from converters.prune import channel_groups

    sizes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):

            def record(_m: torch.nn.Module, _a: object, output: torch.Tensor, name: str = name) -> None:
                sizes.setdefault(name, tuple(output.shape[2:]) if output.dim() > 2 else ())

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    order = {name: index for index, name in enumerate(sizes)}  # execution order
    found = [g for g in channel_groups(model, example_inputs) if any(w in order for w in g.writers)]
    found.sort(key=lambda g: min(order[w] for w in g.writers if w in order))

    def stage(writers: list[str]) -> tuple[int, ...]:
        return min((sizes[w] for w in writers if w in sizes), key=lambda size: math.prod(size))

    runs: list[list[tuple[str, int, list[str]]]] = []
    keys: list[tuple[int, ...]] = []
    for group in found:
        key = stage(group.writers)
        if not keys or keys[-1] != key:
            runs.append([])
            keys.append(key)
        runs[-1].append((group.root, group.channels, group.writers))
    names = ["x".join(map(str, key)) if key else "flat" for key in keys]
    if len(runs) == 1 and len(runs[0]) > 1:
        runs = _split(runs[0], min(SPLIT_SINGLE_STAGE, len(runs[0])))
        names = [f"{names[0]}.{i + 1}" for i in range(len(runs))]
    elif len(runs) > MAX_SEARCH_GROUPS:
        merged = _split(list(range(len(runs))), MAX_SEARCH_GROUPS)
        names = ["+".join(names[i] for i in (part[0], part[-1])) for part in merged]
        runs = [[item for i in part for item in runs[i]] for part in merged]
    seen: dict[str, int] = {}
    result = []
    for name, members in zip(names, runs, strict=True):
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}#{seen[name]}"  # a size the network comes back to
        layers = [w for _, _, writers in members for w in writers]
        result.append(SearchGroup(unique, [m[0] for m in members], [m[1] for m in members], layers))
    return result


def _split(items: list[_T], parts: int) -> list[list[_T]]:
    """`items` cut into `parts` consecutive runs of near-equal length."""
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def _measure_saliency(run: RunContext, teacher: torch.nn.Module) -> Saliency:
    """Once per search: every candidate is cut from the same teacher, so the channels' saliency on the
    calibration samples is the same for all of them (`prune_model` would measure it again each time)."""
    from converters.pipeline import _saliency

    with run.stages.stage("search: channel saliency on the calibration samples"):
        return _saliency(run, teacher)


def describe(point: SearchPoint) -> str:
    """'0.3' for a uniform point; '16x16 0.2, 8x8 0.4' (groups left unpruned not named) per group."""
    if point.ratios is None:
        return f"{point.ratio:g}"
    return ", ".join(f"{name} {ratio:g}" for name, ratio in point.ratios.items() if ratio) or "unpruned"


class _Probe:
    """Phase 1's measurement of one candidate: int8 latency against fp32, int8 agreement before
    distillation; and the gate both phases score with."""

    def __init__(self, run: RunContext, work: Path, names: list[str], reference_path: Path) -> None:
        self.run, self.work, self.names, self.reference_path = run, work, names, reference_path
        self.gate = _Gate(run, reference_path)
        self.paths: dict[str, Path] = {}  # label -> the int8 file measured

    def measure(
        self, student: torch.nn.Module, info: Json, label: str, base: Path | None = None, repeats: int = 1
    ) -> SearchPoint:
        """`base`: another int8 file timed in the same run (the path point a proposal comes from);
        `repeats`: the median of that many runs (for the point every later one is compared with)."""
        int8_path = _int8(self.run, student, self.work / label, self.names, LATENCY_SAMPLES)
        self.paths[label] = int8_path
        feed = self.run.evaluation_set.feeds[0]
        readings = [_latency_ratios(self.reference_path, int8_path, base, feed) for _ in range(repeats)]
        latency = float(np.median([r[0] for r in readings]))
        evaluation = self.gate.score(int8_path)
        macs = _number(info.get("macs_after", 1)) / max(1.0, _number(info.get("macs_before", 1)))
        point = SearchPoint(
            0.0, round(macs, 3), round(latency, 3), round(1 / latency, 3),
            round(evaluation.drop_points, 3), round(evaluation.details.get("agreement_top1", float("nan")), 4),
        )  # fmt: skip
        if base is not None:
            point.base_latency_ratio = round(float(np.median([r[1] for r in readings])), 3)
        return point


def _bisect(
    run: RunContext,
    teacher: torch.nn.Module,
    plan: DistillPlan,
    probe: _Probe,
    points: list[SearchPoint],
    pruned: Callable[[int], tuple[torch.nn.Module, Json]],
    ceiling: int,
    labels: list[str],
) -> tuple[int, tuple[torch.nn.Module, Json] | None]:
    """Phase 2 along `points` (ordered by pruning): the largest index that passes the gate after
    distillation, assuming more pruning never scores better (-1: none, ship unpruned), and that
    candidate's distilled student. `pruned(i)`: candidate i, pruned, not distilled."""
    from converters.pipeline import _distill

    low, high, trial = -1, ceiling, ceiling
    passed: tuple[torch.nn.Module, Json] | None = None
    while low < high:
        point = points[trial]
        student, info = copy.deepcopy(pruned(trial))
        if plan.enabled:
            student = _distill(run, student, teacher, info, plan)
            point.distilled = True
            record = info.get("distillation")
            point.distill_seconds = _number(record.get("seconds")) if isinstance(record, dict) else None
        with run.stages.stage(f"search: gate {labels[trial]}") as note:
            path = _int8(
                run, student, probe.work / f"{labels[trial]}-distilled", probe.names, len(run.calib_feeds)
            )
            evaluation = probe.gate.score(path)
            point.drop_points = round(evaluation.drop_points, 3)
            point.agreement = round(evaluation.details.get("agreement_top1", float("nan")), 4)
            point.agreement_confident = _round(evaluation.details.get("agreement_top1_confident"))
            point.passed = run.passes(evaluation)
            verdict = "pass" if point.passed else "miss"
            note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points: {verdict}")
        if point.passed:
            low, passed = trial, (student, info)
        else:
            high = trial - 1
        trial = (low + high + 1) // 2
    return low, passed


def _result(
    run: RunContext,
    teacher: torch.nn.Module,
    search: Json,
    candidates: list[SearchPoint],
    low: int,
    shipped: tuple[torch.nn.Module, Json] | None,
    any_info: Json,
) -> tuple[torch.nn.Module, Json]:
    """The student and `pruning` record of candidate `low` (`shipped`; the search in the record), or the
    unpruned model's."""
    target = run.options.target_speedup or 0.0
    if low < 0 or shipped is None:
        note_text = (
            "no pruned candidate tried passed --max-drop after distillation: the model is shipped unpruned"
            if candidates
            else "the search took no pruned candidate: the model is shipped unpruned"
        )
        search.update(chosen=0.0, note=note_text)
        unpruned: Json = {
            "mode": run.options.prune_mode,
            "ratio": 0.0,
            "macs_before": any_info["macs_before"],
            "macs_after": any_info["macs_before"],
            "params_before": any_info["params_before"],
            "params_after": any_info["params_before"],
            "distillation": {"steps": 0},
            "notes": [note_text],
            "search": search,
        }
        return teacher, unpruned
    chosen = candidates[low]
    student, info = shipped
    search["chosen"] = dict(chosen.ratios) if chosen.ratios is not None else chosen.ratio
    if target and chosen.speedup < target:
        search["note"] = (
            f"the fastest candidate that passed ({describe(chosen)}) is {chosen.speedup:.2f}x faster than "
            f"fp32, short of the {target:g}x asked"
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


def _latency_ratios(
    reference_path: Path, int8_path: Path, base: Path | None, feed: dict[str, np.ndarray]
) -> tuple[float, float]:
    """(int8, base) fastest runs over fp32's, one interleaved run; base nan when not given."""
    from converters.packaging import measure_latency_ms

    paths = {"fp32": reference_path, "int8": int8_path} | ({"base": base} if base is not None else {})
    latency = measure_latency_ms(paths, feed, budget_s=LATENCY_BUDGET_S * len(paths) / 2)
    # The fastest runs, not the medians: beside other jobs the p50 ratio of one model pair moved by up to
    # 0.1 between repeats here (EfficientNet's grid read 0.35x, 0.46x, 0.38x, 0.33x for 0.1-0.4 in one
    # search), the fastest-run ratio by about 0.01; the search ranks ratios, so it needs the steady one.
    fp32 = latency["fp32"]["min"]
    return latency["int8"]["min"] / fp32, latency["base"]["min"] / fp32 if base is not None else float("nan")


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None or value != value else round(value, 4)
