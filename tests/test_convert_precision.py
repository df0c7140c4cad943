"""The precision a profile asks for is the precision shipped, gated and reported: fp16 for GPU profiles
(an ONNX fp16 artifact with float32 I/O, and the fp16 .tflite), fp32 as it is, int8 otherwise."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.cli import main
from edge.package import load_package
from edge.session import open_model
from tests.assets_models import tiny_classifier
from tests.test_convert_torch import FACTORY

PROFILES = Path(__file__).resolve().parents[1] / "device_profiles"


def _calib(tmp_path: Path, channels: int = 3, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, input=rng.normal(0, 1, (16, channels, size, size)).astype(np.float32))
    return path


def _float_types(model: onnx.ModelProto) -> Counter[int]:
    return Counter(t.data_type for t in model.graph.initializer)


def test_jetson_profile_ships_a_gated_fp16_onnx_with_float32_io(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(_calib(tmp_path)), "--profile", "jetson-orin-nano",
         "--report", "-q"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = load_package(out).manifest
    assert [(a.path, a.precision) for a in manifest.artifacts] == [
        ("model.fp16.onnx", "fp16"),
        ("model.fp32.onnx", "fp32"),
    ]
    assert manifest.artifact("onnx", "fp16").quantization is None
    fp16 = onnx.load(str(out / "model.fp16.onnx"))
    assert _float_types(fp16)[onnx.TensorProto.FLOAT16] >= 3  # conv and gemm weights are half
    io_types = {v.type.tensor_type.elem_type for v in [*fp16.graph.input, *fp16.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}  # the runtime feeds and reads float32
    assert (out / "model.fp16.onnx").stat().st_size < 0.7 * (out / "model.fp32.onnx").stat().st_size

    metrics = manifest.metrics
    assert "int8" not in metrics and "latency_ratio_int8_fp32" not in metrics
    assert set(metrics["latency_ms"]) == set(metrics["size_bytes"]) == {"fp32", "fp16"}
    assert metrics["fp16"]["agreement_top1"] == 1.0
    assert metrics["gate"]["precision"] == "fp16" and metrics["gate"]["passed"]
    assert metrics["size_ratio_fp16_fp32"] < 0.7 and metrics["latency_ratio_fp16_fp32"] > 0
    assert "fp16/fp32 latency" in captured.out and "int8" not in captured.out
    report = (out / "report" / "report.md").read_text()
    assert "| measure | float model | fp16 |" in report and "int8" not in report

    with open_model(out, profile="jetson-orin-nano") as model:  # what the device serves
        assert model.session.loaded.artifact.path == "model.fp16.onnx"
        assert model.session.golden is not None and model.session.golden.passed


def test_a_failing_fp16_gate_names_fp16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    metric = tmp_path / "exact.py"
    metric.write_text(
        "import numpy as np\n"
        "def exact(reference, candidate):\n"
        "    return float(np.mean([np.array_equal(r[0], c[0]) for r, c in zip(reference, candidate)]))\n"
    )
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(_calib(tmp_path)), "--profile", "jetson-orin-nano",
         "--metric", f"{metric}:exact", "-q"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "accuracy gate: fp16 drops" in err and "int8" not in err
    assert not out.exists()


def test_fp32_profile_ships_fp32_and_reports_no_compressed_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "gpu-fp32.yaml"
    text = (PROFILES / "jetson-orin-nano.yaml").read_text()
    profile.write_text(text.replace("name: jetson-orin-nano", "name: gpu-fp32").replace("fp16", "fp32"))
    source = tiny_classifier(tmp_path / "tiny.onnx")
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(_calib(tmp_path)), "--profile", str(profile), "-q"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = load_package(out).manifest
    assert [(a.path, a.precision) for a in manifest.artifacts] == [("model.fp32.onnx", "fp32")]
    assert set(manifest.metrics["latency_ms"]) == {"fp32"} and "int8" not in manifest.metrics
    assert manifest.metrics["gate"]["precision"] == "fp32"
    assert "int8" not in captured.out and "latency" not in captured.out


def test_jetson_profile_with_tflite_writes_the_fp16_tflite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "pkg"
    code = main(
        [f"{factory}:build", "--out", str(out), "--calib", str(_calib(tmp_path, size=16)), "--input-shape",
         "1,3,16,16", "--profile", "jetson-orin-nano", "--formats", "onnx,tflite", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    tflite = manifest.artifact("tflite")
    assert (tflite.path, tflite.precision) == ("model.fp16.tflite", "fp16")
    assert tflite.inputs is not None and tflite.inputs[0].dtype == "float32"
    assert "tflite_fp16" in manifest.metrics and "tflite_int8" not in manifest.metrics
    assert manifest.metrics["tflite_fp16"]["drop_points"] <= 1.0
