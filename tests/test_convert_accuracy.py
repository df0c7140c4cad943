"""The gate's measures on real arrays: agreement, cosine/SNR, box mAP against fp32 (decoded by the
runtime's own decoder, on a real ONNX detector), sample loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.accuracy import (
    BORDERLINE,
    DetectionGate,
    average_precision,
    classification,
    cosine,
    detections,
    evaluate,
    raw,
    run_onnx,
    snr_db,
)
from converters.calibration import load_samples, resolve_input_specs
from converters.cli import main
from edge.errors import ConfigError
from edge.package import Manifest, load_package
from edge.tasks import make_decoder
from edge.tasks.base import Decoder, DecoderContext
from edge.tasks.detection import YoloConfig
from tests.assets_models import photo_crops, write_photo_folder


def test_classification_agreement_and_confident_subset() -> None:
    rng = np.random.default_rng(0)
    reference = []
    for index in range(20):
        logits = rng.standard_normal((1, 10)).astype(np.float32)
        logits[0, index % 10] += 8.0 if index < 10 else 0.0  # the first ten are confident
        reference.append([logits])
    candidate = [[r[0].copy()] for r in reference]
    for index in (12, 15):  # flip two unsure samples only
        candidate[index][0][0, np.argsort(reference[index][0][0])[-2]] += 50.0
    result = classification(reference, candidate)
    assert result.details["agreement_top1"] == pytest.approx(0.9)
    assert result.details["confident_samples"] >= 10
    assert result.metric == "expected_top1_drop"
    probabilities = [np.exp(r[0][0]) / np.exp(r[0][0]).sum() for r in reference]
    expected = (
        sum(p.max() - p[int(np.argmax(c[0]))] for p, c in zip(probabilities, candidate, strict=True)) / 20
    )
    assert result.drop_points == pytest.approx(100 * expected)
    assert 0 < result.drop_points < 100 * 2 / 20  # flips of unsure answers cost less than whole samples
    truth = [int(np.argmax(r[0])) for r in reference]
    labelled = classification(reference, candidate, truth)
    assert labelled.metric == "top1_accuracy" and labelled.drop_points == pytest.approx(10.0)


def test_cosine_and_snr_track_noise() -> None:
    rng = np.random.default_rng(1)
    signal = rng.standard_normal(1000).astype(np.float32)
    small = signal + 0.01 * rng.standard_normal(1000).astype(np.float32)
    large = signal + 0.5 * rng.standard_normal(1000).astype(np.float32)
    assert cosine(signal, signal) == pytest.approx(1.0)
    assert cosine(signal, small) > cosine(signal, large)
    assert snr_db(signal, small) == pytest.approx(40.0, abs=1.0)
    assert snr_db(signal, large) == pytest.approx(6.0, abs=1.0)
    evaluation = raw([[signal]], [[large]])
    assert evaluation.metric == "output_cosine" and evaluation.drop_points > 5


def _decoder(post: dict[str, Any], size: int = 32, labels: list[str] | None = None) -> Decoder:
    """The runtime decoder (edge.tasks.make_decoder) of a package with this input size and postprocess."""
    manifest = Manifest.model_validate(
        {
            "schema": "edge.package/1",
            "name": "det",
            "version": "1",
            "created": "2026-01-01T00:00:00Z",
            "task": "detection",
            "artifacts": [
                {"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}
            ],
            "inputs": [{"name": "input", "shape": [1, 3, size, size], "layout": "NCHW"}],
            "outputs": [{"name": "head", "shape": [1, 8, 6]}],
            "postprocess": post,
        }
    )
    return make_decoder(manifest, labels)


# A YOLO head [1, N, 4+C] on a 32x32 input: cx, cy, w, h in input pixels, then two class scores. Read as
# x1,y1,x2,y2 (the old gate's assumption) the second and third boxes have no area, so fp32 dropped 50
# points against itself.
HEAD = np.array(
    [
        [8, 8, 10, 10, 0.9, 0.05],
        [24, 10, 8, 12, 0.05, 0.8],
        [16, 24, 12, 8, 0.7, 0.1],
        *[[4 * i, 28, 4, 4, 0.02, 0.03] for i in range(1, 6)],  # under every threshold
    ],
    np.float32,
)


def tiny_detector(path: Path, head: np.ndarray = HEAD, seed: int = 0) -> Path:
    """A real ONNX detector: one full-image Conv whose bias is the head above and whose small weights make
    every image move the boxes and scores a little; reshaped to [1, N, 6]."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    rows, columns = head.shape
    scale = np.where(np.arange(columns) < 4, 0.01, 0.0005).astype(np.float32)
    weights = (
        rng.normal(0, 1, (rows, columns, 3, 32, 32)).astype(np.float32) * scale[None, :, None, None, None]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="head_conv"),
            helper.make_node("Reshape", ["conv", "shape"], ["head"], name="to_rows"),
        ],
        "tiny_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, [1, rows, columns])],
        [
            numpy_helper.from_array(weights.reshape(rows * columns, 3, 32, 32), "w"),
            numpy_helper.from_array(head.reshape(-1).astype(np.float32), "b"),
            numpy_helper.from_array(np.array([1, rows, columns], np.int64), "shape"),
        ],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _photo_feeds(count: int) -> list[dict[str, np.ndarray]]:
    crops = photo_crops(count, 32)
    return [{"input": ((c[None].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2).copy()} for c in crops]


def test_fp32_detector_passes_its_own_gate_and_a_candidate_that_loses_boxes_does_not(tmp_path: Path) -> None:
    feeds = _photo_feeds(6)
    reference = run_onnx(tiny_detector(tmp_path / "fp32.onnx"), feeds)
    decoder = _decoder({"type": "detection", "score_threshold": 0.3, "iou_threshold": 0.5})
    assert [len(detections(decoder(s, None))[0]) for s in reference] == [3] * 6
    itself = evaluate("detection", reference, reference, decoder=decoder)
    assert itself.metric == "box_map50_vs_fp32"
    assert itself.details["map50_vs_fp32"] == 1.0 and itself.drop_points == 0.0

    damaged = HEAD.copy()
    damaged[1, 0] += 12  # the class-1 box moves off its object
    damaged[2, 4] = 0.1  # the second class-0 box falls under the score threshold
    candidate = run_onnx(tiny_detector(tmp_path / "damaged.onnx", damaged), feeds)
    worse = evaluate("detection", reference, candidate, decoder=decoder)
    # class 0: every kept box right but half of them lost (AP 0.5); class 1: every box wrong (AP 0)
    assert worse.details["map50_vs_fp32"] == pytest.approx(0.25)
    assert worse.drop_points == pytest.approx(75.0)


def _gate(threshold: float) -> DetectionGate:
    context = DecoderContext(input_hw=(32, 32), output_names=("head",))
    gate = DetectionGate.of(
        YoloConfig(type="detection", score_threshold=threshold, iou_threshold=0.5), context
    )
    assert gate is not None
    return gate


def test_the_gate_forgives_borderline_scores_but_not_boxes_that_fade(tmp_path: Path) -> None:
    """fp32's own box at 0.32 that int8 scores 0.28 is too close to call; scores that all sink under the
    threshold are lost boxes, which a threshold-free (ranked) mAP would not see."""
    feeds = _photo_feeds(6)
    gate = _gate(0.3)
    borderline = HEAD.copy()
    borderline[2, 4] = 0.3 + BORDERLINE / 2  # fp32's third box, just over the threshold
    reference = run_onnx(tiny_detector(tmp_path / "fp32.onnx", borderline), feeds)
    itself = gate.evaluate(reference, reference)
    assert itself.drop_points == 0.0
    assert itself.details["map50_at_threshold"] == itself.details["map50_ranked"] == 1.0

    flipped = borderline.copy()
    flipped[2, 4] = 0.3 - BORDERLINE / 2  # int8 puts it just under: the device would not publish it
    near = gate.evaluate(reference, run_onnx(tiny_detector(tmp_path / "near.onnx", flipped), feeds))
    assert near.details["map50_vs_fp32"] == 1.0 and near.drop_points == 0.0
    assert near.details["map50_at_threshold"] < 1.0  # cut hard, the flip would count as a miss

    faded = borderline.copy()
    faded[:3, 4:] *= 0.25  # every score falls well under the threshold, the ranking stays
    lost = gate.evaluate(reference, run_onnx(tiny_detector(tmp_path / "faded.onnx", faded), feeds))
    assert lost.details["map50_vs_fp32"] == 0.0 and lost.drop_points == 100.0
    assert lost.details["map50_ranked"] > 0.99  # what COCO-style ranking alone would have passed


def test_borderline_band_counts_clear_boxes_only() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    clear = (box, np.array([0.9]), np.array([0]))
    found = (box, np.array([0.27]), np.array([0]))  # in the band under the threshold 0.3: still found
    assert average_precision([clear], [found], band=(0.25, 0.35)) == 1.0
    assert average_precision([clear], [found]) == 1.0  # no band: any score ranks
    missed = (box, np.array([0.2]), np.array([0]))
    assert average_precision([clear], [missed], band=(0.25, 0.35)) == 0.0
    unsure = (box, np.array([0.32]), np.array([0]))  # fp32 itself is borderline: nothing to find or miss
    nothing = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    assert average_precision([unsure, clear], [nothing, clear], band=(0.25, 0.35)) == 1.0
    stray = (np.array([[20.0, 20.0, 30.0, 30.0]]), np.array([0.5]), np.array([0]))
    assert (
        average_precision(
            [clear],
            [(np.concatenate([box, stray[0]]), np.array([0.9, 0.95]), np.array([0, 0]))],
            band=(0.25, 0.35),
        )
        == 0.5
    )


def test_detection_gate_needs_the_package_decoder() -> None:
    with pytest.raises(ValueError, match="decoder="):
        evaluate("detection", [[HEAD[None]]], [[HEAD[None]]])


def test_box_map_with_the_boxes_format() -> None:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 1.0, 0.9], [0.0, 0.0, 0.05, 0.05]]], np.float32)
    scores = np.array([[[0.9, 0.0, 0.0], [0.0, 0.0, 0.8], [0.1, 0.0, 0.0]]], np.float32)
    decoder = _decoder({"type": "detection", "format": "boxes", "score_threshold": 0.3})
    truth = detections(decoder([boxes, scores], None))
    assert list(truth[2]) == [0, 2] and truth[1].tolist() == pytest.approx([0.9, 0.8])
    assert average_precision([truth], [truth]) == 1.0
    shifted = boxes.copy()
    shifted[0, 1] -= 0.5  # the second box moves off its object
    evaluation = evaluate("detection", [[boxes, scores]], [[shifted, scores]], decoder=decoder)
    assert evaluation.details["map50_vs_fp32"] == pytest.approx(0.5)
    assert evaluation.drop_points == pytest.approx(50.0)


