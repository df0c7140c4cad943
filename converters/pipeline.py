"""The `edge-convert` stages, in order, each shown with a rich progress line and timed for the report:

load -> [prune -> distill] -> export ONNX -> quantize int8 -> accuracy gate (+ exclusion search) ->
[TFLite] -> measure -> package -> [report].
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters import accuracy
from converters.calibration import SampleSet, load_samples, resolve_input_specs
from converters.packaging import (
    GOLDEN_SAMPLES,
    ArtifactFile,
    PackageSpec,
    golden_tolerance,
    measure_latency_ms,
    write_package,
)
from converters.sources import LoadedSource, load_source, resolve_callable
from edge.errors import ConfigError, EdgeError
from edge.package import Manifest, TensorSpec
from edge.profiles import DeviceProfile, resolve_profile
from edge.tasks.base import Decoder, DecoderContext, TaskConfig
from edge.tasks.classification import ClassificationConfig
from edge.tasks.detection import YoloConfig
from edge.tasks.raw import RawConfig

log = logging.getLogger(__name__)
SENSITIVITY_SAMPLES = 8
HELD_OUT_FRACTION = 0.25


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
    prune: float = 0.0
    prune_mode: Literal["structured", "unstructured"] = "structured"
    distill_steps: int = 0
    distill_lr: float = 1e-4
    formats: list[str] | None = None
    max_drop: float = 1.0
    metric: str | None = None
    sign_key: Path | None = None
    sequence: int | None = None
    report: bool = False
    weights: Path | None = None
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    max_calibration_samples: int = 128
    quiet: bool = False


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
    def stage(self, name: str) -> Iterator[Any]:
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


def convert(options: ConvertOptions) -> ConvertResult:
    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp, Stages(options.quiet) as stages:
        return _convert(options, Path(tmp), stages)


def _convert(options: ConvertOptions, work: Path, stages: Stages) -> ConvertResult:
    if not 0 <= options.prune < 1:
        raise ConfigError(f"--prune {options.prune}: must be in [0, 1)")
    with stages.stage("load"):
        profile = resolve_profile(options.profile).profile
        formats = options.formats or list(profile.quantization.formats)
        unknown = sorted(set(formats) - {"onnx", "tflite"})
        if unknown:
            raise ConfigError(f"--formats: unknown format(s) {unknown}; use onnx, tflite")
        metric_fn = resolve_callable(options.metric, "--metric") if options.metric else None
        labels = _read_labels(options.labels)
        source = load_source(options.source, options.weights)
        if source.kind != "torch" and (options.prune > 0 or options.distill_steps > 0):
            raise ConfigError(
                f"--prune/--distill-steps need a torch factory SOURCE, not a .{source.kind} file"
            )
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
        calib = load_samples(options.calib, inputs, "--calib", labels) if options.calib else None
        evaluation_set = load_samples(options.eval, inputs, "--eval", labels) if options.eval else None
    if source.kind == "tflite":
        return _package_tflite(options, source, inputs, calib or evaluation_set, labels, profile, stages)
    if calib is None:
        raise ConfigError("--calib is required to quantize: a folder of images or an .npz of input tensors")
    if evaluation_set is None:
        calib, evaluation_set = calib.split(HELD_OUT_FRACTION)
    calib_feeds = calib.feeds[: options.max_calibration_samples]

    reference_path = work / "reference.fp32.onnx"
    fp32_path = work / "model.fp32.onnx"
    pruning: dict[str, Any] | None = None
    export_info: dict[str, Any] = {}
    tflite_model: Any = None
    if source.kind == "torch":
        teacher = source.module
        student = teacher
        if options.prune > 0:
            student, pruning = _prune(
                options, teacher, calib_feeds, inputs, stages, profile.pruning.channel_multiple
            )
        if options.distill_steps > 0:
            student = _distill(options, student, teacher, calib_feeds, stages, pruning)
        with stages.stage("export onnx") as note:
            from converters.export import export_onnx

            names = [s.name for s in inputs]
            exported = export_onnx(teacher, calib_feeds, names, reference_path)
            export_info = {
                "exporter": exported.exporter,
                "opset": exported.opset,
                "max_abs_diff_vs_torch": float(f"{exported.max_abs_diff:.3g}"),
                "tolerance": exported.tolerance,
            }
            note(f"{exported.exporter} opset {exported.opset}, max |ort-torch| {exported.max_abs_diff:.2g}")
            if student is not teacher:
                export_onnx(student, calib_feeds, names, fp32_path, exported.output_names)
            else:
                fp32_path = reference_path
        tflite_model = student
    else:
        assert source.path is not None
        reference_path = fp32_path = source.path

    with stages.stage("check fp32"):
        reference_outputs = accuracy.run_onnx(reference_path, evaluation_set.feeds)
        outputs = _output_specs(reference_path, reference_outputs[0])
        task = options.task or _guess_task(outputs)
        postprocess = _postprocess(task)
        decoder = postprocess.decoder(DecoderContext.from_specs(inputs, outputs, labels))
        fp32_outputs = (
            reference_outputs
            if fp32_path == reference_path
            else accuracy.run_onnx(fp32_path, evaluation_set.feeds)
        )
        fp32_eval = accuracy.evaluate(
            task, reference_outputs, fp32_outputs, evaluation_set.labels, metric_fn, decoder=decoder
        )

    int8_path, int8_eval, quant_info, sensitivity, excluded = _quantize_and_gate(
        options, profile, fp32_path, fp32_eval, calib_feeds, evaluation_set, reference_outputs, task, work,
        stages, metric_fn, decoder,
    )  # fmt: skip

    artifacts = [ArtifactFile(fp32_path, "model.fp32.onnx", "onnx", "fp32")]
    if int8_path is not None:
        artifacts.insert(0, ArtifactFile(int8_path, "model.int8.onnx", "onnx", "int8", quant_info))
    tflite_metrics: dict[str, Any] = {}
    tflite_outputs: accuracy.Outputs = []
    if "tflite" in formats:
        tflite_artifacts, tflite_metrics, tflite_outputs = _export_tflite(
            options, source, tflite_model, calib_feeds, evaluation_set, reference_outputs, inputs, task, work,
            stages, metric_fn, decoder,
        )  # fmt: skip
        artifacts.extend(tflite_artifacts)

    with stages.stage("measure") as note:
        shipped = int8_path or fp32_path
        paths = {"fp32": reference_path, "int8": shipped}
        if fp32_path != reference_path:
            paths["pruned_fp32"] = fp32_path
        latency = measure_latency_ms(paths, evaluation_set.feeds[0])
        sizes = {"fp32": reference_path.stat().st_size, "int8": shipped.stat().st_size}
        if fp32_path != reference_path:
            sizes["pruned_fp32"] = fp32_path.stat().st_size
        note(f"int8/fp32 latency {latency['int8']['p50'] / latency['fp32']['p50']:.2f}x")
        golden_feeds = evaluation_set.feeds[:GOLDEN_SAMPLES]
        golden_outputs = accuracy.run_onnx(shipped, golden_feeds)
        others = [accuracy.run_onnx(fp32_path, golden_feeds)] if int8_path is not None else []
        if tflite_outputs:  # the .tflite is checked against the same golden outputs at load
            others.append(tflite_outputs[:GOLDEN_SAMPLES])
        tolerance = golden_tolerance(golden_outputs, others)
    metrics = _metrics(task, int8_eval, fp32_eval, latency, sizes, len(evaluation_set))
    if export_info:
        metrics["export"] = export_info
    if tflite_metrics:
        metrics["tflite_int8"] = tflite_metrics
    gate_passed = int8_eval.drop_points <= options.max_drop
    metrics["stage_seconds"] = {record.name: round(record.seconds, 2) for record in stages.records}
    metrics["gate"] = {
        "metric": int8_eval.metric,
        "drop_points": round(int8_eval.drop_points, 3),
        "max_drop": options.max_drop,
        "passed": gate_passed,
    }
    name = source.name
    spec = PackageSpec(
        name=name,
        task=task,
        inputs=inputs,
        outputs=outputs,
        artifacts=artifacts,
        golden_feeds=golden_feeds,
        golden_outputs=golden_outputs,
        tolerance=tolerance,
        postprocess=postprocess,
        labels=labels,
        pruning=pruning,
        metrics=metrics,
        profile=profile.name,
    )
    report_path = None
    if options.report:
        with stages.stage("report"):
            from converters.report import write_report

            report_dir = work / "report"
            write_report(
                report_dir, name, stages.records, latency, sizes, int8_eval, fp32_eval, sensitivity, excluded,
                metrics, pruning,
            )  # fmt: skip
            spec.extra_files["report"] = report_dir
            report_path = options.out / "report" / "report.md"
    with stages.stage("package"):
        sign_key = None
        if options.sign_key is not None:
            from edge.signing import load_private_key

            sign_key = load_private_key(options.sign_key)
        manifest = write_package(options.out, spec, sign_key, options.sequence)
    return ConvertResult(
        options.out, manifest, gate_passed, int8_eval, stages.records, sensitivity, excluded, report_path
    )


def _check_torch_accepts(module: Any, inputs: list[TensorSpec]) -> None:
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
    if path is None:
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {path}: cannot read: {exc}") from exc
    labels = [line for line in lines if line]
    if not labels:
        raise ConfigError(f"--labels {path}: file is empty")
    return labels


def _output_specs(path: Path, sample_outputs: list[np.ndarray]) -> list[TensorSpec]:
    sess = accuracy.session(path, 1)
    return [
        TensorSpec(name=o.name, shape=list(value.shape), dtype=str(value.dtype))
        for o, value in zip(sess.get_outputs(), sample_outputs, strict=True)
    ]


def _guess_task(outputs: list[TensorSpec]) -> str:
    if len(outputs) == 1 and len(outputs[0].shape) == 2 and int(outputs[0].shape[1]) >= 2:
        return "classification"
    return "raw"


def _postprocess(task: str) -> TaskConfig:
    if task == "classification":
        return ClassificationConfig(type="classification", softmax=True, top_k=5)
    if task == "detection":
        return YoloConfig(type="detection", score_threshold=accuracy.CONFIDENT, iou_threshold=0.5)
    return RawConfig(type="raw")


def _prune(
    options: ConvertOptions,
    teacher: Any,
    feeds: list[dict[str, np.ndarray]],
    inputs: list[TensorSpec],
    stages: Stages,
    channel_multiple: int,
) -> tuple[Any, dict[str, Any]]:
    import torch

    with stages.stage(f"prune {options.prune_mode} {options.prune}") as note:
        try:
            from converters.prune import prune_model
        except ImportError as exc:
            raise ConfigError(f"--prune: pruning is not available in this install ({exc})") from exc
        example = tuple(torch.from_numpy(feeds[0][s.name]) for s in inputs)
        calibration = [
            tuple(torch.from_numpy(np.concatenate([f[s.name] for f in feeds[i : i + 16]])) for s in inputs)
            for i in range(0, len(feeds), 16)
        ]
        result = prune_model(
            copy.deepcopy(teacher),
            example,
            options.prune,
            options.prune_mode,
            round_to=channel_multiple,
            calibration=calibration,
        )
        note(f"MACs x{result.macs_after / max(result.macs_before, 1):.2f}")
        info = {
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
        # Unstructured sparsity shrinks the compressed file but runs no faster: record what it really did.
        for extra in ("sparsity", "gzip_ratio", "notes"):
            if hasattr(result, extra):
                value = getattr(result, extra)
                info[extra] = round(value, 4) if isinstance(value, float) else value
        return result.model.eval(), info


def _distill(
    options: ConvertOptions,
    student: Any,
    teacher: Any,
    feeds: list[dict[str, np.ndarray]],
    stages: Stages,
    pruning: dict[str, Any] | None,
) -> Any:
    with stages.stage(f"distill {options.distill_steps} steps") as note:
        try:
            from converters.distill import distill
        except ImportError as exc:
            raise ConfigError(
                f"--distill-steps: distillation is not available in this install ({exc})"
            ) from exc
        if student is teacher:
            student = copy.deepcopy(teacher)

        def on_step(step: int, loss: float, *_: Any) -> None:
            note(f"step {step}/{options.distill_steps} loss {loss:.4f}")

        names = list(feeds[0])
        samples = [feed[names[0]] if len(names) == 1 else tuple(feed[n] for n in names) for feed in feeds]
        unstructured = pruning is not None and pruning.get("mode") == "unstructured"
        result = distill(
            student,
            teacher,
            samples,
            options.distill_steps,
            lr=options.distill_lr,
            on_step=on_step,
            keep_zeros=unstructured,
        )
        if pruning is not None:
            pruning["distillation"] = {
                "steps": options.distill_steps,
                "lr": options.distill_lr,
                "samples": len(feeds),
                "seconds": round(float(result.seconds), 1),
                "loss_first": float(result.losses[0]) if result.losses else None,
                "loss_last": float(result.losses[-1]) if result.losses else None,
            }
            if unstructured:
                # The distiller holds pruned weights at zero; measured, not assumed.
                from converters.prune import weight_sparsity

                pruning["sparsity_after_distillation"] = round(weight_sparsity(result.model), 4)
        return result.model.eval()


def _quantize_and_gate(
    options: ConvertOptions,
    profile: DeviceProfile,
    fp32_path: Path,
    fp32_eval: accuracy.Evaluation,
    calib_feeds: list[dict[str, np.ndarray]],
    evaluation_set: SampleSet,
    reference_outputs: accuracy.Outputs,
    task: str,
    work: Path,
    stages: Stages,
    metric_fn: accuracy.MetricFn | None,
    decoder: Decoder,
) -> tuple[Path | None, accuracy.Evaluation, dict[str, Any] | None, dict[str, float], list[str]]:
    from converters.quantize import prepare_for_quantization, quantize_model

    scheme = profile.quantization
    if fp32_eval.drop_points > options.max_drop:
        raise accuracy.GateError(
            f"accuracy gate: the float model before quantization already drops {fp32_eval.drop_points:.2f} "
            f"points of {fp32_eval.metric} (--max-drop {options.max_drop}); prune less or distill longer"
        )
    if scheme.precision != "int8":
        # fp16/fp32 profiles (GPUs) ship the float model; its gate is the float model against the reference.
        return None, fp32_eval, None, {}, []
    cache = work / "calibration.json"

    def attempt(exclude: list[str], tag: str) -> tuple[Path, accuracy.Evaluation]:
        path = work / f"model.int8.{tag}.onnx"
        quantize_model(prepared, path, calib_feeds, scheme, options.calibration_method, exclude, cache)
        outputs = accuracy.run_onnx(path, evaluation_set.feeds)
        return path, accuracy.evaluate(
            task, reference_outputs, outputs, evaluation_set.labels, metric_fn, decoder=decoder
        )

    with stages.stage(f"quantize int8 ({options.calibration_method}, {len(calib_feeds)} samples)") as note:
        prepared = prepare_for_quantization(fp32_path, work)
        int8_path, evaluation = attempt([], "all")
        note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points")
    sensitivity: dict[str, float] = {}
    excluded: list[str] = []
    if evaluation.drop_points > options.max_drop:
        with stages.stage("sensitivity + exclusion search") as note:
            sensitivity = accuracy.layer_sensitivity(
                prepared.path,
                int8_path,
                evaluation_set.feeds[:SENSITIVITY_SAMPLES],
                prepared.node_names,
                work,
            )
            ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
            units = accuracy.exclusion_units(prepared.path, ranked, prepared.node_names)

            def first(count: int) -> list[str]:
                names: list[str] = []
                for unit in units[:count]:
                    names.extend(n for n in unit if n not in names)
                return names

            limit = max(1, len(ranked) // 2)
            best: tuple[int, Path, accuracy.Evaluation] | None = None
            trial = evaluation
            failed_below = 0
            count = 1
            while best is None and count <= limit:
                note(f"keeping {count} of {len(ranked)} weighted nodes in float")
                path, trial = attempt(first(count), f"x{count}")
                if trial.drop_points <= options.max_drop:
                    best = (count, path, trial)
                else:
                    failed_below = count
                    count = limit if count < limit < count * 2 else count * 2
            if best is None:
                raise accuracy.GateError(
                    f"accuracy gate: int8 drops {evaluation.drop_points:.2f} points of {evaluation.metric} "
                    f"(--max-drop {options.max_drop}); keeping the {limit} most sensitive of {len(ranked)} "
                    f"weighted nodes in float still drops {trial.drop_points:.2f}"
                )
            low, high = failed_below + 1, best[0] - 1
            while low <= high:  # the fewest exclusions that pass, between the last failure and first pass
                middle = (low + high) // 2
                path, trial = attempt(first(middle), f"x{middle}")
                if trial.drop_points <= options.max_drop:
                    best, high = (middle, path, trial), middle - 1
                else:
                    low = middle + 1
            count, int8_path, evaluation = best
            excluded = first(count)
            note(f"kept {len(excluded)} node(s) in float; drop {evaluation.drop_points:.2f} points")
    quant_info = {
        "scheme": scheme.scheme,
        "activations": scheme.activations,
        "weights": scheme.weights,
        "per_channel": scheme.per_channel,
        "reduce_range": scheme.reduce_range,
        "bias_correction": True,  # quantize_model's default, used by every attempt above
        "calibration": {"method": options.calibration_method, "samples": len(calib_feeds)},
        "excluded_nodes": excluded,
        "opset": {"source": prepared.opset_before, "quantized": prepared.opset_after},
        "folded_constants": prepared.folded_constants,
    }
    return int8_path, evaluation, quant_info, sensitivity, excluded


def _export_tflite(
    options: ConvertOptions,
    source: LoadedSource,
    model: Any,
    calib_feeds: list[dict[str, np.ndarray]],
    evaluation_set: SampleSet,
    reference_outputs: accuracy.Outputs,
    inputs: list[TensorSpec],
    task: str,
    work: Path,
    stages: Stages,
    metric_fn: accuracy.MetricFn | None,
    decoder: Decoder,
) -> tuple[list[ArtifactFile], dict[str, Any], accuracy.Outputs]:
    """The int8 .tflite beside the ONNX artifacts, held to the same accuracy gate against fp32; also its
    outputs on the evaluation samples, so the golden tolerance covers it."""
    if source.kind != "torch" or model is None:
        log.warning("--formats tflite: only torch factory sources can be exported to TFLite; skipped")
        return [], {}, []
    import torch

    with stages.stage("export tflite int8") as note:
        try:
            from converters.tflite import TfliteRunner, export_tflite, to_channel_last
        except ImportError as exc:
            raise ConfigError(
                f"--formats tflite: TFLite export is not available in this install ({exc})"
            ) from exc
        if len(inputs) != 1:
            raise ConfigError("--formats tflite: int8 TFLite export supports single-input models")
        name = inputs[0].name
        example = (torch.from_numpy(calib_feeds[0][name]),)
        exported = export_tflite(
            model, example, work / "model.int8.tflite", "int8", [f[name] for f in calib_feeds]
        )
        runner = TfliteRunner(exported.path, threads=2)
        outputs = []
        times = []
        for feed in evaluation_set.feeds:
            start = time.perf_counter()
            outputs.append([np.asarray(o) for o in runner([to_channel_last(feed[name])])])
            times.append((time.perf_counter() - start) * 1000)
        evaluation = accuracy.evaluate(
            task, reference_outputs, outputs, evaluation_set.labels, metric_fn, decoder=decoder
        )
        note(f"{evaluation.metric} drop {evaluation.drop_points:.2f} points")
        if evaluation.drop_points > options.max_drop:
            raise accuracy.GateError(
                f"accuracy gate: the int8 TFLite drops {evaluation.drop_points:.2f} points of {evaluation.metric} "
                f"(--max-drop {options.max_drop}); ship ONNX only with --formats onnx"
            )
        metrics = {
            **_finite(evaluation.details),
            "drop_points": round(evaluation.drop_points, 3),
            "latency_ms_p50": round(float(np.median(times)), 3),
            "size_bytes": Path(exported.path).stat().st_size,
        }
        # The .tflite takes NHWC int8 where the package input is NCHW float: its own specs say so, and keep
        # the colour order, resize mode and normalization the pre-processing needs.
        keep = ("color", "resize", "mean", "std")
        tflite_inputs = [
            spec.model_copy(update={k: getattr(package_input, k) for k in keep if getattr(spec, k) is None})
            for spec, package_input in zip(exported.inputs, inputs, strict=False)
        ]
        artifact = ArtifactFile(
            Path(exported.path), "model.int8.tflite", "tflite", "int8", None, tflite_inputs, exported.outputs
        )
        return [artifact], metrics, outputs


def _finite(details: dict[str, Any]) -> dict[str, Any]:
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
    task: str,
    int8_eval: accuracy.Evaluation,
    fp32_eval: accuracy.Evaluation,
    latency: dict[str, dict[str, float]],
    sizes: dict[str, int],
    samples: int,
) -> dict[str, Any]:
    rounded = _finite(int8_eval.details)
    metrics: dict[str, Any] = {
        "fp32": _finite(fp32_eval.details),
        "int8": rounded,
        "eval_samples": samples,
        "latency_ms": latency,
        "size_bytes": sizes,
        "latency_ratio_int8_fp32": round(latency["int8"]["p50"] / latency["fp32"]["p50"], 3),
        "size_ratio_int8_fp32": round(sizes["int8"] / sizes["fp32"], 3),
    }
    if task == "classification":
        metrics["agreement_top1"] = rounded.get("agreement_top1", 0.0)
    return metrics


def _package_tflite(
    options: ConvertOptions,
    source: LoadedSource,
    inputs: list[TensorSpec],
    samples: SampleSet | None,
    labels: list[str] | None,
    profile: DeviceProfile,
    stages: Stages,
) -> ConvertResult:
    """A .tflite is shipped as it is: check it loads and runs, record golden outputs, no gate to pass."""
    from ai_edge_litert.interpreter import Interpreter

    assert source.path is not None
    with stages.stage("check tflite") as note:
        interpreter = Interpreter(model_path=str(source.path), num_threads=2)
        interpreter.allocate_tensors()
        in_details, out_details = interpreter.get_input_details(), interpreter.get_output_details()
        if samples is not None:
            feeds = samples.feeds[:GOLDEN_SAMPLES]
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
    task = options.task or _guess_task(out_specs)
    precision = (
        "int8" if any(np.dtype(s.dtype).kind in "iu" for s in source.outputs + source.inputs) else "fp32"
    )
    spec = PackageSpec(
        name=source.name,
        task=task,
        inputs=inputs,
        outputs=out_specs,
        artifacts=[ArtifactFile(source.path, source.path.name, "tflite", precision)],
        golden_feeds=feeds,
        golden_outputs=outputs,
        tolerance={
            "atol": 1e-3 * max(1.0, max(float(np.max(np.abs(o))) for o in outputs[0])),
            "cosine": 0.99,
        },
        postprocess=_postprocess(task),
        labels=labels,
        metrics={
            "latency_ms": {precision: {"p50": round(float(np.median(times)), 3)}},
            "size_bytes": {precision: source.path.stat().st_size},
            "gate": {"metric": "none", "passed": True, "note": "a .tflite source is packaged as it is"},
        },
        profile=profile.name,
    )
    with stages.stage("package"):
        sign_key = None
        if options.sign_key is not None:
            from edge.signing import load_private_key

            sign_key = load_private_key(options.sign_key)
        manifest = write_package(options.out, spec, sign_key, options.sequence)
    evaluation = accuracy.Evaluation("none", 0.0)
    return ConvertResult(options.out, manifest, True, evaluation, stages.records)
