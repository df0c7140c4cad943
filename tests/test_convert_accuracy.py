"""The gate's measures on real arrays: agreement, cosine/SNR, box mAP against fp32, sample loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.accuracy import (
    average_precision,
    classification,
    cosine,
    decode_detections,
    evaluate,
    raw,
    snr_db,
)
from converters.calibration import load_samples, resolve_input_specs
from edge.errors import ConfigError
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


def test_box_map_against_fp32() -> None:
    boxes = np.array([[10, 10, 50, 50, 0.9, 1], [60, 60, 100, 120, 0.8, 2], [0, 0, 5, 5, 0.1, 1]], np.float32)
    reference = [[boxes[None]]]
    assert (
        average_precision(
            [decode_detections(r) for r in reference], [decode_detections(r, 0.05) for r in reference]
        )
        == 1.0
    )
    shifted = boxes.copy()
    shifted[1, :4] += 30  # the second box moves off its object
    evaluation = evaluate("detection", reference, [[shifted[None]]])
    assert evaluation.details["map50_vs_fp32"] == pytest.approx(0.5)
    assert evaluation.drop_points == pytest.approx(50.0)
    # boxes + per-class scores layout
    two = [
        np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]], np.float32),
        np.array([[[0.9, 0.05], [0.1, 0.7]]], np.float32),
    ]
    truth = decode_detections(two)
    assert list(truth[2]) == [0, 1]


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