def test_edge_convert_gates_a_detector_with_the_runtime_decoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_detector(tmp_path / "det.onnx")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in _photo_feeds(16)]))
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "--task", "detection",
         "--formats", "onnx", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    assert json.loads(manifest.to_json())["postprocess"] == {
        "type": "detection",
        "score_threshold": 0.3,
        "iou_threshold": 0.5,
    }
    assert manifest.metrics["fp32"]["map50_vs_fp32"] == 1.0
    assert manifest.metrics["gate"]["metric"] == "box_map50_vs_fp32" and manifest.metrics["gate"]["passed"]
    assert manifest.metrics["int8"]["map50_vs_fp32"] >= 0.9


def test_image_folder_goes_through_the_runtime_preprocessing(tmp_path: Path) -> None:
    from edge.processing.preprocess import ImagePreprocessor

    folder = write_photo_folder(tmp_path / "photos", 5, size=80)
    specs = resolve_input_specs(
        [], input_shape=[1, 3, 64, 64], layout=None, color=None, mean=None, std=None, resize="center-crop"
    )
    samples = load_samples(folder, specs, "--calib")
    assert len(samples) == 5 and samples.feeds[0]["input"].shape == (1, 3, 64, 64)
    expected, _ = ImagePreprocessor.from_spec(specs[0])(photo_crops(5, 80)[0])
    np.testing.assert_allclose(samples.feeds[0]["input"], expected, atol=1 / 128 + 1e-6)  # PNG is lossless
    first, held_out = samples.split(0.25)
    assert len(first) == 4 and len(held_out) == 1


