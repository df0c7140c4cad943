"""The `edge-convert` stages, in order, each shown with a rich progress line and timed for the report:

load -> [prune -> distill] -> [quantization-aware fine-tuning] -> export ONNX -> check fp32 -> compress
to the profile's precision (int8: quantize + exclusion search; fp16: half-precision weights with float32
I/O; fp32: as it is) -> accuracy gate -> [TFLite at the same precision] -> measure -> [report] -> package
(checked the way edge-infer opens it).

Metrics and report lines are labelled with the precision that was measured, never a fixed "int8".

Every stage reads the `RunContext` the load stage fixed and returns its own small typed result; `_convert`
is the sequence of them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from converters import accuracy
from converters.calibration import SampleSet, load_samples, resolve_input_specs
from converters.export import BATCH
from converters.packaging import (
    GOLDEN_SAMPLES,
    ArtifactFile,
    GoldenSet,
    Json,
    PackageSpec,
    Precision,
    check_out_dir,
    golden_tolerance,
    measure_latency_ms,
    write_package,
)
from converters.sources import LoadedSource, load_source, resolve_callable
from converters.stateful import check_fed_inputs, complete_feeds
from edge.errors import ConfigError, EdgeError
from edge.package import ConstantInput, Manifest, Quantization, StateLink, TensorSpec
from edge.profiles import DeviceProfile, resolve_profile
from edge.tasks.base import Decoder, DecoderContext, TaskConfig
from edge.tasks.classification import ClassificationConfig
from edge.tasks.detection import YoloConfig
from edge.tasks.raw import RawConfig
from edge.tasks.text_recognition import TextRecognitionConfig
from edge.tasks.voice_activity import VoiceActivityConfig

if TYPE_CHECKING:
    import torch

    from converters.prune import Saliency
    from converters.recipes import Trial

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.25
DEFAULT_DISTILL_SECONDS = 600.0  # distillation's budget when pruning is asked for and none is given
MAX_DISTILL_STEPS = 100_000  # the step cap when only a time budget is set

DISTILL_PATIENCE = 4  # checkpoints without a better held-out loss before a budgeted run stops early
DEFAULT_QAT_SECONDS = 120.0  # --qat's time budget without --qat-time
QAT_NEEDS_TORCH = (
    "--qat: quantization-aware fine-tuning needs a torch factory SOURCE (file.py:fn, pkg.module:fn)"
)
Feed = dict[str, np.ndarray]  # one sample: input name -> a batch of one
Note = Callable[[str], None]  # sets the text beside a stage's progress line


@dataclass
class ConvertOptions:
    source: str
    out: Path
    profile: str | None = None
    calib: Path | None = None
    eval: Path | None = None
    labels: Path | None = None
    input_shape: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: str | None = None
    color: str | None = None
    task: str | None = None
    postprocess: TaskConfig | None = None  # --postprocess; None: the task's default
    prune: float = 0.0
    prune_mode: Literal["structured", "unstructured"] = "structured"
    distill_steps: int = 0
    distill_lr: float = 1e-4
    prune_layers: float = 0.0  # transformers: share of encoder layers dropped, then distilled
    tokenizer: Path | None = None  # a transformer .onnx SOURCE: its tokenizer.json
    # seconds; None: DEFAULT_DISTILL_SECONDS when pruning (TEXT_DISTILL_SECONDS after --prune-layers), else none
    distill_time: float | None = None
    qat: bool = False  # --qat: fine-tune under the profile's int8 rounding before quantizing
    qat_time: float | None = None  # seconds; None: DEFAULT_QAT_SECONDS
    target_speedup: float | None = None  # --target-speedup / --prune auto (0: fastest within --max-drop)
    prune_search: Literal["per-group", "uniform"] = "per-group"  # --prune-search (converters.prune_search)
    prune_search_time: float | None = None  # seconds for the per-group speed phase; None: SEARCH_BUDGET_S
    formats: list[str] | None = None
    max_drop: float = 1.0
    min_agreement: float | None = None  # classifiers: top-1 agreement with fp32 the gate also requires
    min_confident_agreement: float | None = None  # ... where fp32's confidence >= accuracy.CONFIDENT
    metric: str | None = None
    sign_key: Path | None = None
    sequence: int | None = None
    report: bool = False
    weights: Path | None = None
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    max_calibration_samples: int = 128
    quiet: bool = False
    force: bool = False  # replace a non-package directory at `out`
    constants: list[ConstantInput] = field(default_factory=list)  # --const NAME=VALUE
    state: list[StateLink] = field(default_factory=list)  # --state IN:OUT

    @property
    def limits(self) -> accuracy.GateLimits:
        """What the accuracy gate requires: --max-drop and the agreement floors."""
        return accuracy.GateLimits(self.max_drop, self.min_agreement, self.min_confident_agreement)


@dataclass
class StageRecord:
    name: str
    seconds: float


@dataclass
class ConvertResult:
    out: Path
    manifest: Manifest
    gate_passed: bool
    evaluation: accuracy.Evaluation
    stages: list[StageRecord]
    sensitivity: dict[str, float] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    report: Path | None = None


class Stages:
    """A rich progress display with one line per stage, and the wall time of each stage."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.records: list[StageRecord] = []
        self.progress = Progress(
            SpinnerColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True, quiet=quiet),
            transient=False,
        )

    def __enter__(self) -> Stages:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextmanager
    def stage(self, name: str) -> Iterator[Note]:
        task = self.progress.add_task(name, total=1)
        start = time.perf_counter()

        def note(text: str) -> None:
            self.progress.update(task, description=f"{name}: {text}")

        try:
            yield note
        except BaseException:
            self.progress.update(task, description=f"[red]{name}: failed")
            raise
        finally:
            self.records.append(StageRecord(name, time.perf_counter() - start))
        self.progress.update(task, completed=1)


