"""One torch module exported to ONNX and to int8 TFLite (litert-torch, via converters.tflite) in one
package: both backends pass the same golden check, and `bench --compare-backend` runs them interleaved.
Slow: litert-torch conversion and quantization take ~30 s on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.backends import load_model
from edge.cli import main as cli_main
from edge.package import load_package
from edge.profiles import load_profile
from tests.test_backends_support import ort_outputs, write_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from converters.tflite import export_tflite

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Tiny().eval()
    rng = np.random.default_rng(0)
    samples = [rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for _ in range(16)]
    work = tmp_path_factory.mktemp("pair")
    onnx_path = work / "model.onnx"
    torch.onnx.export(model, (torch.from_numpy(samples[0]),), str(onnx_path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False)  # fmt: skip
    exported = export_tflite(
        model, (torch.from_numpy(samples[0]),), work / "model.int8.tflite", "int8", samples
    )
    golden_in = np.concatenate(samples[:6])
    golden_out = np.concatenate([ort_outputs(onnx_path, {"input": s})[0] for s in samples[:6]])
    root = write_package(
        work / "pkg",
        [("model.onnx", onnx_path, "onnx", "fp32"), ("model.int8.tflite", exported.path, "tflite", "int8")],
        [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32", "layout": "NCHW"}],
        [{"name": "logits", "shape": [1, 6], "dtype": "float32"}],
        {"input": golden_in},
        {"logits": golden_out},
        tolerance={"cosine": 0.98, "top1": 0.8},
    )
    # The .tflite's own I/O (NHWC, maybe quantized) goes into its artifact entry.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["artifacts"][1]["inputs"] = [s.model_dump(exclude_none=True) for s in exported.inputs]
    manifest["artifacts"][1]["outputs"] = [s.model_dump(exclude_none=True) for s in exported.outputs]
    from edge.package import Manifest, write_manifest

    write_manifest(root, Manifest.model_validate(manifest))
    return root


def test_both_backends_pass_the_same_golden_check(pair_package: Path) -> None:
    package = load_package(pair_package)
    profile = load_profile("x86-64-generic")
    onnx_model = load_model(package, profile, backend="onnxruntime")
    tflite_model = load_model(package, profile, backend="litert")
    assert onnx_model.artifact.format == "onnx" and tflite_model.artifact.format == "tflite"
    assert tflite_model.input_specs[0].layout == "NHWC" and tflite_model.provider == "xnnpack"
    assert tflite_model.golden is not None and tflite_model.golden.passed
    assert tflite_model.golden.min_cosine > 0.98


def test_bench_compare_backend_interleaved(pair_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["bench", str(pair_package), "--compare-backend", "litert", "--json", "--seconds", "0.5",
                     "--profile", "x86-64-generic", "--threads", "1"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    a, b = report["subjects"]
    assert (a["backend"], b["backend"]) == ("onnxruntime", "litert")
    assert report["ratios"]["p50_b_over_a"] > 0 and b["cold"]["provider"] == "xnnpack"