def test_labelled_folder_and_nhwc(tmp_path: Path) -> None:
    import cv2

    for label, crop in zip(["cat", "cup", "cat"], photo_crops(3, 40), strict=True):
        (tmp_path / "eval" / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(tmp_path / "eval" / label / f"{len(list((tmp_path / 'eval').rglob('*.png')))}.png"), crop
        )
    specs = resolve_input_specs(
        [],
        input_shape=[1, 32, 32, 3],
        layout=None,
        color="BGR",
        mean=[0, 0, 0],
        std=[255, 255, 255],
        resize="stretch",
    )
    assert specs[0].layout == "NHWC"
    samples = load_samples(tmp_path / "eval", specs, "--eval", labels=["dog", "cat", "cup"])
    assert sorted(samples.labels or []) == [1, 1, 2]
    assert samples.feeds[0]["input"].shape == (1, 32, 32, 3) and samples.feeds[0]["input"].max() <= 1.0


def test_multi_input_model_needs_npz(tmp_path: Path) -> None:
    from edge.package import TensorSpec

    declared = [TensorSpec(name="a", shape=[1, 3, 8, 8]), TensorSpec(name="b", shape=[1, 4])]
    specs = resolve_input_specs(
        declared, input_shape=None, layout=None, color=None, mean=None, std=None, resize="stretch"
    )
    folder = write_photo_folder(tmp_path / "p", 2, size=16)
    with pytest.raises(ConfigError, match="has 2 inputs"):
        load_samples(folder, specs, "--calib")
    np.savez(tmp_path / "s.npz", a=np.zeros((3, 3, 8, 8), np.float32), b=np.ones((3, 4), np.float32))
    samples = load_samples(tmp_path / "s.npz", specs, "--calib")
    assert len(samples) == 3 and samples.feeds[2]["b"].shape == (1, 4)
    np.savez(tmp_path / "uneven.npz", a=np.zeros((3, 3, 8, 8), np.float32), b=np.ones((2, 4), np.float32))
    with pytest.raises(ConfigError, match="same, non-zero number of samples"):
        load_samples(tmp_path / "uneven.npz", specs, "--calib")