# What the stages share and what they return -------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """Everything the load stage fixed and every later stage reads.

    A `.tflite` SOURCE is packaged as it is: `calib_feeds` is empty and `evaluation_set` holds whichever
    samples were given (`--calib`, else `--eval`, else none), which become its golden inputs."""

    options: ConvertOptions
    profile: DeviceProfile
    formats: list[str]
    source: LoadedSource
    inputs: list[TensorSpec]
    labels: list[str] | None
    metric_fn: accuracy.MetricFn | None
    calib_feeds: list[Feed]
    evaluation_set: SampleSet
    work: Path
    stages: Stages

    def score(self, baseline: Baseline, outputs: accuracy.Outputs) -> accuracy.Evaluation:
        """A candidate's outputs on the evaluation samples against the reference's."""
        return accuracy.evaluate(
            baseline.task,
            baseline.outputs,
            outputs,
            self.evaluation_set.labels,
            self.metric_fn,
            decoder=baseline.decoder,
            detection_gate=baseline.detection_gate,
        )

    @property
    def limits(self) -> accuracy.GateLimits:
        return self.options.limits

    def passes(self, evaluation: accuracy.Evaluation) -> bool:
        return self.limits.passes(evaluation)


@dataclass(frozen=True)
class FloatModels:
    """The fp32 ONNX models: the reference every candidate is measured against, and the model to compress
    (the same file unless pruning or distillation changed the torch module)."""

    reference_path: Path
    fp32_path: Path
    # the module the TFLite export converts: behind `fp32_path`, or after QAT the one behind `qat_path`
    torch_model: torch.nn.Module | None = None
    pruning: Json | None = None  # the manifest's `pruning` record
    export: Json | None = None  # exporter, opset, difference to torch
    # --qat: the fine-tuned float model, exported only to be quantized; `fp32_path` stays the float model
    # that is gated and shipped (QAT tunes weights for the int8 grid, not for float inference)
    qat_path: Path | None = None
    qat: Json | None = None  # what quantization-aware fine-tuning did (`metrics.qat`)

    @property
    def changed(self) -> bool:
        return self.fp32_path != self.reference_path

    @property
    def to_quantize(self) -> Path:
        """The float model the int8 recipes start from."""
        return self.qat_path if self.qat_path is not None else self.fp32_path


@dataclass(frozen=True)
class Baseline:
    """The reference on the evaluation samples ("check fp32"), which every candidate is scored against."""

    outputs: accuracy.Outputs
    output_specs: list[TensorSpec]
    task: str
    postprocess: TaskConfig  # what goes into the manifest; the gate decodes with the same decoder
    decoder: Decoder
    detection_gate: accuracy.DetectionGate | None  # detection: how the gate reads boxes
    fp32_eval: accuracy.Evaluation  # the float model to compress, against the reference


@dataclass(frozen=True)
class Shipped:
    """The model that passed the gate at the profile's precision: an int8 or fp16 file (`path`), or for
    fp32 profiles the float model as it is (no path)."""

    precision: Precision
    path: Path | None
    evaluation: accuracy.Evaluation
    quantization: Quantization | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    recipes: list[Trial] = field(default_factory=list)  # every recipe the search tried, in order


@dataclass(frozen=True)
class TfliteResult:
    artifact: ArtifactFile
    metrics: Json
    outputs: accuracy.Outputs  # on the evaluation samples, so that the golden tolerance covers the .tflite


@dataclass(frozen=True)
class Measurements:
    latency: dict[str, dict[str, float]]  # model -> p50/p90 ms
    sizes: dict[str, int]  # model -> bytes
    golden: GoldenSet


# The run --------------------------------------------------------------------------------------------------


def convert(options: ConvertOptions) -> ConvertResult:
    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp, Stages(options.quiet) as stages:
        from converters.text_onnx import is_text_source

        if is_text_source(Path(options.source), options.tokenizer):  # transformers: their own pipeline
            from converters.text_pipeline import convert_text

            return convert_text(options, Path(tmp), stages)
        if options.prune_layers > 0:
            raise ConfigError("--prune-layers: for transformers (a Hugging Face folder); use --prune here")
        return _convert(options, Path(tmp), stages)


def _convert(options: ConvertOptions, work: Path, stages: Stages) -> ConvertResult:
    run = _load(options, work, stages)
    if run.source.kind == "tflite":
        return _package_tflite(run)
    floats = _float_models(run)
    baseline = _check_fp32(run, floats)
    shipped = _compress_and_gate(run, baseline, floats)
    tflite = _export_tflite(run, baseline, floats.torch_model) if "tflite" in run.formats else None
    measured = _measure(run, floats, shipped, tflite)
    metrics = _metrics(run, floats, baseline, shipped, tflite, measured)
    report_dir = _report(run, floats, baseline, shipped, measured, metrics) if options.report else None
    manifest = _package(
        run,
        PackageSpec(
            name=run.source.name,
            task=baseline.task,
            inputs=_batch_axis(run.inputs, floats),
            outputs=_batch_axis(baseline.output_specs, floats),
            artifacts=_artifacts(floats, shipped, tflite),
            golden=measured.golden,
            postprocess=baseline.postprocess,
            labels=run.labels,
            pruning=floats.pruning,
            metrics=metrics,
            profile=run.profile.name,
            extra_files={"report": report_dir} if report_dir is not None else {},
            constants=options.constants,
            state=options.state,
        ),
    )
    return ConvertResult(
        options.out,
        manifest,
        run.passes(shipped.evaluation),
        shipped.evaluation,
        stages.records,
        shipped.sensitivity,
        shipped.excluded,
        options.out / "report" / "report.md" if report_dir is not None else None,
    )


def _batch_axis(specs: list[TensorSpec], floats: FloatModels) -> list[TensorSpec]:
    """The package's tensors with the symbolic batch axis its ONNX artifacts were exported with (a TFLite
    artifact keeps its own fixed-batch I/O in its artifact entry)."""
    if not (floats.export or {}).get("dynamic_batch"):
        return specs
    return [spec.model_copy(update={"shape": [BATCH, *spec.shape[1:]]}) for spec in specs]


def _load(options: ConvertOptions, work: Path, stages: Stages) -> RunContext:
    if not 0 <= options.prune < 1:
        raise ConfigError(f"--prune {options.prune}: must be in [0, 1)")
    check_out_dir(options.out, options.force)  # before minutes of work, not after
    with stages.stage("load"):
        profile = resolve_profile(options.profile).profile
        formats = options.formats or list(profile.quantization.formats)
        unknown = sorted(set(formats) - {"onnx", "tflite"})
        if unknown:
            raise ConfigError(f"--formats: unknown format(s) {unknown}; use onnx, tflite")
        metric_fn = resolve_callable(options.metric, "--metric") if options.metric else None
        labels = _read_labels(options.labels)
        source = load_source(options.source, options.weights)
        asks_torch = options.target_speedup is not None or (options.distill_time or 0) > 0
        if source.kind != "torch" and (options.prune > 0 or options.distill_steps > 0 or asks_torch):
            raise ConfigError(
                f"--prune/--distill-steps need a torch factory SOURCE, not a .{source.kind} file"
            )
        _check_qat(options, source.kind, profile)
        expected_task = options.task or (
            "classification" if source.kind == "torch" else _guess_task(source.outputs)
        )
        resize = {"classification": "center-crop", "detection": "letterbox"}.get(expected_task, "stretch")
        inputs = resolve_input_specs(
            source.inputs,
            input_shape=options.input_shape,
            layout=options.layout,
            color=options.color,
            mean=options.mean,
            std=options.std,
            resize=resize,
        )
        if source.kind == "torch":
            _check_torch_accepts(source.module, inputs)
        data_inputs = _data_inputs(options, source, inputs)
        calib = load_samples(options.calib, data_inputs, "--calib", labels) if options.calib else None
        evaluation_set = load_samples(options.eval, data_inputs, "--eval", labels) if options.eval else None
        if source.path is not None and (options.constants or options.state):
            # consecutive samples are one stream: each gets the state the fp32 model carries to it
            for samples in (calib, evaluation_set):
                if samples is not None:
                    samples.feeds = complete_feeds(
                        source.path, samples.feeds, inputs, options.constants, options.state
                    )
    calib_feeds: list[Feed] = []
    if source.kind == "tflite":
        evaluation_set = calib if calib is not None else evaluation_set
    else:
        if calib is None:
            raise ConfigError(
                "--calib is required to quantize: a folder of images or an .npz of input tensors"
            )
        if evaluation_set is None:
            calib, evaluation_set = calib.split(HELD_OUT_FRACTION)
        calib_feeds = calib.feeds[: options.max_calibration_samples]
    return RunContext(
        options=options,
        profile=profile,
        formats=formats,
        source=source,
        inputs=inputs,
        labels=labels,
        metric_fn=metric_fn,
        calib_feeds=calib_feeds,
        evaluation_set=evaluation_set if evaluation_set is not None else SampleSet([]),
        work=work,
        stages=stages,
    )


def _check_qat(options: ConvertOptions, kind: str, profile: DeviceProfile) -> None:
    """--qat and --qat-time: a torch SOURCE, a profile that quantizes to int8, a positive budget."""
    if options.qat_time is not None and not options.qat:
        raise ConfigError("--qat-time: sets the budget of --qat; add --qat")
    if not options.qat:
        return
    if kind != "torch":
        raise ConfigError(f"{QAT_NEEDS_TORCH}, not a .{kind} file")
    if options.qat_time is not None and options.qat_time <= 0:
        raise ConfigError(f"--qat-time: expected a positive duration, got {options.qat_time:g} s")
    precision = profile.quantization.precision
    if precision != "int8":
        raise ConfigError(
            f"--qat: profile {profile.name} compresses to {precision}, not int8: nothing to train for"
        )


def _data_inputs(options: ConvertOptions, source: LoadedSource, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """The inputs calibration files hold: all but `--const` and `--state` ones (checked against the model)."""
    if not options.constants and not options.state:
        return inputs
    if source.kind != "onnx":
        raise ConfigError(f"--const/--state need an .onnx SOURCE, not a {source.kind} one")
    return check_fed_inputs(inputs, source.outputs, options.constants, options.state)


def _check_torch_accepts(module: torch.nn.Module, inputs: list[TensorSpec]) -> None:
    """Run the factory's module once on zeros of the given shapes: a wrong `--input-shape` fails here with
    the model's own complaint instead of deep inside an exporter."""
    import torch

    example = [torch.zeros([int(d) for d in spec.shape], dtype=getattr(torch, spec.dtype)) for spec in inputs]
    try:
        with torch.no_grad():
            module(*example)
    except Exception as exc:
        shapes = "; ".join(",".join(str(d) for d in spec.shape) for spec in inputs)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--input-shape {shapes}: the model rejects this input: {reason}") from exc


