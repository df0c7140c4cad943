"""`edge-convert --qat` on the digits CNN: quantization-aware fine-tuning against post-training int8 on the
same model, data, recipe and gate; the one-line refusals; the manifest and report record; the weight
rounding QAT trains with against the one ONNX Runtime applies."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from converters.cli import main  # noqa: E402
from converters.qat import QUANTIZED_TYPES, _QuantizedLayer  # noqa: E402
from edge.package import load_package  # noqa: E402
from edge.profiles import resolve_profile  # noqa: E402
from examples import digits_cnn  # noqa: E402

PROFILE = "x86-64-vnni"  # uint8 activations, int8 per-channel weights, full range
QAT_TIME = "15s"

# The digits CNN with, after each BatchNorm+ReLU, its loudest channel made WIDER times louder and the next
# layer's weights from that channel WIDER times smaller: the same function in float (ReLU is positively
# homogeneous), but one uint8 range per tensor now spends its levels on one channel and leaves the others
# a handful (the range imbalance of Nagel et al. 2019, "Data-Free Quantization"). Post-training int8 loses
# points on it; the float gate sees nothing.
FACTORY = """
import torch

from examples import digits_cnn

WIDER = 96.0
PAIRS = ((1, 3), (4, 7), (8, 10), (11, 14), (15, 19))  # (BatchNorm, the next Conv/Linear)


def build():
    model = digits_cnn.build()
    layers = list(model)
    x_train = torch.from_numpy(digits_cnn.load_split()[0][:256])
    with torch.no_grad():
        for bn, consumer in PAIRS:
            after_relu = model[: bn + 2](x_train)
            loudest = int(after_relu.amax(dim=(0, 2, 3)).argmax())
            layers[bn].weight[loudest] *= WIDER
            layers[bn].bias[loudest] *= WIDER
            layers[consumer].weight[:, loudest] /= WIDER
    return model.eval()
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("qat")
    factory = root / "wide_channel_digits.py"
    factory.write_text(FACTORY)
    return {
        "root": root,
        "factory": factory,
        "calib": digits_cnn.write_calib_npz(root / "calib.npz"),
        "test": digits_cnn.write_held_out_npz(root / "test.npz"),
        "labels": digits_cnn.write_labels(root / "labels.txt"),
    }


def _convert(digits: dict[str, Path], out: str, *options: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            [f"{digits['factory']}:build", "--out", str(digits["root"] / out), "--input-shape", "1,1,16,16",
             "--calib", str(digits["calib"]), "--eval", str(digits["test"]), "--labels", str(digits["labels"]),
             "--profile", PROFILE, *options, "-q"]
        )  # fmt: skip
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def converted(digits: dict[str, Path]) -> dict[str, Any]:
    """The same model converted twice: post-training int8 only, and --qat first. --max-drop 100 lets the
    first recipe (qdq-minmax-per-channel) ship in both, so the two drops are the same recipe's."""
    ptq = _convert(digits, "ptq.pkg", "--max-drop", "100")
    qat = _convert(digits, "qat.pkg", "--max-drop", "100", "--qat", "--qat-time", QAT_TIME, "--report")
    assert ptq[0] == 0, ptq[2]
    assert qat[0] == 0, qat[2]
    return {
        "ptq": load_package(digits["root"] / "ptq.pkg"),
        "qat": load_package(digits["root"] / "qat.pkg"),
        "qat_stdout": qat[1],
        "root": digits["root"],
    }