def test_gate_limits_bound_agreement_beside_the_drop() -> None:
    from converters.accuracy import Evaluation, GateLimits

    def evaluation(drop: float, agreement: float, confident: float) -> Evaluation:
        details = {"agreement_top1": agreement, "agreement_top1_confident": confident}
        return Evaluation("expected_top1_drop", drop, details)

    plain = GateLimits(1.0)
    assert plain.passes(evaluation(0.9, 0.5, 0.5)) and str(plain) == "--max-drop 1"
    assert plain.miss(evaluation(1.5, 1.0, 1.0)) == "drops 1.50 points of expected_top1_drop (--max-drop 1)"
    floors = GateLimits(1.0, min_agreement=0.9, min_confident_agreement=0.99)
    assert floors.passes(evaluation(0.9, 0.9, 0.99))
    assert floors.miss(evaluation(0.2, 0.75, 1.0)) == (
        "agrees with fp32 on 0.750 of its top-1 answers (--min-agreement 0.9)"
    )
    assert floors.miss(evaluation(0.2, 0.95, 0.98)) == (
        "agrees with fp32 on 0.980 of its confident top-1 answers (--min-confident-agreement 0.99)"
    )
    assert floors.passes(evaluation(0.2, 0.95, float("nan")))  # no confident sample: none to disagree on
    assert str(floors) == "--max-drop 1, --min-agreement 0.9, --min-confident-agreement 0.99"