def _read_labels(path: Path | None) -> list[str] | None:
    """One name per line, stripped, blank lines skipped; or a `.json` list of strings kept exactly (a
    recognizer's charset: its CTC blank '' and ' ' are classes too)."""
    if path is None:
        return None
    if path.suffix == ".json":
        return _read_json_labels(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {path}: cannot read: {exc}") from exc
    labels = [line for line in lines if line]
    if not labels:
        raise ConfigError(f"--labels {path}: file is empty")
    return labels


def _read_json_labels(path: Path) -> list[str]:
    import json

    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--labels {path}: cannot read a JSON list: {exc}") from exc
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ConfigError(f"--labels {path}: expected a non-empty JSON list of strings")
    broken = next((i for i, v in enumerate(labels) if f"<{v}>".splitlines() != [f"<{v}>"]), None)
    if broken is not None:
        raise ConfigError(f"--labels {path}: entry {broken} holds a line break (labels.txt is one per line)")
    return labels


def _output_specs(path: Path, outputs: accuracy.Outputs) -> list[TensorSpec]:
    """Each output's shape as measured on the samples; a dimension that differs between samples (it
    follows a variable-width input) keeps the model's own name for it, else `{output}_{axis}`."""
    sess = accuracy.session(path, 1)
    specs = []
    for position, o in enumerate(sess.get_outputs()):
        value = outputs[0][position]
        declared = [str(d) if isinstance(d, str) else None for d in o.shape]
        names = declared if len(declared) == value.ndim else [None] * value.ndim
        shape: list[int | str] = [
            int(size)
            if all(sample[position].shape[axis] == size for sample in outputs)
            else names[axis] or f"{o.name}_{axis}"
            for axis, size in enumerate(value.shape)
        ]
        specs.append(TensorSpec(name=o.name, shape=shape, dtype=str(value.dtype)))
    return specs


def _guess_task(outputs: list[TensorSpec]) -> str:
    if len(outputs) == 1 and len(outputs[0].shape) == 2 and int(outputs[0].shape[1]) >= 2:
        return "classification"
    return "raw"


def _postprocess(task: str, given: TaskConfig | None = None) -> TaskConfig:
    if given is not None:
        return given
    if task == "classification":
        return ClassificationConfig(type="classification", softmax=True, top_k=5)
    if task == "detection":
        return YoloConfig(type="detection", score_threshold=accuracy.CONFIDENT, iou_threshold=0.5)
    if task == "text-recognition":
        return TextRecognitionConfig(type="text-recognition")
    if task == "voice-activity":
        return VoiceActivityConfig(type="voice-activity")
    return RawConfig(type="raw")


# Float models: [prune -> distill] -> export ONNX -> check fp32 ----------------------------------------------


@dataclass(frozen=True)
class DistillRecipe:
    """What distillation trains with (measured on EfficientNet-Lite0 and the digits CNN, issue 18)."""

    temperature: float = 1.0  # T=1 follows top-1; T=4 spent the student on the 1000-class tail
    strong_augment: bool = True  # wide crops, colour, cutmix: 13 photos must look like many
    raw_share: float = 0.5  # half of each batch un-augmented: the digits lost 3 points without it
    feature_weight: float = 0.0
    held_out_views: int = 2  # augmented views of each held-out sample: a steadier checkpoint choice


DISTILL_RECIPE = DistillRecipe()


@dataclass(frozen=True)
class DistillPlan:
    """How long distillation runs: `steps` at most and, when set, `budget_s` seconds at most."""

    steps: int
    budget_s: float | None
    default: bool  # the budget is DEFAULT_DISTILL_SECONDS because pruning was asked for without one

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def describe(self) -> str:
        if self.budget_s is None:
            return f"{self.steps} steps"
        budget = f"budget {_duration(self.budget_s)}"
        if self.steps < MAX_DISTILL_STEPS:
            budget += f", at most {self.steps} steps"
        return budget + (" (the default with pruning; --distill-time to change)" if self.default else "")


def distill_plan(options: ConvertOptions) -> DistillPlan:
    """`--distill-steps N` and/or `--distill-time T`; when pruning without either, the default budget;
    `--distill-time 0` turns distillation off."""
    budget = options.distill_time
    if budget is not None and budget <= 0:
        return DistillPlan(0, None, False)
    pruning = options.prune > 0 or options.target_speedup is not None
    if budget is None and options.distill_steps == 0 and pruning:
        return DistillPlan(MAX_DISTILL_STEPS, DEFAULT_DISTILL_SECONDS, True)
    if budget is not None:
        return DistillPlan(options.distill_steps or MAX_DISTILL_STEPS, budget, False)
    return DistillPlan(options.distill_steps, None, False)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def _float_models(run: RunContext) -> FloatModels:
    if run.source.kind != "torch":
        assert run.source.path is not None
        return FloatModels(run.source.path, run.source.path)
    teacher = run.source.module
    student, pruning = teacher, None
    plan = distill_plan(run.options)
    if run.options.target_speedup is not None:
        from converters.prune_search import search_pruning

        student, pruning = search_pruning(run, teacher, plan)
    else:
        if run.options.prune > 0:
            student, pruning = _prune(run, teacher)
        if plan.enabled:
            student = _distill(run, student, teacher, pruning, plan)
    if not run.options.qat:
        return dataclasses.replace(_export_onnx(run, teacher, student), pruning=pruning)
    tuned, qat = _qat(run, student, teacher)
    return dataclasses.replace(_export_onnx(run, teacher, student, tuned), pruning=pruning, qat=qat)


def _prune(
    run: RunContext,
    teacher: torch.nn.Module,
    ratio: float | None = None,
    group_ratios: dict[str, float] | None = None,
    saliency: Saliency | None = None,
) -> tuple[torch.nn.Module, Json]:
    """`teacher` pruned at `ratio` (default --prune), or per channel group (`prune_model(group_ratios=)`);
    `saliency`: measured once on the teacher (`_saliency`) by a search that prunes it many ways."""
    import torch

    options, feeds, channel_multiple = run.options, run.calib_feeds, run.profile.pruning.channel_multiple
    ratio = options.prune if ratio is None else ratio
    asked = "per group" if group_ratios else f"{ratio}"
    with run.stages.stage(f"prune {options.prune_mode} {asked}") as note:
        try:
            from converters.prune import prune_model
        except ImportError as exc:
            raise ConfigError(f"--prune: pruning is not available in this install ({exc})") from exc
        example = tuple(torch.from_numpy(feeds[0][s.name]) for s in run.inputs)
        result = prune_model(
            copy.deepcopy(teacher),
            example,
            ratio,
            options.prune_mode,
            round_to=channel_multiple,
            calibration=None if saliency is not None else _calibration_batches(run),
            group_ratios=group_ratios,
            saliency=saliency,
        )
        note(f"MACs x{result.macs_after / max(result.macs_before, 1):.2f}")
        info: Json = {
            "mode": result.mode,
            "ratio": result.ratio,
            "macs_before": int(result.macs_before),
            "macs_after": int(result.macs_after),
            "params_before": int(result.params_before),
            "params_after": int(result.params_after),
            "distillation": {"steps": 0},
        }
        if result.mode == "structured":
            info["channel_multiple"] = channel_multiple  # from the device profile
        else:
            # Unstructured zeros shrink the compressed file but run no faster: record what they really did.
            info["sparsity"] = round(result.sparsity, 4)
            info["gzip_ratio"] = round(result.gzip_ratio, 4)
        info["notes"] = list(result.notes)
        return result.model.eval(), info


def _calibration_batches(run: RunContext) -> list[tuple[torch.Tensor, ...]]:
    """The calibration feeds in batches of 16, one tensor per input: what pruning measures saliency on."""
    import torch

    feeds = run.calib_feeds
    return [
        tuple(torch.from_numpy(np.concatenate([f[s.name] for f in feeds[i : i + 16]])) for s in run.inputs)
        for i in range(0, len(feeds), 16)
    ]


def _saliency(run: RunContext, teacher: torch.nn.Module) -> Saliency:
    from converters.prune import measure_saliency

    return measure_saliency(teacher, _calibration_batches(run))


def _training_samples(feeds: list[Feed]) -> list[np.ndarray | tuple[np.ndarray, ...]]:
    """The calibration feeds as distillation and QAT take them: an array per sample, a tuple in input
    order for a model with several inputs."""
    names = list(feeds[0])
    return [feed[names[0]] if len(names) == 1 else tuple(feed[n] for n in names) for feed in feeds]


def _distill(
    run: RunContext,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    pruning: Json | None,
    plan: DistillPlan,
) -> torch.nn.Module:
    """Train `student` towards `teacher` on the calibration feeds; records what it did in `pruning`."""
    options, feeds = run.options, run.calib_feeds
    with run.stages.stage(f"distill ({plan.describe()})") as note:
        try:
            from converters.distill import distill
        except ImportError as exc:
            raise ConfigError(
                f"--distill-steps: distillation is not available in this install ({exc})"
            ) from exc
        if student is teacher:
            student = copy.deepcopy(teacher)

        def on_step(step: int, loss: float) -> None:
            note(f"step {step + 1} loss {loss:.4f}")

        samples = _training_samples(feeds)
        unstructured = pruning is not None and pruning.get("mode") == "unstructured"
        result = distill(
            student,
            teacher,
            samples,
            plan.steps,
            lr=options.distill_lr,
            on_step=on_step,
            keep_zeros=unstructured,
            temperature=DISTILL_RECIPE.temperature,
            strong_augment=DISTILL_RECIPE.strong_augment,
            raw_share=DISTILL_RECIPE.raw_share,
            feature_weight=DISTILL_RECIPE.feature_weight,
            held_out_views=DISTILL_RECIPE.held_out_views,
            budget_s=plan.budget_s,
            patience=DISTILL_PATIENCE if plan.budget_s is not None else None,
        )
        if pruning is not None:
            pruning["distillation"] = {
                "steps": result.steps,
                "max_steps": plan.steps,
                "budget_s": plan.budget_s,
                "default_budget": plan.default,
                "stopped": result.stopped,
                "lr": options.distill_lr,
                "samples": len(feeds),
                "seconds": round(float(result.seconds), 1),
                "loss_first": float(result.losses[0]) if result.losses else None,
                "loss_last": float(result.losses[-1]) if result.losses else None,
                # the checkpoint kept: the one best on calibration samples it never trained on
                "best_step": result.best_step,
                "held_out_loss": {str(step): round(loss, 6) for step, loss in result.held_out},
                "feature_layers": len(result.feature_layers),
                "recipe": dataclasses.asdict(DISTILL_RECIPE),
            }
            if unstructured:
                # The distiller holds pruned weights at zero; measured, not assumed.
                from converters.prune import weight_sparsity

                pruning["sparsity_after_distillation"] = round(weight_sparsity(result.model), 4)
        return result.model.eval()


@dataclass(frozen=True)
class QatRecipe:
    """What quantization-aware fine-tuning trains with; the loss and augmentation are distillation's."""

    lr: float = 1e-4  # Adam; the model is trained already, QAT only nudges it onto the int8 grid
    batch_size: int = 16
    observe_share: float = 0.1  # of the steps (or budget) during which activation ranges move
    max_steps: int = MAX_DISTILL_STEPS  # the cap when only the time budget is set


QAT_RECIPE = QatRecipe()


def _qat(run: RunContext, student: torch.nn.Module, teacher: torch.nn.Module) -> tuple[torch.nn.Module, Json]:
    """Fine-tune the model to compress (pruned/distilled or the source itself) under the profile's int8
    rounding towards the unchanged float teacher; the record goes into `metrics.qat`."""
    from converters.qat import quantization_aware_finetune

    options, feeds, scheme = run.options, run.calib_feeds, run.profile.quantization
    budget = options.qat_time if options.qat_time is not None else DEFAULT_QAT_SECONDS
    with run.stages.stage(f"quantization-aware fine-tuning (budget {_duration(budget)})") as note:
        if student is teacher:
            student = copy.deepcopy(teacher)

        def on_step(step: int, loss: float) -> None:
            note(f"step {step} loss {loss:.4f}")

        samples = _training_samples(feeds)
        result = quantization_aware_finetune(
            student,
            teacher,
            samples,
            scheme,
            QAT_RECIPE.max_steps,
            budget_s=budget,
            lr=QAT_RECIPE.lr,
            batch_size=QAT_RECIPE.batch_size,
            temperature=DISTILL_RECIPE.temperature,
            strong_augment=DISTILL_RECIPE.strong_augment,
            raw_share=DISTILL_RECIPE.raw_share,
            held_out_views=DISTILL_RECIPE.held_out_views,
            patience=DISTILL_PATIENCE,
            observe_share=QAT_RECIPE.observe_share,
            on_step=on_step,
        )
        before, after = result.held_out_before, result.held_out_after
        if before is not None and after is not None:
            note(f"{result.steps} steps, held-out int8 loss {before:.4f} -> {after:.4f}")
        record: Json = {
            "steps": result.steps,
            "budget_s": budget,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 1),
            "samples": len(feeds),
            # the fake-quantized model's loss on calibration samples it never trained on
            "held_out_loss_before": None if before is None else round(before, 6),
            "held_out_loss_after": None if after is None else round(after, 6),
            "best_step": result.best_step,
            "held_out_loss": {str(step): round(loss, 6) for step, loss in result.held_out},
            "layers": result.layers,
            "observed_steps": result.observed_steps,
            "scheme": {
                "activations": scheme.activations,
                "weights": scheme.weights,
                "per_channel": scheme.per_channel,
                "reduce_range": scheme.reduce_range,
            },
            "recipe": dataclasses.asdict(QAT_RECIPE),
        }
        return student.eval(), record


