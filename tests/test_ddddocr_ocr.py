"""The issue-14 case end to end: ddddocr's real line recognizer (`common.onnx`, dynamic width, CNN + LSTM,
8210-class CTC head) converted to int8 by the recipe search with a passing gate, its width symbolic in
the package, then served with `open_model` on lines of many widths it never saw, read as fp32 reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.accuracy import edit_distance, run_onnx
from converters.cli import main
from edge import open_model
from edge.package import load_package
from edge.processing.preprocess import ImagePreprocessor
from edge.tasks import make_decoder
from examples import ddddocr_ocr


@pytest.mark.slow
def test_ddddocr_recognizer_converts_with_a_passing_gate_and_reads_unseen_lines(
    tmp_path: Path, cache_dir: Path
) -> None:
    model, charset = ddddocr_ocr.fetch_model(cache_dir / "ddddocr")
    calib = ddddocr_ocr.write_folder(
        tmp_path / "calib", ddddocr_ocr.text_lines(64, 1, ddddocr_ocr.PHOTOS[:4])
    )
    held_out = ddddocr_ocr.write_folder(
        tmp_path / "eval", ddddocr_ocr.text_lines(96, 2, ddddocr_ocr.PHOTOS[4:])
    )
    out = tmp_path / "pkg"
    assert main(ddddocr_ocr.convert_command(model, charset, out, calib, held_out)[3:]) == 0
    package = load_package(out)
    manifest, metrics = package.manifest, package.manifest.metrics
    assert manifest.task == "text-recognition" and manifest.inputs[0].shape == [1, 1, 64, "image_width"]
    assert metrics["gate"]["passed"] and metrics["gate"]["metric"] == "char_accuracy_vs_fp32"
    assert metrics["fp32"]["char_accuracy_vs_fp32"] == 1.0
    assert metrics["gate"]["drop_points"] <= ddddocr_ocr.MAX_DROP
    tried = metrics["recipes"]
    assert tried[-1]["passed"] and not any(t["passed"] for t in tried[:-1])
    assert all(t["latency_ms_p50"] and t["bytes"] for t in tried if "error" not in t)
    assert metrics["latency_ratio_int8_fp32"] < 1.0

    # Lines of another seed: the package (int8, runtime pre-processing) against fp32 run here. On 120 such
    # lines (718 characters) MinMax read 95.4 % of fp32's characters, Entropy 98.2 %, Percentile 98.1 %.
    unseen = ddddocr_ocr.text_lines(96, 3, ddddocr_ocr.PHOTOS)
    widths = set()
    pre = ImagePreprocessor.from_spec(manifest.inputs[0])
    decode = make_decoder(manifest, package.labels())
    errors = characters = 0
    with open_model(out) as served:
        for image, _ in unseen:
            feed = {"input1": pre(image)[0]}
            widths.add(feed["input1"].shape[3])
            fp32 = decode(run_onnx(model, [feed])[0], None)["text"]
            int8 = served.infer(np.ascontiguousarray(image[..., ::-1]))["text"]
            assert isinstance(fp32, str) and isinstance(int8, str)
            errors, characters = errors + edit_distance(fp32, int8), characters + len(fp32)
    assert len(widths) > 10  # every line its own width
    assert 1 - errors / characters >= 0.96