def _first_recipe(metrics: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = metrics["recipes"][0]
    assert first["recipe"] == "qdq-minmax-per-channel" and metrics["recipe"] == first["recipe"]
    return first


def test_qat_recovers_the_points_post_training_int8_loses(converted: dict[str, Any]) -> None:
    ptq, qat = converted["ptq"].manifest.metrics, converted["qat"].manifest.metrics
    # the widened channels change nothing in float: the model gated and shipped as fp32 is the reference
    assert ptq["fp32"]["agreement_top1"] == qat["fp32"]["agreement_top1"] == 1.0
    ptq_drop, qat_drop = _first_recipe(ptq)["drop_points"], _first_recipe(qat)["drop_points"]
    print(
        f"digits CNN, one channel per block {96:g}x wider, {PROFILE}: int8 top-1 accuracy drop "
        f"post-training {ptq_drop} points (agreement {ptq['int8']['agreement_top1']}), with --qat "
        f"{qat_drop} points (agreement {qat['int8']['agreement_top1']}) after {qat['qat']['steps']} steps"
    )
    assert ptq_drop >= 1.0, "the premise: post-training int8 loses points on this model"
    assert qat_drop < ptq_drop / 2, (ptq_drop, qat_drop)
    assert qat["int8"]["agreement_top1"] > ptq["int8"]["agreement_top1"]


def test_manifest_and_report_record_the_qat_run(converted: dict[str, Any]) -> None:
    package = converted["qat"]
    record = package.manifest.metrics["qat"]
    assert "qat" not in converted["ptq"].manifest.metrics
    held_out = {int(step): loss for step, loss in record["held_out_loss"].items()}
    assert record["steps"] >= 1 and record["budget_s"] == 15.0 and record["stopped"] in ("budget", "patience")
    assert 0 < record["seconds"] <= 15.0 + 5.0
    assert record["held_out_loss_before"] == held_out[0]
    assert record["held_out_loss_after"] == held_out[record["best_step"]] == min(held_out.values())
    assert record["held_out_loss_after"] < record["held_out_loss_before"]
    assert record["layers"] == 6  # five convolutions and the classifier
    assert record["scheme"] == {
        "activations": "uint8",
        "weights": "int8",
        "per_channel": True,
        "reduce_range": False,
    }
    assert record["float_model"]["metric"] == "top1_accuracy"  # said, not gated
    assert record["float_model"]["drop_points"] == pytest.approx(
        100 * (record["float_model"]["accuracy_fp32"] - record["float_model"]["accuracy_candidate"]), abs=0.02
    )
    # the shipped int8 is the same QDQ graph post-training quantization builds, from the fine-tuned weights
    precisions = [artifact.precision for artifact in package.manifest.artifacts]
    assert precisions == ["int8", "fp32"]
    int8_ops = {node.op_type for node in onnx.load(str(package.root / "model.int8.onnx")).graph.node}
    ptq_ops = {node.op_type for node in onnx.load(str(converted["ptq"].root / "model.int8.onnx")).graph.node}
    assert int8_ops == ptq_ops and "QuantizeLinear" in int8_ops
    report = (package.root / "report" / "report.md").read_text()
    assert "## Quantization-aware fine-tuning" in report
    assert f"{record['steps']} steps on 128 calibration samples" in report
    assert f"kept the checkpoint of step {record['best_step']}" in report
    assert f"qat {record['steps']} steps" in converted["qat_stdout"]


@pytest.mark.parametrize("profile", ["x86-64-vnni", "x86-64-avx2", "raspberry-pi-5"])
def test_qat_simulates_the_integers_and_ranges_onnx_runtime_uses(
    converted: dict[str, Any], digits: dict[str, Path], tmp_path: Path, profile: str
) -> None:
    """uint8/int8 activations, full-range and 7-bit (reduce_range) weights: the weights QAT trains against
    (from the exported float weights, BatchNorm folded) are the ones ORT's quantizer writes, and the
    activation ranges QAT measures on the calibration samples give the scales and zero points ORT's
    MinMax calibration gives on the same samples."""
    from converters.qat import _fake_quantized
    from converters.quantize import prepare_for_quantization, quantize_model
    from converters.sources import load_source

    scheme = resolve_profile(profile).profile.quantization
    fp32 = converted["ptq"].root / "model.fp32.onnx"
    with np.load(digits["calib"]) as arrays:
        calib = arrays[digits_cnn.INPUT_NAME]
    int8 = tmp_path / "model.int8.onnx"
    feeds = [{digits_cnn.INPUT_NAME: calib[i : i + 1]} for i in range(len(calib))]
    quantize_model(prepare_for_quantization(fp32, tmp_path), int8, feeds, scheme)

    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    quantized = onnx.load(str(int8))
    tensors = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    weights = 0
    for node in quantized.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight_quantized"):
            continue
        weight = torch.from_numpy(floats[node.input[0].removesuffix("_quantized")].copy())
        layer = torch.nn.Linear(*weight.shape[::-1]) if weight.ndim == 2 else torch.nn.Conv2d(1, 1, 1)
        layer.weight = torch.nn.Parameter(weight)
        with torch.no_grad():
            trained_against = _QuantizedLayer(layer, scheme)._rounded_weight().numpy()
        scale = tensors[node.input[1]].reshape(-1, *[1] * (weight.ndim - 1))
        ort = tensors[node.input[0]].astype(np.float32) * scale
        assert np.abs(trained_against - ort).max() <= 1e-6 * np.abs(ort).max(), node.input[0]
        weights += 1
    assert weights == sum(isinstance(m, QUANTIZED_TYPES) for m in digits_cnn.make_model().modules())

    model = load_source(f"{digits['factory']}:build").module
    with _fake_quantized(model, scheme) as simulated:
        simulated.calibrate((torch.from_numpy(calib),))
        ours = [quant.grid.scale_zero(quant.lower, quant.upper) for quant in simulated.ranges]
    activations = [
        (float(tensors[node.input[1]]), int(tensors[node.input[2]]))
        for node in quantized.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in tensors
    ]
    assert len(activations) >= 8  # the input, five ReLU outputs, pooled features, logits (and pools)
    for scale, zero in activations:
        assert any(abs(float(s) - scale) <= 1e-4 * scale and int(z) == zero for s, z in ours), (
            scale,
            zero,
            sorted((float(s), int(z)) for s, z in ours),
        )


def _tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--qat"], "--qat: quantization-aware fine-tuning needs a torch factory SOURCE"),
        (["--qat-time", "2m"], "--qat-time: sets the budget of --qat; add --qat"),
    ],
)
def test_qat_on_an_onnx_source_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    source = _tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "pkg"
    assert main([str(source), "--out", str(out), *options, "-q"]) == 2
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("edge-convert: error:")
    ]
    assert len(errors) == 1 and expected in errors[0], errors
    assert "--qat" in errors[0] and not out.exists()