def _export_onnx(
    run: RunContext,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tuned: torch.nn.Module | None = None,
) -> FloatModels:
    """The teacher as the reference; the student beside it when pruning or distillation changed it; the
    quantization-aware fine-tuned model (`tuned`), exported the same way, for the int8 recipes."""
    reference_path = run.work / "reference.fp32.onnx"
    fp32_path = run.work / "model.fp32.onnx"
    with run.stages.stage("export onnx") as note:
        from converters.export import export_onnx

        names = [s.name for s in run.inputs]
        exported = export_onnx(teacher, run.calib_feeds, names, reference_path)
        info: Json = {
            "exporter": exported.exporter,
            "opset": exported.opset,
            "max_abs_diff_vs_torch": float(f"{exported.max_abs_diff:.3g}"),
            "tolerance": exported.tolerance,
            "dynamic_batch": exported.dynamic_batch,
        }
        batch = "batch N" if exported.dynamic_batch else "batch 1 (the graph fixes it)"
        note(
            f"{exported.exporter} opset {exported.opset}, {batch}, max |ort-torch| {exported.max_abs_diff:.2g}"
        )
        if student is not teacher:
            student_export = export_onnx(student, run.calib_feeds, names, fp32_path, exported.output_names)
            info["dynamic_batch"] = exported.dynamic_batch and student_export.dynamic_batch
        else:
            fp32_path = reference_path
        qat_path = None
        if tuned is not None:
            qat_path = run.work / "model.qat.fp32.onnx"
            tuned_export = export_onnx(tuned, run.calib_feeds, names, qat_path, exported.output_names)
            info["dynamic_batch"] = info["dynamic_batch"] and tuned_export.dynamic_batch
    return FloatModels(
        reference_path,
        fp32_path,
        torch_model=tuned if tuned is not None else student,
        export=info,
        qat_path=qat_path,
    )


