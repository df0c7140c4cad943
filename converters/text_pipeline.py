"""`edge-convert HF_FOLDER --task embedding|text-classification --calib texts.txt [--eval texts.txt]`.

load (transformers, offline) -> export ONNX (symbolic batch/sequence) -> int8 recipes scored against
fp32 on the evaluation texts -> measure (interleaved latency at max_length) -> package with the
tokenizer. The shipped recipe is the fastest one that passes the gate; every recipe tried is listed in
the manifest's `metrics.recipes` with its latency, size and scores.

Gate: embeddings — cosine to fp32 per text mean >= 0.99 and min >= 0.97, nearest-neighbour agreement
among the evaluation texts >= 0.95; text-classification — top-1 agreement drop <= `--max-drop` points.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters import accuracy
from converters.huggingface import HuggingFaceSource, TextTask, export_text_onnx, load_folder
from converters.packaging import (
    GOLDEN_SAMPLES,
    ArtifactFile,
    GoldenSet,
    Json,
    PackageSpec,
    golden_tolerance,
    measure_latency_ms,
    write_package,
)
from converters.text_calibration import read_texts, selection_texts, split_texts, text_feeds
from converters.text_onnx import load_onnx_text, onnx_folder_model
from converters.text_quantize import (
    EMBEDDING_GATE,
    RecipeResult,
    TransformerShape,
    embedding_gate,
    run_all,
    score_embeddings,
    score_logits,
    try_recipes,
)
from edge.errors import ConfigError
from edge.package import Quantization, TensorSpec, sha256_file
from edge.processing.text import TextConfig, TextPreprocessor, buckets_for
from edge.profiles import resolve_profile
from edge.tasks.base import TaskConfig
from edge.tasks.embedding import EmbeddingConfig
from edge.tasks.text_classification import TextClassificationConfig

if TYPE_CHECKING:
    from converters.pipeline import ConvertOptions, ConvertResult, Stages

LATENCY_THREADS = 2
TEXT_DISTILL_SECONDS = 300.0  # --prune-layers without --distill-time (the budget this path has always had)


def convert_text(options: ConvertOptions, work: Path, stages: Stages) -> ConvertResult:
    from converters.pipeline import QAT_NEEDS_TORCH, ConvertResult

    if options.prune > 0:
        raise ConfigError(
            "--prune: channel pruning is for vision models; a transformer takes --prune-layers RATIO"
        )
    if options.distill_steps > 0 and options.prune_layers <= 0:
        raise ConfigError("--distill-steps: a transformer is distilled after --prune-layers RATIO")
    if options.qat:
        raise ConfigError(f"{QAT_NEEDS_TORCH}, not a transformer")
    if options.limits.has_floors:
        raise ConfigError(
            "--min-agreement/--min-confident-agreement: a text model's gate is its own (embeddings: cosine "
            "and nearest-neighbour agreement; text-classification: top-1 agreement within --max-drop points)"
        )
    if options.calib is None:
        raise ConfigError(f"{options.source}: a text model needs --calib texts.txt (one text per line)")
    with stages.stage("load") as note:
        profile = resolve_profile(options.profile).profile
        model = _load_text_model(options, work)
        calib_all = read_texts(options.calib, "--calib")
        eval_all = read_texts(options.eval, "--eval") if options.eval is not None else None
        calib_all, evaluation = split_texts(calib_all, eval_all, options.eval or options.calib)
        calib, selection = selection_texts(calib_all)
        calib = calib[: options.max_calibration_samples]
        tokenizer = work / "tokenizer.json"
        if model.tokenizer_json.resolve() != tokenizer.resolve():
            shutil.copyfile(model.tokenizer_json, tokenizer)
        text = TextConfig(
            tokenizer="tokenizer.json",
            sha256=sha256_file(tokenizer),
            bytes=tokenizer.stat().st_size,
            max_length=model.max_length,
            buckets=buckets_for(model.max_length),
        )
        inputs = [
            TensorSpec(name=name, shape=["batch", "sequence"], dtype="int64") for name in model.input_names
        ]
        pre = TextPreprocessor.from_file(tokenizer, text, inputs)
        calib_feeds, eval_feeds = text_feeds(pre, calib), text_feeds(pre, evaluation)
        selection_feeds = text_feeds(pre, selection)
        note(f"{model.task}, {len(calib_all)} calibration / {len(evaluation)} evaluation texts")
    fp32, export_record = _float_model(model, eval_feeds[0], work, stages)
    teacher_fp32, pruning = fp32, None
    if options.prune_layers > 0:
        assert model.huggingface is not None
        fp32, pruning, export_record = _prune_layers(
            options, model, pre, calib_all, eval_feeds[0], work, stages
        )
    scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    if model.task == "embedding":
        scorer, gate = score_embeddings, embedding_gate
    else:
        max_drop = options.max_drop

        def gate(scores: dict[str, float]) -> bool:
            return (1.0 - scores["top1_agreement"]) * 100.0 <= max_drop

        scorer = score_logits
    with stages.stage("quantize int8") as note:
        reference, results = try_recipes(
            fp32,
            work,
            calib_feeds,
            eval_feeds,
            model.shape,
            scorer,
            gate,
            note=note,
            selection=selection_feeds,
        )
    with stages.stage("measure") as note:
        long_feed = pre.encode(" ".join(evaluation), length=model.max_length)
        built = {r.recipe.name: r.path for r in results if r.path is not None}
        timed = {"fp32": teacher_fp32, **({"pruned_fp32": fp32} if pruning else {}), **built}
        latency = measure_latency_ms(timed, long_feed, threads=LATENCY_THREADS, budget_s=20.0)
        for result in results:
            if result.path is not None:
                result.latency_ms = latency[result.recipe.name]["p50"]
        shipped = _choose(results)
        note(
            f"shipping {shipped.recipe.name}"
            if shipped.passed
            else f"no recipe passed; best {shipped.recipe.name}"
        )
        assert shipped.path is not None
        golden_feeds = _golden_feeds(pre, evaluation)
        golden_outputs = accuracy.run_onnx(shipped.path, golden_feeds)
        tolerance = golden_tolerance(golden_outputs, [accuracy.run_onnx(fp32, golden_feeds)])
        pruned_passed = True
        if pruning is not None:
            teacher_outputs = run_all(teacher_fp32, eval_feeds)
            pruned_gate = _pruned_gate(model.task, options.max_drop)
            student_scores = scorer(teacher_outputs, reference)
            shipped_scores = scorer(teacher_outputs, run_all(shipped.path, eval_feeds))
            pruned_passed = pruned_gate(shipped_scores)
            pruning["teacher"] = {
                "thresholds": PRUNED_EMBEDDING_GATE
                if model.task == "embedding"
                else {"max_drop": options.max_drop},
                "pruned_fp32": {k: round(v, 5) for k, v in student_scores.items()},
                "int8": {k: round(v, 5) for k, v in shipped_scores.items()},
                "passed": pruned_passed,
            }
    hidden = int(reference.reshape(reference.shape[0], -1).shape[1])
    outputs = [TensorSpec(name=model.output_name, shape=["batch", hidden], dtype="float32")]
    postprocess: TaskConfig = (
        EmbeddingConfig(type="embedding")
        if model.task == "embedding"
        else TextClassificationConfig(type="text-classification", multi_label=model.multi_label)
    )
    fp32_bytes = teacher_fp32.stat().st_size
    metrics: Json = {
        "eval_samples": len(evaluation),
        "calibration_samples": len(calib),
        "selection_samples": len(selection),
        "int8": {k: round(v, 5) for k, v in shipped.scores.items()},
        "recipe": shipped.recipe.name,
        "recipes": [r.to_dict() for r in results],
        "latency_ms": {
            "fp32": latency["fp32"],
            **({"pruned_fp32": latency["pruned_fp32"]} if pruning else {}),
            "int8": latency[shipped.recipe.name],
        },
        "size_bytes": {
            "fp32": fp32_bytes,
            **({"pruned_fp32": fp32.stat().st_size} if pruning else {}),
            "int8": shipped.bytes,
        },
        "latency_ratio_int8_fp32": round(latency[shipped.recipe.name]["p50"] / latency["fp32"]["p50"], 3),
        "size_ratio_int8_fp32": round(shipped.bytes / fp32_bytes, 3),
        "latency_sequence_length": model.max_length,
        "export": export_record,
        "pooling": model.pooling,
        "stage_seconds": {record.name: round(record.seconds, 2) for record in stages.records},
        "gate": _gate_record(model.task, shipped, options.max_drop),
    }
    artifacts = [
        ArtifactFile(
            shipped.path,
            "model.int8.onnx",
            "onnx",
            "int8",
            Quantization(
                scheme="dynamic",
                activations="uint8",
                weights="int8",
                per_channel=shipped.recipe.per_channel,
            ),
        ),
        ArtifactFile(fp32, "model.fp32.onnx", "onnx", "fp32"),
    ]
    with stages.stage("package"):
        spec = PackageSpec(
            name=model.name,
            task=model.task,
            inputs=inputs,
            outputs=outputs,
            artifacts=artifacts,
            golden=GoldenSet(golden_feeds, golden_outputs, tolerance),
            postprocess=postprocess,
            labels=model.labels,
            pruning=pruning,
            metrics=metrics,
            profile=profile.name,
            extra_files={"tokenizer.json": tokenizer},
            text=text,
        )
        manifest = write_package(options.out, spec, sign_key=options.sign_key, sequence=options.sequence)
    drop = (1.0 - shipped.scores.get("nn_agreement", shipped.scores.get("top1_agreement", 0.0))) * 100.0
    return ConvertResult(
        out=options.out,
        manifest=manifest,
        gate_passed=shipped.passed and pruned_passed,
        evaluation=accuracy.Evaluation(
            metric="nn_agreement" if model.task == "embedding" else "top1_agreement",
            drop_points=drop,
            details=dict(shipped.scores),
        ),
        stages=stages.records,
    )


@dataclass(frozen=True)
class TextModel:
    """What the text pipeline needs of its SOURCE, a Hugging Face folder or a transformer .onnx."""

    name: str
    task: TextTask
    input_names: list[str]
    output_name: str
    pooling: str | None
    labels: list[str] | None
    tokenizer_json: Path
    max_length: int
    shape: TransformerShape
    multi_label: bool
    huggingface: HuggingFaceSource | None = None  # torch weights: exported here, prunable
    onnx: Path | None = None  # the user's graph (pooling appended)


def _load_text_model(options: ConvertOptions, work: Path) -> TextModel:
    source = Path(options.source)
    onnx_path = onnx_folder_model(source) if source.is_dir() else source
    if onnx_path is not None:
        if options.prune_layers > 0:
            raise ConfigError(
                f"--prune-layers: {options.source} is an ONNX graph; layer pruning trains the model with "
                "transformers and needs the Hugging Face folder (config.json + model.safetensors)"
            )
        if onnx_path.suffix != ".onnx":
            raise ConfigError(f"--tokenizer: {options.source} is not an .onnx model or a model folder")
        labels = _read_labels(options.labels)
        loaded = load_onnx_text(onnx_path, options.tokenizer, options.task, labels, work)
        return TextModel(
            name=loaded.name,
            task=loaded.task,
            input_names=loaded.input_names,
            output_name=loaded.output_name,
            pooling=loaded.pooling,
            labels=loaded.labels,
            tokenizer_json=loaded.tokenizer_json,
            max_length=loaded.max_length,
            shape=TransformerShape(loaded.model_type, 0, 0),  # the optimizer reads heads/hidden off the graph
            multi_label=_multi_label(onnx_path.parent),
            onnx=loaded.path,
        )
    hf = load_folder(source, options.task, work)
    return TextModel(
        name=hf.name,
        task=hf.task,
        input_names=hf.input_names,
        output_name=hf.output_name,
        pooling=hf.pooling,
        labels=hf.labels,
        tokenizer_json=hf.tokenizer_json,
        max_length=hf.max_length,
        shape=TransformerShape(hf.model_type, hf.num_heads, hf.hidden_size),
        multi_label=_multi_label(hf.folder),
        huggingface=hf,
    )


def _read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"--labels {path}: cannot read: {exc.strerror}") from exc


def _float_model(
    model: TextModel, example: dict[str, np.ndarray], work: Path, stages: Stages
) -> tuple[Path, Json]:
    fp32 = work / "model.fp32.onnx"
    with stages.stage("export onnx") as note:
        if model.huggingface is None:
            assert model.onnx is not None
            shutil.copyfile(model.onnx, fp32)
            accuracy.session(fp32).run(None, example)  # a graph the runtime cannot run stops here
            note("the source graph")
            return fp32, {
                "exporter": "none (ONNX source)",
                "pooling_appended": model.pooling is not None,  # a per-token output, pooled here
            }
        max_diff = export_text_onnx(model.huggingface, example, fp32)
        note(f"max |onnx - torch| {max_diff:.2g}")
    return fp32, {"exporter": "torchscript", "opset": 17, "max_abs_diff": max_diff}


def _distill_seconds(options: ConvertOptions) -> float:
    return TEXT_DISTILL_SECONDS if options.distill_time is None else options.distill_time


def _prune_layers(
    options: ConvertOptions,
    model: TextModel,
    pre: TextPreprocessor,
    texts: list[str],
    example: dict[str, np.ndarray],
    work: Path,
    stages: Stages,
) -> tuple[Path, Json, Json]:
    """Drop encoder layers, distil from the full model, export the student as model.fp32.onnx (the full
    model stays the reference the latency and the pruned gate are measured against)."""
    from converters.text_layers import prune_and_distill

    assert model.huggingface is not None
    teacher = work / "model.fp32.onnx"
    reference = work / "reference.fp32.onnx"
    teacher.rename(reference)
    with stages.stage(f"prune layers {options.prune_layers} + distill") as note:
        result = prune_and_distill(
            model.huggingface,
            pre,
            texts,
            options.prune_layers,
            budget_s=_distill_seconds(options),
            max_steps=options.distill_steps,
            lr=options.distill_lr,
            on_step=lambda step, loss: note(f"step {step} loss {loss:.4f}"),
        )
        note(f"kept layers {result.kept}, {result.steps} steps, best {result.best_step} ({result.stopped})")
    with stages.stage("export pruned onnx") as note:
        student = work / "model.fp32.onnx"
        max_diff = export_text_onnx(result.source, example, student)
        note(f"max |onnx - torch| {max_diff:.2g}")
    record: Json = result.record(options.prune_layers, options.distill_lr, _distill_seconds(options))
    return student, record, {"exporter": "torchscript", "opset": 17, "max_abs_diff": max_diff}


# The pruned model against the full one (the int8 gate compares int8 with the pruned fp32 model).
PRUNED_EMBEDDING_GATE = {"cosine_mean": 0.95}


def _pruned_gate(task: str, max_drop: float) -> Callable[[dict[str, float]], bool]:
    if task == "embedding":
        return lambda scores: all(scores[k] >= v for k, v in PRUNED_EMBEDDING_GATE.items())
    return lambda scores: (1.0 - scores["top1_agreement"]) * 100.0 <= max_drop


def _choose(results: list[RecipeResult]) -> RecipeResult:
    """The fastest recipe that passed the gate on the selection texts (calibration texts set aside);
    when none did, the one closest to fp32 there. Whether it passes on the evaluation texts is the
    gate's verdict: the texts that score a recipe never choose it."""
    built = [r for r in results if r.path is not None]
    if not built:
        errors = "; ".join(f"{r.recipe.name}: {r.error}" for r in results)
        raise ConfigError(f"no int8 recipe could be built: {errors}")
    selected = [r for r in built if r.selected]
    if selected:
        return min(selected, key=lambda r: r.latency_ms if r.latency_ms is not None else float("inf"))
    return min(built, key=lambda r: _shortfall(r.selection))


