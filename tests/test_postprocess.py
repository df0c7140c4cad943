"""Post-processing from the manifest: top-k, YOLO/SSD decode + NMS + letterbox, segmentation, raw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.package import Manifest, load_package
from edge.processing.postprocess import make_postprocessor, nms
from edge.processing.preprocess import ImagePreprocessor
from tests.test_backends_support import face_detector_package


def manifest(
    task: str, post: dict[str, Any], shape: list[int] | None = None, layout: str = "NCHW"
) -> Manifest:
    return Manifest.model_validate(
        {
            "schema": "edge.package/1",
            "name": "m",
            "version": "1",
            "created": "2026-01-01T00:00:00Z",
            "task": task,
            "artifacts": [
                {"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}
            ],
            "inputs": [
                {"name": "input", "shape": shape or [1, 3, 64, 64], "dtype": "float32", "layout": layout}
            ],
            "outputs": [{"name": "out", "shape": [1, 1]}],
            "postprocess": {"type": task, **post},
        }
    )


def test_classification_top_k_with_softmax_and_labels() -> None:
    logits = np.array([[0.5, 3.0, -1.0, 2.0]], np.float32)
    post = make_postprocessor(manifest("classification", {"softmax": True, "top_k": 2}), ["a", "b", "c", "d"])
    result = post([logits], None)
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert [r["label"] for r in result["top_k"]] == ["b", "d"]
    assert result["top_k"][0]["score"] == pytest.approx(probs[1], abs=1e-6)
    assert result["top_k"][1]["index"] == 3


def _yolo_head() -> np.ndarray:
    # Two overlapping boxes of class 0, one box of class 1 overlapping them, one low-score box. cx,cy,w,h px.
    rows = [
        [32, 32, 20, 20, 0.9, 0.1],
        [33, 33, 20, 20, 0.8, 0.1],
        [32, 32, 20, 20, 0.1, 0.7],
        [10, 10, 4, 4, 0.05, 0.1],
    ]
    return np.array([rows], np.float32)


@pytest.mark.parametrize("transpose", [False, True])
def test_yolo_decode_nms_is_class_aware_in_both_layouts(transpose: bool) -> None:
    head = _yolo_head()
    if transpose:
        head = head.transpose(0, 2, 1)  # [1, 4+C, N]
    post = make_postprocessor(manifest("detection", {"format": "yolo", "iou_threshold": 0.5}), ["cat", "dog"])
    result = post([head], None)
    got = [(d["label"], d["score"]) for d in result["detections"]]
    assert got == [("cat", pytest.approx(0.9)), ("dog", pytest.approx(0.7))]
    assert result["detections"][0]["box"] == pytest.approx([22 / 64, 22 / 64, 42 / 64, 42 / 64])


def test_boxes_map_back_through_a_real_letterbox() -> None:
    spec = manifest("detection", {}).inputs[0].model_copy(update={"resize": "letterbox", "color": "RGB"})
    frame = np.zeros((100, 200, 3), np.uint8)  # wide frame: bars above and below
    _, letterbox = ImagePreprocessor.from_spec(spec)(frame)
    # The model sees the frame scaled by 0.32 and shifted down by 16 px; a box covering the whole image area:
    head = np.array([[[32, 32, 64, 32, 0.9]]], np.float32)
    post = make_postprocessor(manifest("detection", {"format": "yolo"}), ["thing"])
    box = post([head], letterbox)["detections"][0]["box"]
    assert box == pytest.approx([0.0, 0.0, 1.0, 1.0], abs=0.02)


def test_nms_matches_a_plain_greedy_reference() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (200, 2))], axis=1)
    scores = rng.uniform(0, 1, 200)
    classes = rng.integers(0, 3, 200)
    fast = nms(boxes, scores, classes, 0.5, 1000).tolist()

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    reference: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(classes[i] != classes[k] or iou(boxes[i], boxes[k]) <= 0.5 for k in reference):
            reference.append(int(i))
    assert fast == reference


def test_ssd_anchor_decode_finds_the_face_in_a_real_detector_output(tmp_path: Path, cache_dir: Path) -> None:
    package = load_package(face_detector_package(tmp_path / "face", cache_dir))
    outputs = np.load(package.root / "golden/outputs.npz")
    post = make_postprocessor(package.manifest, package.labels())
    result = post([outputs["regressors"], outputs["classificators"]], None)
    faces = result["detections"]
    assert len(faces) == 1 and faces[0]["label"] == "face" and faces[0]["score"] > 0.5
    x1, y1, x2, y2 = faces[0]["box"]
    # skimage's astronaut: the face sits in the upper middle of the photo.
    assert 0.3 < (x1 + x2) / 2 < 0.65 and 0.1 < (y1 + y2) / 2 < 0.45 and 0.05 < x2 - x1 < 0.5


def test_segmentation_argmax_and_counts() -> None:
    logits = np.zeros((1, 3, 4, 5), np.float32)
    logits[0, 1, :2] = 5.0  # top half class 1
    logits[0, 2, 3, :] = 5.0  # last row class 2
    post = make_postprocessor(manifest("segmentation", {"include_mask": True}), ["bg", "road", "car"])
    result = post([logits], None)
    counts = {c["label"]: c["pixels"] for c in result["classes"]}
    assert counts == {"bg": 5, "road": 10, "car": 5}
    assert result["shape"] == [4, 5] and result["mask"][3] == [2] * 5


def test_raw_is_capped_and_anomaly_thresholded() -> None:
    big = np.arange(10_000, dtype=np.float32).reshape(1, 10_000)
    result = make_postprocessor(manifest("raw", {"max_values": 100}))([big], None)
    assert len(result["outputs"][0]["data"]) == 100 and result["outputs"][0]["truncated"]
    anomaly = make_postprocessor(manifest("anomaly", {"threshold": 0.5}))
    assert anomaly([np.array([[0.7]])], None)["anomalous"] is True
    assert anomaly([np.array([[0.2]])], None)["anomalous"] is False
    regression = make_postprocessor(manifest("regression", {}))([np.array([[1.5, 2.5]])], None)
    assert regression == {"type": "regression", "values": [1.5, 2.5]}


def test_unknown_detection_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="postprocess.format: 'centernet'"):
        make_postprocessor(manifest("detection", {"format": "centernet"}))