def _check_fp32(run: RunContext, floats: FloatModels) -> Baseline:
    feeds = run.evaluation_set.feeds
    with run.stages.stage("check fp32"):
        reference_outputs = accuracy.run_onnx(floats.reference_path, feeds)
        outputs = _output_specs(floats.reference_path, reference_outputs)
        task = run.options.task or _guess_task(outputs)
        postprocess = _postprocess(task, run.options.postprocess)
        context = DecoderContext.from_specs(run.inputs, outputs, run.labels)
        decoder, detection_gate = (
            postprocess.decoder(context),
            accuracy.DetectionGate.of(postprocess, context),
        )
        fp32_outputs = accuracy.run_onnx(floats.fp32_path, feeds) if floats.changed else reference_outputs
        fp32_eval = accuracy.evaluate(
            task,
            reference_outputs,
            fp32_outputs,
            run.evaluation_set.labels,
            run.metric_fn,
            decoder=decoder,
            detection_gate=detection_gate,
        )
        baseline = Baseline(reference_outputs, outputs, task, postprocess, decoder, detection_gate, fp32_eval)
        if floats.qat_path is not None and floats.qat is not None:
            # not gated (its int8 version is), but said: how far QAT moved the float function
            tuned = run.score(baseline, accuracy.run_onnx(floats.qat_path, feeds))
            floats.qat["float_model"] = {
                "metric": tuned.metric,
                "drop_points": round(tuned.drop_points, 3),
                **_finite(tuned.details),
            }
    return baseline