def test_qat_time_is_parsed_like_distill_time() -> None:
    from converters.cli import build_parser

    base = ["m.py:build", "--out", "pkg"]
    assert build_parser().parse_args([*base, "--qat", "--qat-time", "2m"]).qat_time == 120.0
    assert build_parser().parse_args([*base, "--qat", "--qat-time", "90"]).qat_time == 90.0
    assert build_parser().parse_args(base).qat is False


def test_manifest_qat_record_is_json(converted: dict[str, Any]) -> None:
    raw = json.loads((converted["qat"].root / "manifest.json").read_text())
    assert raw["metrics"]["qat"] == converted["qat"].manifest.metrics["qat"]


class _SamePaddedConv(torch.nn.Conv2d):
    """Pads in its own forward, as EfficientNet's Conv2dStaticSamePadding does (no `padding` attribute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1)))


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 1)
        self.conv = _SamePaddedConv(4, 4, 3)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        return self.head((stem + self.conv(stem)).mean(dim=(2, 3)))  # the skip needs the padded size


def test_qat_runs_a_layer_through_its_own_forward() -> None:
    """A Conv subclass that pads in forward keeps its output size under fake-quant, so a skip connection
    still adds up (EfficientNet-Lite0 failed here: 'size of tensor a (52) must match ... (54)')."""
    from converters.qat import quantization_aware_finetune

    torch.manual_seed(0)
    teacher = _Residual().eval()
    student = _Residual().eval()
    student.load_state_dict(teacher.state_dict())
    samples = [np.random.default_rng(i).normal(size=(1, 1, 8, 8)).astype(np.float32) for i in range(20)]
    scheme = resolve_profile(PROFILE).profile.quantization
    result = quantization_aware_finetune(student, teacher, samples, scheme, steps=4, batch_size=4)
    assert result.steps == 4 and type(student.conv) is _SamePaddedConv  # unwrapped again
    assert student(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
