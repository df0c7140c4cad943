"""int8 quantization of tiny graphs built with onnx.helper: op counts, per-channel scales, numeric agreement."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.accuracy import cosine, run_onnx
from converters.quantize import per_channel_weight_scales, prepare_for_quantization, quantize_model
from edge.profiles import load_profile
from tests.assets_models import photo_crops, tiny_classifier


def _feeds(count: int, size: int = 32) -> list[dict[str, np.ndarray]]:
    images = [
        ((c[:, :, ::-1].astype(np.float32) - 127) / 128).transpose(2, 0, 1) for c in photo_crops(count, size)
    ]
    return [{"input": np.ascontiguousarray(image[None])} for image in images]


@pytest.mark.parametrize(
    ("opset", "constant_weights"),
    [(17, False), (12, True), (11, False)],
    ids=["opset17", "opset12-constants", "opset11"],
)
def test_static_qdq_per_channel(tmp_path: Path, opset: int, constant_weights: bool) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx", opset=opset, constant_weights=constant_weights)
    prepared = prepare_for_quantization(source, tmp_path)
    assert prepared.opset_before == opset
    assert prepared.opset_after >= 13
    if constant_weights:
        assert prepared.folded_constants == 6
    feeds = _feeds(16)
    scheme = load_profile("x86-64-vnni").quantization
    result = quantize_model(prepared, tmp_path / "int8.onnx", feeds, scheme)

    ops = Counter(n.op_type for n in onnx.load(str(result.path)).graph.node)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 6
    assert ops["Constant"] == 0
    scales = per_channel_weight_scales(result.path)
    assert scales == {"conv1": (16,), "conv2": (32,), "fc": (10,)}

    model = onnx.load(str(result.path))
    inits = {i.name: i for i in model.graph.initializer}
    weight_types = {
        inits[n.input[0]].data_type
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")
    }
    assert weight_types == {onnx.TensorProto.INT8}

    reference = run_onnx(source, feeds)
    quantized = run_onnx(result.path, feeds)
    similarity = [cosine(r[0], q[0]) for r, q in zip(reference, quantized, strict=True)]
    assert min(similarity) > 0.98
    assert not all(np.array_equal(r[0], q[0]) for r, q in zip(reference, quantized, strict=True))


def test_int8_int8_scheme_from_profile(tmp_path: Path) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    scheme = load_profile("raspberry-pi-4").quantization
    result = quantize_model(prepared, tmp_path / "int8.onnx", _feeds(8), scheme)
    model = onnx.load(str(result.path))
    inits = {i.name: i for i in model.graph.initializer}
    activation_zero_points = [
        inits[n.input[2]].data_type
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits
    ]
    expected = onnx.TensorProto.INT8 if scheme.activations == "int8" else onnx.TensorProto.UINT8
    assert activation_zero_points and set(activation_zero_points) == {expected}


def test_excluded_nodes_stay_float(tmp_path: Path) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    scheme = load_profile("x86-64-vnni").quantization
    result = quantize_model(prepared, tmp_path / "int8.onnx", _feeds(8), scheme, exclude=["fc"])
    scales = per_channel_weight_scales(result.path)
    assert "fc" not in scales and set(scales) == {"conv1", "conv2"}


def test_percentile_calibration_warns_about_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    scheme = load_profile("x86-64-vnni").quantization
    feeds = _feeds(8)
    minmax = quantize_model(prepared, tmp_path / "minmax.onnx", feeds, scheme)
    with caplog.at_level("WARNING"):
        percentile = quantize_model(prepared, tmp_path / "pct.onnx", feeds, scheme, method="percentile")
    assert "histograms in memory" in caplog.text
    assert (
        percentile.method == "percentile"
        and percentile.op_counts["QuantizeLinear"] == minmax.op_counts["QuantizeLinear"]
    )

    def activation_scales(path: Path) -> dict[str, float]:
        from onnx import numpy_helper

        model = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return {
            n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"
        }

    # Percentile clips the rare extremes MinMax keeps: some activation range must shrink.
    pct, mm = activation_scales(percentile.path), activation_scales(minmax.path)
    assert any(pct[name] < mm[name] for name in pct if name in mm)