# Compressed models: the profile's precision behind the gate, [TFLite] -------------------------------------


def _compress_and_gate(run: RunContext, baseline: Baseline, floats: FloatModels) -> Shipped:
    """The float model at the profile's precision, scored against the reference."""
    fp32_path = floats.fp32_path
    precision = run.profile.quantization.precision
    fp32_eval = baseline.fp32_eval
    if not run.passes(fp32_eval):
        raise accuracy.GateError(_float_model_failure(run, floats, baseline))
    if precision == "fp32":
        # The float model is shipped as it is; its gate is the float model against the reference.
        return Shipped("fp32", None, fp32_eval)
    if precision == "fp16":
        return _fp16_and_gate(run, baseline, fp32_path)
    return _quantize_and_gate(run, baseline, floats)


def _float_model_failure(run: RunContext, floats: FloatModels, baseline: Baseline) -> str:
    """Why the float model, before any compression, is already over `--max-drop`: the message names
    what changed it (pruning, distillation) or, when nothing did, why the measure cannot score the
    reference against itself."""
    options, evaluation = run.options, baseline.fp32_eval
    pruning = floats.pruning or {}
    after, before = pruning.get("params_after"), pruning.get("params_before")
    shrunk = isinstance(after, int) and isinstance(before, int) and after < before
    removed = pruning.get("mode") == "unstructured" or shrunk
    head = f"accuracy gate: the {'pruned ' if removed else ''}float model {run.limits.miss(evaluation)} "
    head += "before any compression; "
    if removed:
        cost = f"{pruning['mode']} pruning at {pruning['ratio']} costs it: prune less"
        plan = distill_plan(options)
        if plan.enabled:
            return head + f"{cost} or distill longer than {plan.describe()} (--distill-time)"
        return head + f"{cost} or distill the pruned model (--distill-time, --distill-steps)"
    if floats.changed:  # distilled, with nothing pruned
        nothing = "pruning removed nothing" if pruning else "nothing was pruned"
        return head + (
            f"{nothing}: distillation ({distill_plan(options).describe()}, --distill-lr {options.distill_lr}) "
            "moved the float model away from the reference; distill fewer steps or at a lower --distill-lr"
        )
    head += "nothing was pruned or distilled: the float model is the reference itself, "
    if options.metric:
        score = evaluation.details.get("user_metric")
        return head + f"and --metric {options.metric} scores identical outputs {score:g}, not 1.0"
    if baseline.task == "detection":
        empty, total = accuracy.boxes_without_area(baseline.outputs, baseline.decoder)
        if empty:
            return head + (
                f"but {empty} of its decoded boxes have no area ({total} in all), so not even the "
                "reference matches itself: the model's outputs are not what the detection decoder reads "
                "(YOLO rows of cx, cy, w, h and class scores, in input pixels)"
            )
    return head + f"yet {evaluation.metric} cannot match the reference with itself on these outputs"


def _agreements(evaluation: accuracy.Evaluation) -> str:
    details = evaluation.details
    overall, confident = details.get("agreement_top1"), details.get("agreement_top1_confident")
    return f"agreement {overall if overall is not None else float('nan'):.3f}, confident {confident if confident is not None else float('nan'):.3f}"


def _fp16_and_gate(run: RunContext, baseline: Baseline, fp32_path: Path) -> Shipped:
    """Half-precision weights and compute for GPU profiles, float32 I/O (what the runtime feeds), held to
    the same gate as int8: measured here with ONNX Runtime on the evaluation samples."""
    from converters.quantize import convert_fp16

    path = run.work / "model.fp16.onnx"
    with run.stages.stage("convert fp16") as note:
        convert_fp16(fp32_path, path)
        evaluation = run.score(baseline, accuracy.run_onnx(path, run.evaluation_set.feeds))
        note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points")
    if not run.passes(evaluation):
        raise accuracy.GateError(
            f"accuracy gate: fp16 {run.limits.miss(evaluation)}; the profile asks for fp16: allow a larger "
            "--max-drop, or use a profile whose precision is fp32"
        )
    return Shipped("fp16", path, evaluation)


def _quantize_and_gate(run: RunContext, baseline: Baseline, floats: FloatModels) -> Shipped:
    """The recipe search (converters.recipes): the first recipe, in order of expected speed, that passes
    the gate ships; every recipe tried goes into `metrics.recipes`. The int8 recipes quantize the QAT'd
    model when --qat ran; the fp16 one always converts the float model (QAT's weights are for int8)."""
    from converters import recipes
    from converters.quantize import prepare_for_quantization

    options, scheme, feeds = run.options, run.profile.quantization, run.calib_feeds

    def score(path: Path) -> accuracy.Evaluation:
        return run.score(baseline, accuracy.run_onnx(path, run.evaluation_set.feeds))

    with run.stages.stage(f"quantize int8 (recipe search, {len(feeds)} samples)") as note:
        prepared = prepare_for_quantization(floats.to_quantize, run.work)
        trials = recipes.search(
            prepared,
            floats.fp32_path,
            feeds,
            run.evaluation_set.feeds,
            scheme,
            score,
            run.limits,
            run.work,
            first_method=options.calibration_method,
            note=note,
        )
        chosen = trials[-1]
        if not chosen.passed or chosen.path is None or chosen.evaluation is None:
            floors = run.limits.has_floors
            tried = "; ".join(
                (
                    f"{t.name} {t.evaluation.drop_points:.2f}"
                    + (f" ({_agreements(t.evaluation)})" if floors else "")
                )
                if t.evaluation
                else f"{t.name}: {t.error}"
                for t in trials
            )
            raise accuracy.GateError(
                f"accuracy gate: no recipe is within {run.limits} of fp32 ({baseline.fp32_eval.metric}): "
                f"{tried}{_qat_hint(run, floats)}"
            )
        note(f"{chosen.name}: {chosen.evaluation.metric} drop {chosen.evaluation.drop_points:.2f} points")
    if chosen.recipe.fp16:
        return Shipped("fp16", chosen.path, chosen.evaluation, recipes=trials)
    quantization = Quantization.model_validate(
        {
            "scheme": scheme.scheme,
            "activations": scheme.activations,
            "weights": scheme.weights,
            "per_channel": chosen.recipe.per_channel,
            "reduce_range": scheme.reduce_range,
            "bias_correction": True,  # quantize_model's default, used by every recipe
            "calibration": {"method": chosen.recipe.method, "samples": chosen.samples},
            "excluded_nodes": chosen.excluded,
            "recipe": chosen.name,
            "quantized_op_types": list(chosen.recipe.op_types) if chosen.recipe.op_types else "all",
            "opset": {"source": prepared.opset_before, "quantized": prepared.opset_after},
            "folded_constants": prepared.folded_constants,
        }
    )
    return Shipped(
        "int8", chosen.path, chosen.evaluation, quantization, chosen.sensitivity, chosen.excluded, trials
    )


