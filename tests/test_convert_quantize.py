"""int8 quantization of tiny graphs built with onnx.helper: op counts, per-channel scales, numeric agreement."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.accuracy import (
    Candidate,
    ExclusionResult,
    GateError,
    GateLimits,
    cosine,
    evaluate,
    run_onnx,
    search_exclusions,
)
from converters.quantize import per_channel_weight_scales, prepare_for_quantization, quantize_model
from edge.profiles import load_profile
from tests.assets_models import outlier_model, photo_crops, tiny_classifier


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


def _rounding_biased_conv(path: Path, channels: int = 16, outputs: int = 4) -> Path:
    """A 1x1 Conv whose int8 weights all round the same way: per output channel one weight of 1.0 sets the
    scale (1/127, or 1/64 with reduce_range) and the other weights sit at 0.75 / 0.38 of a step, so int8
    adds (or drops) the same amount per input. With positive inputs that is a shift of the output mean."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((outputs, channels, 1, 1), 0.0059, dtype=np.float32)
    weight[:, 0] = 1.0
    bias = np.linspace(-0.2, 0.2, outputs).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["output"], name="conv")],
        "rounding_biased_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, outputs, 8, 8])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("profile", ["x86-64-vnni", "x86-64-avx2"])
def test_bias_correction_removes_the_mean_shift_of_rounded_weights(tmp_path: Path, profile: str) -> None:
    source = _rounding_biased_conv(tmp_path / "conv.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    rng = np.random.default_rng(0)
    samples = [{"input": rng.uniform(0.5, 1.5, (1, 16, 8, 8)).astype(np.float32)} for _ in range(32)]
    calibration, held_out = samples[:16], samples[16:]
    scheme = load_profile(profile).quantization

    def mean_shift(path: Path) -> float:
        reference = np.stack([r[0] for r in run_onnx(source, held_out)])
        quantized = np.stack([q[0] for q in run_onnx(path, held_out)])
        return float(np.abs((quantized - reference).mean(axis=(0, 1, 3, 4))).max())

    plain = quantize_model(prepared, tmp_path / "plain.onnx", calibration, scheme, bias_correction=False)
    corrected = quantize_model(prepared, tmp_path / "corrected.onnx", calibration, scheme)

    assert plain.bias_corrected == [] and corrected.bias_corrected == ["conv"]
    assert mean_shift(plain.path) > 0.02  # 15 inputs x ~1.0 x the rounding error of each weight
    assert mean_shift(corrected.path) < 0.2 * mean_shift(plain.path)
    # Same int8 weights and activation ranges: only the int32 bias moved.
    assert per_channel_weight_scales(corrected.path) == per_channel_weight_scales(plain.path)


@pytest.mark.parametrize(
    ("profile", "limit"), [("x86-64-avx2", 64), ("x86-64-generic", 64), ("x86-64-vnni", 127)]
)
def test_x86_without_vnni_quantizes_weights_to_seven_bits(tmp_path: Path, profile: str, limit: int) -> None:
    from onnx import numpy_helper

    source = tiny_classifier(tmp_path / "tiny.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    scheme = load_profile(profile).quantization
    assert scheme.reduce_range is (limit == 64)
    result = quantize_model(prepared, tmp_path / "int8.onnx", _feeds(8), scheme)
    model = onnx.load(str(result.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [
        inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
    ]
    assert weights and max(int(np.abs(w).max()) for w in weights) == limit


def _outlier_search(tmp_path: Path, max_drop: float) -> tuple[ExclusionResult, list[list[str]]]:
    """`search_exclusions` on the graph int8 ruins at `mix`, re-quantizing for real and scoring by cosine."""
    source = outlier_model(tmp_path / "outlier.onnx")
    prepared = prepare_for_quantization(source, tmp_path)
    scheme = load_profile("x86-64-vnni").quantization
    feeds = _feeds(12, size=16)
    reference = run_onnx(source, feeds)
    tried: list[list[str]] = []

    def requantize(exclude: list[str], tag: str) -> Candidate:
        tried.append(exclude)
        path = quantize_model(prepared, tmp_path / f"int8.{tag}.onnx", feeds, scheme, exclude=exclude).path
        return Candidate(path, evaluate("raw", reference, run_onnx(path, feeds)))

    failed = requantize([], "all")
    assert failed.evaluation.drop_points > 1.0  # the graph is built so that full int8 fails
    search = search_exclusions(
        prepared.path,
        prepared.node_names,
        failed,
        requantize,
        limits=GateLimits(max_drop),
        feeds=feeds,
        work_dir=tmp_path,
        note=lambda _: None,
    )
    return search, tried


def test_exclusion_search_keeps_the_fewest_sensitive_nodes_in_float(tmp_path: Path) -> None:
    search, tried = _outlier_search(tmp_path, max_drop=1.0)
    assert search.chosen.evaluation.drop_points <= 1.0
    assert "mix" in search.excluded and "head" not in search.excluded
    assert set(search.sensitivity) == {"spread", "mix", "head"}
    assert max(search.sensitivity, key=lambda n: search.sensitivity[n]) == "mix"
    # `mix` with the nodes back to its weighted producer, found at the first try: no further attempts
    assert search.excluded == ["mix", "spread_relu", "spread"] and tried == [[], search.excluded]
    assert set(per_channel_weight_scales(search.chosen.path)) == {"head"}  # the others kept float weights


def test_exclusion_search_that_cannot_pass_names_the_limit(tmp_path: Path) -> None:
    with pytest.raises(GateError, match=r"keeping the 1 most sensitive of 3 weighted nodes in float still"):
        _outlier_search(tmp_path, max_drop=-1.0)
