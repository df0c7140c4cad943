"""`edge-convert HF_FOLDER --task embedding|text-classification --calib texts.txt [--eval texts.txt]`.

load (transformers, offline) -> export ONNX (symbolic batch/sequence) -> int8 recipes scored against
fp32 on the evaluation texts -> measure (interleaved latency at max_length) -> package with the
tokenizer. The shipped recipe is the fastest one that passes the gate; every recipe tried is listed in
the manifest's `metrics.recipes` with its latency, size and scores.

Gate: embeddings — cosine to fp32 per text mean >= 0.99 and min >= 0.97, nearest-neighbour agreement
among the evaluation texts >= 0.95; text-classification — top-1 agreement drop <= `--max-drop` points.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters import accuracy
from converters.huggingface import copy_tokenizer, export_text_onnx, load_folder
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
from converters.text_calibration import read_texts, split_texts, text_feeds
from converters.text_quantize import (
    EMBEDDING_GATE,
    RecipeResult,
    TransformerShape,
    embedding_gate,
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


def convert_text(options: ConvertOptions, work: Path, stages: Stages) -> ConvertResult:
    from converters.pipeline import ConvertResult

    if options.prune > 0 or options.distill_steps > 0:
        raise ConfigError("--prune/--distill-steps: not yet for a Hugging Face folder (see --task embedding)")
    if options.calib is None:
        raise ConfigError(
            f"{options.source}: a Hugging Face folder needs --calib texts.txt (one text per line)"
        )
    with stages.stage("load") as note:
        profile = resolve_profile(options.profile).profile
        source = load_folder(Path(options.source), options.task, work)
        calib_all = read_texts(options.calib, "--calib")
        eval_all = read_texts(options.eval, "--eval") if options.eval is not None else None
        calib, evaluation = split_texts(calib_all, eval_all, options.eval or options.calib)
        calib = calib[: options.max_calibration_samples]
        tokenizer = copy_tokenizer(source, work)
        text = TextConfig(
            tokenizer="tokenizer.json",
            sha256=sha256_file(tokenizer),
            bytes=tokenizer.stat().st_size,
            max_length=source.max_length,
            buckets=buckets_for(source.max_length),
        )
        inputs = [
            TensorSpec(name=name, shape=["batch", "sequence"], dtype="int64") for name in source.input_names
        ]
        pre = TextPreprocessor.from_file(tokenizer, text, inputs)
        calib_feeds, eval_feeds = text_feeds(pre, calib), text_feeds(pre, evaluation)
        note(f"{source.task}, {len(calib)} calibration / {len(evaluation)} evaluation texts")
    with stages.stage("export onnx") as note:
        fp32 = work / "model.fp32.onnx"
        max_diff = export_text_onnx(source, eval_feeds[0], fp32)
        note(f"max |onnx - torch| {max_diff:.2g}")
    scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    if source.task == "embedding":
        scorer, gate = score_embeddings, embedding_gate
    else:
        max_drop = options.max_drop

        def gate(scores: dict[str, float]) -> bool:
            return (1.0 - scores["top1_agreement"]) * 100.0 <= max_drop

        scorer = score_logits
    with stages.stage("quantize int8") as note:
        shape = TransformerShape(source.model_type, source.num_heads, source.hidden_size)
        reference, results = try_recipes(fp32, work, calib_feeds, eval_feeds, shape, scorer, gate, note=note)
    with stages.stage("measure") as note:
        long_feed = pre.encode(" ".join(evaluation), length=source.max_length)
        built = {r.recipe.name: r.path for r in results if r.path is not None}
        latency = measure_latency_ms(
            {"fp32": fp32, **built}, long_feed, threads=LATENCY_THREADS, budget_s=20.0
        )
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
    hidden = int(reference.reshape(reference.shape[0], -1).shape[1])
    outputs = [TensorSpec(name=source.output_name, shape=["batch", hidden], dtype="float32")]
    postprocess: TaskConfig = (
        EmbeddingConfig(type="embedding")
        if source.task == "embedding"
        else TextClassificationConfig(type="text-classification", multi_label=_multi_label(source.folder))
    )
    fp32_bytes = fp32.stat().st_size
    metrics: Json = {
        "eval_samples": len(evaluation),
        "calibration_samples": len(calib),
        "int8": {k: round(v, 5) for k, v in shipped.scores.items()},
        "recipe": shipped.recipe.name,
        "recipes": [r.to_dict() for r in results],
        "latency_ms": {"fp32": latency["fp32"], "int8": latency[shipped.recipe.name]},
        "size_bytes": {"fp32": fp32_bytes, "int8": shipped.bytes},
        "latency_ratio_int8_fp32": round(latency[shipped.recipe.name]["p50"] / latency["fp32"]["p50"], 3),
        "size_ratio_int8_fp32": round(shipped.bytes / fp32_bytes, 3),
        "latency_sequence_length": source.max_length,
        "export": {"exporter": "torchscript", "opset": 17, "max_abs_diff": max_diff},
        "pooling": source.pooling,
        "stage_seconds": {record.name: round(record.seconds, 2) for record in stages.records},
        "gate": _gate_record(source.task, shipped, options.max_drop),
    }
    with stages.stage("package"):
        spec = PackageSpec(
            name=source.name,
            task=source.task,
            inputs=inputs,
            outputs=outputs,
            artifacts=[
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
            ],
            golden=GoldenSet(golden_feeds, golden_outputs, tolerance),
            postprocess=postprocess,
            labels=source.labels,
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
        gate_passed=shipped.passed,
        evaluation=accuracy.Evaluation(
            metric="nn_agreement" if source.task == "embedding" else "top1_agreement",
            drop_points=drop,
            details=dict(shipped.scores),
        ),
        stages=stages.records,
    )


def _choose(results: list[RecipeResult]) -> RecipeResult:
    """The fastest recipe that passed; when none did, the one closest to fp32 (the gate then fails)."""
    built = [r for r in results if r.path is not None]
    if not built:
        errors = "; ".join(f"{r.recipe.name}: {r.error}" for r in results)
        raise ConfigError(f"no int8 recipe could be built: {errors}")
    passed = [r for r in built if r.passed]
    if passed:
        return min(passed, key=lambda r: r.latency_ms if r.latency_ms is not None else float("inf"))
    return min(built, key=_shortfall)


def _shortfall(result: RecipeResult) -> float:
    """How far a recipe is from the gate, each score's miss relative to the room the gate leaves."""
    bounds = EMBEDDING_GATE if "nn_agreement" in result.scores else {"top1_agreement": 1.0}
    return sum(
        max(0.0, bound - result.scores.get(key, 0.0)) / max(1.0 - bound, 0.01)
        for key, bound in bounds.items()
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