def _qat_hint(run: RunContext, floats: FloatModels) -> str:
    """What a failed int8 gate can still try: QAT for a torch SOURCE, or a longer one."""
    if run.source.kind != "torch":
        return ""
    if floats.qat is None:
        return "; a torch SOURCE can be fine-tuned for int8 first: add --qat"
    budget = floats.qat.get("budget_s")
    spent = f" in its {_duration(budget)} budget" if isinstance(budget, (int, float)) else ""
    return f"; --qat ran {floats.qat.get('steps')} steps{spent}: a longer --qat-time may help"


def _export_tflite(run: RunContext, baseline: Baseline, model: torch.nn.Module | None) -> TfliteResult | None:
    """The .tflite at the profile's precision (int8, fp16 or fp32) beside the ONNX artifacts, held to the
    same accuracy gate against the reference."""
    if run.source.kind != "torch" or model is None:
        log.warning("--formats tflite: only torch factory sources can be exported to TFLite; skipped")
        return None
    import torch

    precision = run.profile.quantization.precision
    with run.stages.stage(f"export tflite {precision}") as note:
        try:
            from converters.tflite import TfliteRunner, export_tflite, to_channel_last
        except ImportError as exc:
            raise ConfigError(
                f"--formats tflite: TFLite export is not available in this install ({exc})"
            ) from exc
        if len(run.inputs) != 1:
            raise ConfigError(f"--formats tflite: {precision} TFLite export supports single-input models")
        name = run.inputs[0].name
        feeds = run.calib_feeds
        example = (torch.from_numpy(feeds[0][name]),)
        exported = export_tflite(
            model, example, run.work / f"model.{precision}.tflite", precision, [f[name] for f in feeds]
        )
        runner = TfliteRunner(exported.path, threads=2)
        outputs = []
        times = []
        for feed in run.evaluation_set.feeds:
            start = time.perf_counter()
            outputs.append([np.asarray(o) for o in runner([to_channel_last(feed[name])])])
            times.append((time.perf_counter() - start) * 1000)
        evaluation = run.score(baseline, outputs)
        note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points")
        if not run.passes(evaluation):
            raise accuracy.GateError(
                f"accuracy gate: the {precision} TFLite {run.limits.miss(evaluation)}; "
                "ship ONNX only with --formats onnx"
            )
        metrics: Json = {
            **_finite(evaluation.details),
            "drop_points": round(evaluation.drop_points, 3),
            "latency_ms_p50": round(float(np.median(times)), 3),
            "size_bytes": Path(exported.path).stat().st_size,
            **({"bias_corrected": exported.bias_corrected} if precision == "int8" else {}),
        }
        # The .tflite takes NHWC (int8) where the package input is NCHW float: its own specs say so, and keep
        # the colour order, resize mode and normalization the pre-processing needs.
        keep = ("color", "resize", "mean", "std")
        tflite_inputs = [
            spec.model_copy(update={k: getattr(package_input, k) for k in keep if getattr(spec, k) is None})
            for spec, package_input in zip(exported.inputs, run.inputs, strict=False)
        ]
        artifact = ArtifactFile(
            Path(exported.path),
            f"model.{precision}.tflite",
            "tflite",
            precision,
            None,
            tflite_inputs,
            exported.outputs,
        )
        return TfliteResult(artifact, metrics, outputs)


# Measure, report, package ---------------------------------------------------------------------------------


def _measure(
    run: RunContext, floats: FloatModels, shipped: Shipped, tflite: TfliteResult | None
) -> Measurements:
    with run.stages.stage("measure") as note:
        shipped_path = shipped.path or floats.fp32_path
        paths = {"fp32": floats.reference_path}
        if shipped.path is not None:
            paths[shipped.precision] = shipped.path
        if floats.changed:
            paths["pruned_fp32"] = floats.fp32_path
        # every recipe the search built, timed in the same interleaved run (`metrics.recipes`)
        tried = {f"recipe:{t.name}": t.path for t in shipped.recipes if t.path is not None}
        latency = measure_latency_ms({**paths, **tried}, run.evaluation_set.feeds[0])
        for trial in shipped.recipes:
            if trial.path is not None:
                trial.latency_ms = latency.pop(f"recipe:{trial.name}")["p50"]
        sizes = {key: path.stat().st_size for key, path in paths.items()}
        if shipped.path is not None:
            ratio = latency[shipped.precision]["p50"] / latency["fp32"]["p50"]
            note(f"{shipped.precision}/fp32 latency {ratio:.2f}x")
        golden_feeds = _golden_feeds(run.evaluation_set.feeds)
        golden_outputs = accuracy.run_onnx(shipped_path, golden_feeds)
        others = [accuracy.run_onnx(floats.fp32_path, golden_feeds)] if shipped.path is not None else []
        if tflite is not None:  # the .tflite is checked against the same golden outputs at load
            others.append(tflite.outputs[:GOLDEN_SAMPLES])
        tolerance = golden_tolerance(golden_outputs, others)
    return Measurements(latency, sizes, GoldenSet(golden_feeds, golden_outputs, tolerance))


def _golden_feeds(feeds: list[Feed]) -> list[Feed]:
    """Up to GOLDEN_SAMPLES evaluation samples of the first one's shapes: the golden file stacks them, so
    samples of a variable width cannot all go in."""
    first = {name: value.shape for name, value in feeds[0].items()} if feeds else {}
    same = [feed for feed in feeds if {name: value.shape for name, value in feed.items()} == first]
    return same[:GOLDEN_SAMPLES]


