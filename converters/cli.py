"""`edge-convert SOURCE --out PKG_DIR [...]` (docs/contracts.md). Exit 0 only when the accuracy gate passed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from converters.accuracy import CONFIDENT
from converters.stateful import parse_const, parse_state
from edge.errors import EdgeError

EXIT_GATE_FAILED = 1
EXIT_ERROR = 2


AUTO = -1.0  # `--prune auto`


def parse_prune(text: str) -> float:
    if text.strip().lower() == "auto":
        return AUTO
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1) or 'auto', got {text!r}") from exc


def parse_positive(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{option} must be > 0, got {text!r}")
    return value


def parse_fraction(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{option} is a fraction in (0, 1], got {text!r}")
    return value


def parse_duration(text: str) -> float:
    """'90s', '20m', '1h', '1h30m' or plain seconds -> seconds."""
    import re

    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", cleaned)
    if not cleaned or parts is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 20m or 1h, got {text!r}")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def build_parser() -> argparse.ArgumentParser:
    from converters.calibration import parse_floats, parse_shape

    parser = argparse.ArgumentParser(
        prog="edge-convert",
        description=(
            "Prune, distill, export and compress a model to its device profile's precision (int8, fp16) "
            "behind an accuracy gate; write a package."
        ),
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="model.onnx, model.tflite, file.py:fn, pkg.module:fn, or a Hugging Face model folder",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="PKG_DIR", help="package directory to write"
    )
    parser.add_argument("--profile", help="device profile name or YAML path (default: this machine's)")
    parser.add_argument(
        "--calib",
        type=Path,
        metavar="PATH",
        help="image folder, .npz of input tensors, or texts.txt (one text per line)",
    )
    parser.add_argument(
        "--eval", type=Path, metavar="PATH", help="held-out samples (default: last 25%% of --calib)"
    )
    parser.add_argument(
        "--labels", type=Path, metavar="FILE", help="class names, one per line; or a .json list (a charset)"
    )
    parser.add_argument("--input-shape", type=parse_shape, metavar="1,3,224,224")
    parser.add_argument("--mean", type=lambda t: parse_floats(t, "--mean"), metavar="127,127,127")
    parser.add_argument("--std", type=lambda t: parse_floats(t, "--std"), metavar="128,128,128")
    parser.add_argument("--layout", choices=["NCHW", "NHWC"])
    parser.add_argument("--color", choices=["RGB", "BGR"])
    parser.add_argument(
        "--task",
        choices=[
            "classification",
            "detection",
            "raw",
            "embedding",
            "text-classification",
            "text-recognition",
            "voice-activity",
        ],
    )
    parser.add_argument(
        "--postprocess",
        metavar="JSON|@FILE.json",
        help='the manifest\'s post-processing, e.g. \'{"type": "detection", "format": "yolox"}\' (sets --task)',
    )
    parser.add_argument(
        "--prune",
        type=parse_prune,
        default=0.0,
        metavar="RATIO|auto",
        help="channel ratio to remove; auto: the fastest within --max-drop (see --target-speedup)",
    )
    parser.add_argument(
        "--target-speedup",
        type=lambda t: parse_positive(t, "--target-speedup"),
        metavar="X",
        help="search the pruning ratio for a model X times faster than fp32 (int8 latency measured here) "
        "that passes --max-drop, or the closest",
    )
    parser.add_argument(
        "--prune-search",
        choices=["per-group", "uniform"],
        default="per-group",
        help="with --target-speedup / --prune auto: per-group (default) gives each stage of the network its "
        "own ratio, raised greedily where it costs the least agreement per latency saved (NetAdapt); "
        "uniform: one ratio for every layer, from a grid 0.1-0.6 (faster to search)",
    )
    parser.add_argument(
        "--prune-search-time",
        type=parse_duration,
        metavar="5m",
        help="time budget of the per-group search's speed phase (90s, 5m; default 5m), distillation not counted",
    )
    parser.add_argument("--prune-mode", choices=["structured", "unstructured"], default="structured")
    parser.add_argument("--distill-steps", type=int, default=0, metavar="N", help="at most N steps")
    parser.add_argument(
        "--distill-time",
        type=parse_duration,
        metavar="20m",
        help="distillation's time budget (90s, 20m, 1h; 0: off); default with --prune: 10m, with --prune-layers: 5m",
    )
    parser.add_argument(
        "--distill-lr",
        type=float,
        default=1e-4,
        metavar="LR",
        help="Adam learning rate for distillation (default 1e-4: higher undoes a pretrained student)",
    )
    parser.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware fine-tuning before int8 (torch factory SOURCE): when post-training int8 "
        "loses points",
    )
    parser.add_argument(
        "--qat-time",
        type=parse_duration,
        metavar="2m",
        help="--qat's time budget (90s, 2m; default 2m)",
    )
    parser.add_argument(
        "--prune-layers",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="transformers: drop this share of the encoder layers, then distil from the full model",
    )
    parser.add_argument(
        "--tokenizer", type=Path, metavar="FILE", help="tokenizer.json of a transformer .onnx SOURCE"
    )
    parser.add_argument(
        "--formats", type=lambda t: [f.strip() for f in t.split(",") if f.strip()], metavar="onnx,tflite"
    )
    parser.add_argument("--max-drop", type=float, default=1.0, metavar="PCT", help="points (default 1)")
    parser.add_argument(
        "--min-agreement",
        type=lambda t: parse_fraction(t, "--min-agreement"),
        metavar="FRACTION",
        help="classifiers: top-1 agreement with fp32 the gate also requires (e.g. 0.9)",
    )
    parser.add_argument(
        "--min-confident-agreement",
        type=lambda t: parse_fraction(t, "--min-confident-agreement"),
        metavar="FRACTION",
        help=f"classifiers: the same where fp32's confidence >= {CONFIDENT} (e.g. 0.99)",
    )
    parser.add_argument(
        "--metric", metavar="FILE.py:fn", help="your own score fn(reference, candidate) -> float"
    )
    parser.add_argument("--calib-method", choices=["minmax", "percentile", "entropy"], default="minmax")
    parser.add_argument("--sign-key", type=Path, metavar="FILE", help="ed25519 private key PEM")
    parser.add_argument(
        "--sequence",
        type=int,
        metavar="N",
        help="anti-rollback counter signed into the manifest; devices refuse lower ones (default: now, Unix s)",
    )
    parser.add_argument("--report", action="store_true", help="write report/report.md with plots")
    parser.add_argument(
        "--weights", type=Path, metavar="FILE", help="state dict (.pt weights_only / .safetensors)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a non-package directory at --out (otherwise refused)",
    )
    parser.add_argument(
        "--const",
        action="append",
        default=[],
        type=parse_const,
        metavar="NAME=VALUE",
        help="an input fed a constant, e.g. sr=16000 (repeatable)",
    )
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        type=parse_state,
        metavar="IN:OUT",
        help="recurrent state: output OUT of one run is input IN of the next, zeros at start (repeatable)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except EdgeError as exc:  # argument type callbacks raise ConfigError with the reason
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    logging.basicConfig(level=logging.WARNING, format="edge-convert: warning: %(message)s")
    from converters.accuracy import GateError
    from converters.postprocess import parse_postprocess

    try:
        postprocess = None if args.postprocess is None else parse_postprocess(args.postprocess, args.task)
    except EdgeError as exc:
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from converters.pipeline import ConvertOptions, convert

    options = ConvertOptions(
        source=args.source,
        out=args.out,
        profile=args.profile,
        calib=args.calib,
        eval=args.eval,
        labels=args.labels,
        input_shape=args.input_shape,
        mean=args.mean,
        std=args.std,
        layout=args.layout,
        color=args.color,
        task=args.task or (postprocess.type if postprocess is not None else None),
        postprocess=postprocess,
        prune=0.0 if args.prune == AUTO else args.prune,
        prune_mode=args.prune_mode,
        distill_steps=args.distill_steps,
        distill_lr=args.distill_lr,
        prune_layers=args.prune_layers,
        tokenizer=args.tokenizer,
        distill_time=args.distill_time,
        qat=args.qat,
        qat_time=args.qat_time,
        target_speedup=args.target_speedup if args.target_speedup else (0.0 if args.prune == AUTO else None),
        prune_search=args.prune_search,
        prune_search_time=args.prune_search_time,
        formats=args.formats,
        max_drop=args.max_drop,
        min_agreement=args.min_agreement,
        min_confident_agreement=args.min_confident_agreement,
        metric=args.metric,
        sign_key=args.sign_key,
        sequence=args.sequence,
        report=args.report,
        weights=args.weights,
        calibration_method=args.calib_method,
        quiet=args.quiet,
        force=args.force,
        constants=args.const,
        state=args.state,
    )
    try:
        result = convert(options)
    except GateError as exc:
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except EdgeError as exc:
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("edge-convert: error: interrupted; nothing was written", file=sys.stderr)
        return 130
    metrics = result.manifest.metrics
    gate = metrics.get("gate", {})
    summary = f"wrote {result.out} ({result.manifest.task}, {len(result.manifest.artifacts)} artifacts)"
    precision = gate.get("precision")
    if "thresholds" in gate:  # text embeddings: cosine and nearest-neighbour agreement to fp32
        scores = ", ".join(f"{k} {v:.4f}" for k, v in gate["scores"].items())
        summary += (
            f"; {metrics['recipe']}: int8/fp32 latency {metrics['latency_ratio_int8_fp32']:.2f}x, size "
            f"{metrics['size_ratio_int8_fp32']:.2f}x; {scores}"
        )
    elif f"latency_ratio_{precision}_fp32" in metrics:  # the shipped model differs from fp32: compare them
        summary += (
            f"; {precision}/fp32 latency {metrics[f'latency_ratio_{precision}_fp32']:.2f}x, size "
            f"{metrics[f'size_ratio_{precision}_fp32']:.2f}x"
        )
    if "drop_points" in gate:
        summary += f"; {gate.get('metric')} drop {gate.get('drop_points')} points"
        shipped = metrics.get(str(precision), {})
        if (
            gate.get("metric") == "expected_top1_drop"
            and isinstance(shipped, dict)
            and "agreement_top1" in shipped
        ):
            # the expected drop forgives flips of unsure answers; how often the top-1 moved is said beside it
            confident = shipped.get("agreement_top1_confident")  # None: no sample where fp32 is confident
            summary += f" (top-1 agreement {shipped['agreement_top1']:.3f}" + (
                f", {confident:.3f} where fp32 is confident)" if isinstance(confident, float) else ")"
            )
    if "recipes" in metrics and "thresholds" not in gate:
        summary += f"; recipe {metrics['recipe']} ({len(metrics['recipes'])} tried)"
    qat = metrics.get("qat")
    if isinstance(qat, dict):
        summary += (
            f"; qat {qat.get('steps')} steps, held-out int8 loss {qat.get('held_out_loss_before')} -> "
            f"{qat.get('held_out_loss_after')}"
        )
    if result.excluded_nodes:
        summary += f"; {len(result.excluded_nodes)} node(s) kept in float"
    if result.report is not None:
        summary += f"; report {result.report}"
    print(summary)
    teacher = (result.manifest.pruning or {}).get("teacher")
    if not result.gate_passed and isinstance(teacher, dict) and not teacher.get("passed", True):
        print(
            "edge-convert: error: accuracy gate failed: the layer-pruned int8 model against the full one: "
            f"{teacher.get('int8')}, wanted {teacher.get('thresholds')} (distil longer or on more texts)",
            file=sys.stderr,
        )
        return EXIT_GATE_FAILED
    if not result.gate_passed and "thresholds" in gate:
        wanted = ", ".join(f"{k} >= {v}" for k, v in gate["thresholds"].items())
        print(f"edge-convert: error: accuracy gate failed: no int8 recipe reaches {wanted}", file=sys.stderr)
        return EXIT_GATE_FAILED
    if not result.gate_passed:
        print(
            f"edge-convert: error: accuracy gate failed: the {precision or 'shipped'} model "
            f"{options.limits.miss(result.evaluation)}",
            file=sys.stderr,
        )
        return EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
