"""Engine-layer overhead and backend comparison, ratios measured in one run.

    python benchmarks/backend_bench.py [--package PKG] [--seconds 10] [--threads 2]

1. EfficientNet-Lite0 int8 (ONNX, QDQ) through the edge engine layer (`load_model(...).run`, what
   `edge-infer bench` times) vs a bare `onnxruntime.InferenceSession.run` loop on the same file, same
   threads, interleaved. Target: ratio within 1.10.
2. If the package also has a .tflite artifact: LiteRT (XNNPACK) vs ONNX Runtime, interleaved. Target 1.5x.
3. Cold start (process start to first result, fresh subprocess) and peak RSS for each backend.

Without `--package`, an int8 EfficientNet-Lite0 package is built once into $EDGE_CACHE/bench (needs the
[convert] extra and `efficientnet-lite-pytorch`, see examples/efficientnet_lite0.py): legacy ONNX export,
onnxruntime `quantize_static` QDQ uint8/int8 per-channel on crops of skimage photos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _spec_and_samples() -> tuple[Any, list[np.ndarray]]:
    """The package input spec and 15 preprocessed crops of skimage photos (calibration + golden)."""
    from skimage import data

    from edge.package import TensorSpec
    from edge.processing.preprocess import ImagePreprocessor

    spec = TensorSpec(
        name="input",
        shape=[1, 3, 224, 224],
        dtype="float32",
        layout="NCHW",
        color="RGB",
        resize="center-crop",
        mean=[127.0] * 3,
        std=[128.0] * 3,
    )
    pre = ImagePreprocessor.from_spec(spec)
    photos = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut(), data.immunohistochemistry()]
    samples = []
    for photo in photos:
        bgr = np.ascontiguousarray(photo[:, :, ::-1])
        for crop in (bgr, bgr[: bgr.shape[0] * 3 // 4], bgr[:, bgr.shape[1] // 4 :]):
            samples.append(pre(np.ascontiguousarray(crop))[0])
    return spec, samples


def build_package(out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edge.package import Manifest, describe_file, staged_package, utc_now, write_manifest
    from examples.efficientnet_lite0 import build

    spec, samples = _spec_and_samples()
    with staged_package(out) as stage:
        fp32 = stage / "model.fp32.onnx"
        torch.onnx.export(
            build(),
            (torch.from_numpy(samples[0]),),
            str(fp32),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(samples)

            def get_next(self) -> dict[str, np.ndarray] | None:
                item = next(self.items, None)
                return None if item is None else {"input": item}

        quantize_static(
            str(fp32),
            str(stage / "model.int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        fp32.unlink()
        session = ort.InferenceSession(str(stage / "model.int8.onnx"), providers=["CPUExecutionProvider"])
        golden_in = np.concatenate(samples[:4])
        golden_out = np.concatenate([session.run(None, {"input": s})[0] for s in samples[:4]])
        (stage / "golden").mkdir()
        np.savez(stage / "golden/inputs.npz", input=golden_in)
        np.savez(stage / "golden/outputs.npz", logits=golden_out)
        manifest = Manifest.model_validate({
            "schema": "edge.package/1", "name": "efficientnet-lite0", "version": "bench", "created": utc_now(),
            "task": "classification",
            "artifacts": [{**describe_file(stage, "model.int8.onnx"), "format": "onnx", "precision": "int8"}],
            "inputs": [spec.model_dump(exclude_none=True)], "outputs": [{"name": "logits", "shape": [1, 1000]}],
            "postprocess": {"type": "classification", "softmax": True, "top_k": 5},
            "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz",
                       "tolerance": {"cosine": 0.9, "top1": 0.5}},
        })  # fmt: skip
        write_manifest(stage, manifest)
    return out


def add_tflite(package_dir: Path) -> Path:
    """Add an int8 .tflite (litert-torch + litert-quantizer via converters.tflite) to the package once."""
    import shutil

    import torch

    from converters.tflite import export_tflite
    from edge.package import Manifest, describe_file, load_package, staged_package, write_manifest
    from examples.efficientnet_lite0 import build

    manifest = load_package(package_dir).manifest
    if any(a.format == "tflite" for a in manifest.artifacts):
        return package_dir
    _, samples = _spec_and_samples()
    with staged_package(package_dir) as stage:
        shutil.copytree(package_dir, stage, dirs_exist_ok=True)
        exported = export_tflite(
            build(), (torch.from_numpy(samples[0]),), stage / "model.int8.tflite", "int8", samples
        )
        artifact = {
            **describe_file(stage, "model.int8.tflite"),
            "format": "tflite",
            "precision": "int8",
            "inputs": [t.model_dump(exclude_none=True) for t in exported.inputs],
            "outputs": [t.model_dump(exclude_none=True) for t in exported.outputs],
        }
        data = manifest.model_dump(by_alias=True, exclude_none=True)
        data["artifacts"].append(artifact)
        write_manifest(stage, Manifest.model_validate(data))
    return package_dir


def engine_vs_bare(package_dir: Path, threads: int, seconds: float) -> dict[str, float]:
    import onnxruntime as ort

    from edge.backends import load_model
    from edge.bench import bench_feeds, interleaved_latency_ms, percentiles
    from edge.package import load_package
    from edge.profiles import load_profile

    model = load_model(
        load_package(package_dir), load_profile("x86-64-generic"), backend="onnxruntime", threads=threads
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    bare = ort.InferenceSession(
        str(package_dir / model.artifact.path), options, providers=["CPUExecutionProvider"]
    )
    feeds = bench_feeds(model)
    for _ in range(10):
        model.run(feeds)
        bare.run(None, feeds)
    measured = interleaved_latency_ms(
        {"engine": lambda: model.run(feeds), "bare": lambda: bare.run(None, feeds)}, budget_s=seconds
    )
    engine_ms, bare_ms = measured["engine"], measured["bare"]
    e, b = percentiles(engine_ms), percentiles(bare_ms)
    return {
        "engine_p50_ms": e["p50"],
        "bare_p50_ms": b["p50"],
        "engine_over_bare_p50": round(e["p50"] / b["p50"], 4),
        "engine_over_bare_mean": round(e["mean"] / b["mean"], 4),
        "runs": len(engine_ms),
    }


def litert_vs_onnxruntime(package_dir: Path, threads: int, seconds: float) -> dict[str, Any]:
    """int8 TFLite on XNNPACK vs int8 ONNX, interleaved. Opened below the golden gate so the speed is
    measured even when the .tflite disagrees with the golden outputs; the agreement is reported beside it."""
    from edge.backends import golden_check, relayout
    from edge.backends.base import LoadRequest
    from edge.backends.litert import LiteRTBackend
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from edge.bench import interleaved_latency_ms, percentiles
    from edge.package import load_package

    package = load_package(package_dir)
    manifest = package.manifest
    onnx_art, tfl_art = manifest.artifact("onnx"), manifest.artifact("tflite")
    onnx = OnnxRuntimeBackend(
        LoadRequest(
            package.path(onnx_art.path),
            manifest.inputs,
            manifest.outputs,
            ["CPUExecutionProvider"],
            threads=threads,
        )
    )
    tfl_in, tfl_out = tfl_art.inputs or manifest.inputs, tfl_art.outputs or manifest.outputs
    tflite = LiteRTBackend(
        LoadRequest(package.path(tfl_art.path), tfl_in, tfl_out, ["xnnpack"], threads=threads)
    )
    report = golden_check(tflite, package, tfl_art)
    with np.load(package.path(manifest.golden.inputs)) as data:  # type: ignore[union-attr]
        sample = data[manifest.inputs[0].name][:1]
    onnx_feeds = {manifest.inputs[0].name: sample}
    spec = tflite.inputs[0]
    nhwc = relayout(sample, manifest.inputs[0].layout, tfl_in[0].layout)
    if np.dtype(spec.dtype).kind in "iu" and spec.scale:
        nhwc = np.clip(np.round(nhwc / spec.scale) + (spec.zero_point or 0), -128, 127).astype(spec.dtype)
    tfl_feeds = {spec.name: nhwc}
    for _ in range(10):
        onnx.run(onnx_feeds)
        tflite.run(tfl_feeds)
    measured = interleaved_latency_ms(
        {"onnx": lambda: onnx.run(onnx_feeds), "tflite": lambda: tflite.run(tfl_feeds)}, budget_s=seconds
    )
    onnx_ms, tfl_ms = measured["onnx"], measured["tflite"]
    o, t = percentiles(onnx_ms), percentiles(tfl_ms)
    return {
        "onnx_int8_p50_ms": o["p50"],
        "tflite_int8_xnnpack_p50_ms": t["p50"],
        "tflite_over_onnx_p50": round(t["p50"] / o["p50"], 4),
        "runs": len(onnx_ms),
        "tflite_golden": report.summary() if report else "no golden data",
    }


def tflite_only_package(package_dir: Path, out: Path) -> Path:
    """The package's .tflite alone, golden outputs from LiteRT itself (a regression self-check), so the
    cold start of a LiteRT-served package can be measured even when the .tflite disagrees with the ONNX."""
    import shutil

    from edge.backends import relayout
    from edge.backends.base import LoadRequest
    from edge.backends.litert import LiteRTBackend
    from edge.package import Manifest, describe_file, load_package, staged_package, write_manifest

    if (out / "manifest.json").is_file():
        return out
    package = load_package(package_dir)
    manifest = package.manifest
    art = manifest.artifact("tflite")
    backend = LiteRTBackend(
        LoadRequest(
            package.path(art.path),
            art.inputs or manifest.inputs,
            art.outputs or manifest.outputs,
            ["xnnpack"],
        )
    )
    with np.load(package.path(manifest.golden.inputs)) as data:  # type: ignore[union-attr]
        golden_in = data[manifest.inputs[0].name]
    spec = backend.inputs[0]
    outputs = []
    for i in range(golden_in.shape[0]):
        x = relayout(
            golden_in[i : i + 1], manifest.inputs[0].layout, (art.inputs or manifest.inputs)[0].layout
        )
        if np.dtype(spec.dtype).kind in "iu" and spec.scale:
            x = np.clip(np.round(x / spec.scale) + (spec.zero_point or 0), -128, 127).astype(spec.dtype)
        outputs.append(backend.run({spec.name: x})[0])
    with staged_package(out) as stage:
        shutil.copyfile(package.path(art.path), stage / "model.int8.tflite")
        (stage / "golden").mkdir()
        shutil.copyfile(package.path(manifest.golden.inputs), stage / "golden/inputs.npz")  # type: ignore[union-attr]
        np.savez(stage / "golden/outputs.npz", logits=np.concatenate(outputs))
        data = manifest.model_dump(by_alias=True, exclude_none=True)
        data["name"] = "efficientnet-lite0-tflite"
        data["artifacts"] = [
            {**art.model_dump(exclude_none=True), **describe_file(stage, "model.int8.tflite")}
        ]
        data["golden"]["tolerance"] = {"atol": 1e-3, "rtol": 1e-3}
        write_manifest(stage, Manifest.model_validate(data))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--package", type=Path, help="an EfficientNet-Lite0 int8 package (edge-convert output)"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-tflite", action="store_true", help="add an int8 .tflite to the package first")
    args = parser.parse_args()
    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    package = args.package or build_package(cache / "bench" / "efficientnet-lite0-int8")
    if args.with_tflite:
        add_tflite(package)

    from edge.bench import cold_start
    from edge.package import load_package

    result: dict[str, object] = {"package": str(package), "threads": args.threads}
    result["engine_vs_bare_onnxruntime"] = engine_vs_bare(package, args.threads, args.seconds)
    formats = {a.format for a in load_package(package).manifest.artifacts}
    result["cold_onnxruntime"] = cold_start(str(package), "onnxruntime", "x86-64-generic", args.threads)
    if "tflite" in formats:
        result["litert_vs_onnxruntime"] = litert_vs_onnxruntime(package, args.threads, args.seconds)
        try:
            result["cold_litert"] = cold_start(str(package), "litert", "x86-64-generic", args.threads)
        except Exception as exc:  # the golden gate refuses a disagreeing .tflite: say so, keep the rest
            result["cold_litert_same_package"] = str(exc)
            alone = tflite_only_package(package, package.with_name(package.name + "-tflite-only"))
            result["cold_litert"] = cold_start(str(alone), "litert", "x86-64-generic", args.threads)
    else:
        result["litert_vs_onnxruntime"] = "package has no .tflite artifact (run with --with-tflite)"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