def _finite(details: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a measure without data (no confident samples) is null."""
    return {
        k: (
            None
            if isinstance(v, float) and not np.isfinite(v)
            else round(v, 4)
            if isinstance(v, float)
            else v
        )
        for k, v in details.items()
    }


def _metrics(
    run: RunContext,
    floats: FloatModels,
    baseline: Baseline,
    shipped: Shipped,
    tflite: TfliteResult | None,
    measured: Measurements,
) -> Json:
    """The manifest's `metrics`: accuracy of the float and the shipped model, latency, size, the gate and
    the stage times; keyed by the precision measured (`int8`, `fp16`; an fp32 profile has only `fp32`)."""
    latency, sizes, precision = measured.latency, measured.sizes, shipped.precision
    rounded = _finite(shipped.evaluation.details)
    metrics: Json = {"fp32": _finite(baseline.fp32_eval.details)}
    if shipped.path is not None:
        metrics[precision] = rounded
    metrics.update(eval_samples=len(run.evaluation_set), latency_ms=latency, size_bytes=sizes)
    if shipped.path is not None:
        metrics[f"latency_ratio_{precision}_fp32"] = round(
            latency[precision]["p50"] / latency["fp32"]["p50"], 3
        )
        metrics[f"size_ratio_{precision}_fp32"] = round(sizes[precision] / sizes["fp32"], 3)
    if baseline.task == "classification":
        metrics["agreement_top1"] = rounded.get("agreement_top1", 0.0)
    if floats.export is not None:
        metrics["export"] = floats.export
    if floats.qat is not None:
        metrics["qat"] = floats.qat
    if tflite is not None:
        metrics[f"tflite_{tflite.artifact.precision}"] = tflite.metrics
    if shipped.recipes:
        metrics["recipe"] = shipped.recipes[-1].name
        metrics["recipes"] = [trial.to_dict() for trial in shipped.recipes]
    metrics["stage_seconds"] = {record.name: round(record.seconds, 2) for record in run.stages.records}
    metrics["gate"] = {
        "precision": precision,
        "metric": shipped.evaluation.metric,
        "drop_points": round(shipped.evaluation.drop_points, 3),
        **run.limits.to_json(),
        "passed": run.passes(shipped.evaluation),
    }
    return metrics


def _report(
    run: RunContext,
    floats: FloatModels,
    baseline: Baseline,
    shipped: Shipped,
    measured: Measurements,
    metrics: Json,
) -> Path:
    """report.md with its plots, in the work directory; the package copies it."""
    with run.stages.stage("report"):
        from converters.report import write_report

        report_dir = run.work / "report"
        write_report(
            report_dir,
            run.source.name,
            run.stages.records,
            measured.latency,
            measured.sizes,
            shipped.precision,
            shipped.evaluation,
            baseline.fp32_eval,
            shipped.sensitivity,
            shipped.excluded,
            metrics,
            floats.pruning,
        )
        return report_dir


def _artifacts(floats: FloatModels, shipped: Shipped, tflite: TfliteResult | None) -> list[ArtifactFile]:
    """The shipped model first: a runtime whose profile precision has no artifact takes the first one."""
    artifacts = [ArtifactFile(floats.fp32_path, "model.fp32.onnx", "onnx", "fp32")]
    if shipped.path is not None:
        name = f"model.{shipped.precision}.onnx"
        artifacts.insert(0, ArtifactFile(shipped.path, name, "onnx", shipped.precision, shipped.quantization))
    if tflite is not None:
        artifacts.append(tflite.artifact)
    return artifacts


def _package(run: RunContext, spec: PackageSpec) -> Manifest:
    with run.stages.stage("package"):
        return write_package(
            run.options.out,
            spec,
            sign_key=run.options.sign_key,
            sequence=run.options.sequence,
            force=run.options.force,
            profile=run.profile,
        )


def _package_tflite(run: RunContext) -> ConvertResult:
    """A .tflite is shipped as it is: check it loads and runs, record golden outputs, no gate to pass."""
    from ai_edge_litert.interpreter import Interpreter

    source, inputs = run.source, run.inputs
    assert source.path is not None
    with run.stages.stage("check tflite") as note:
        interpreter = Interpreter(model_path=str(source.path), num_threads=2)
        interpreter.allocate_tensors()
        in_details, out_details = interpreter.get_input_details(), interpreter.get_output_details()
        if run.evaluation_set.feeds:
            feeds = run.evaluation_set.feeds[:GOLDEN_SAMPLES]
        else:
            rng = np.random.default_rng(0)
            feeds = [
                {
                    s.name: (rng.standard_normal([int(d) for d in s.shape]) * 50).astype(s.dtype)
                    if np.dtype(s.dtype).kind == "f"
                    else rng.integers(0, 255, [int(d) for d in s.shape]).astype(s.dtype)
                    for s in inputs
                }
                for _ in range(2)
            ]
        outputs: list[list[np.ndarray]] = []
        times = []
        for feed in feeds:
            for detail, tensor_spec in zip(in_details, inputs, strict=True):
                tensor = feed[tensor_spec.name]
                if tensor.dtype != np.dtype(detail["dtype"]):
                    raise EdgeError(
                        f"{source.path}: input '{tensor_spec.name}' is {np.dtype(detail['dtype'])}, samples are {tensor.dtype}"
                    )
                interpreter.set_tensor(detail["index"], tensor)
            start = time.perf_counter()
            interpreter.invoke()
            times.append((time.perf_counter() - start) * 1000)
            outputs.append([np.array(interpreter.get_tensor(d["index"])) for d in out_details])
        note(f"{len(feeds)} golden samples")
    out_specs = [
        s.model_copy(update={"shape": list(o.shape)}) for s, o in zip(source.outputs, outputs[0], strict=True)
    ]
    task = run.options.task or _guess_task(out_specs)
    quantized_io = any(np.dtype(s.dtype).kind in "iu" for s in source.outputs + source.inputs)
    precision: Literal["int8", "fp32"] = "int8" if quantized_io else "fp32"
    tolerance = {
        "atol": 1e-3 * max(1.0, max(float(np.max(np.abs(o))) for o in outputs[0])),
        "cosine": 0.99,
    }
    spec = PackageSpec(
        name=source.name,
        task=task,
        inputs=inputs,
        outputs=out_specs,
        artifacts=[ArtifactFile(source.path, source.path.name, "tflite", precision)],
        golden=GoldenSet(feeds, outputs, tolerance),
        postprocess=_postprocess(task, run.options.postprocess),
        labels=run.labels,
        metrics={
            "latency_ms": {precision: {"p50": round(float(np.median(times)), 3)}},
            "size_bytes": {precision: source.path.stat().st_size},
            "gate": {"metric": "none", "passed": True, "note": "a .tflite source is packaged as it is"},
        },
        profile=run.profile.name,
    )
    manifest = _package(run, spec)
    return ConvertResult(
        run.options.out, manifest, True, accuracy.Evaluation("none", 0.0), run.stages.records
    )