def _shortfall(scores: dict[str, float]) -> float:
    """How far scores are from the gate, each score's miss relative to the room the gate leaves."""
    bounds = EMBEDDING_GATE if "nn_agreement" in scores else {"top1_agreement": 1.0}
    return sum(
        max(0.0, bound - scores.get(key, 0.0)) / max(1.0 - bound, 0.01) for key, bound in bounds.items()
    )


def _gate_record(task: str, shipped: RecipeResult, max_drop: float) -> Json:
    if task == "embedding":
        return {
            "metric": "nn_agreement",
            "thresholds": dict(EMBEDDING_GATE),
            "scores": {k: round(v, 5) for k, v in shipped.scores.items()},
            "passed": shipped.passed,
        }
    return {
        "metric": "top1_agreement",
        "drop_points": round((1.0 - shipped.scores["top1_agreement"]) * 100.0, 3),
        "max_drop": max_drop,
        "passed": shipped.passed,
    }


def _golden_feeds(pre: TextPreprocessor, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """A few evaluation texts, all padded to one length (the golden file stacks them)."""
    chosen = texts[:GOLDEN_SAMPLES]
    length = max(pre.bucket(len(pre.tokenizer.encode(t).ids)) for t in chosen)
    return [pre.encode(t, length=length) for t in chosen]


def _multi_label(folder: Path) -> bool:
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("problem_type") == "multi_label_classification"
