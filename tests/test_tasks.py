"""Post-processing from the manifest (edge.tasks): typed configs checked at package load, top-k,
YOLO/YOLOX/SSD/boxes decode + NMS + letterbox, segmentation, scores, raw, and the registry itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest

from edge.errors import EdgeError, PackageError
from edge.package import MANIFEST, Manifest, load_package, parse_manifest
from edge.processing.preprocess import ImagePreprocessor
from edge.tasks import make_decoder
from edge.tasks.detection import nms
from tests.test_backends_support import classifier_package, face_detector_package


def manifest_data(
    task: str, post: dict[str, Any], shape: list[int] | None = None, layout: str = "NCHW"
) -> dict[str, Any]:
    return {
        "schema": "edge.package/1",
        "name": "m",
        "version": "1",
        "created": "2026-01-01T00:00:00Z",
        "task": task,
        "artifacts": [
            {"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}
        ],
        "inputs": [{"name": "input", "shape": shape or [1, 3, 64, 64], "dtype": "float32", "layout": layout}],
        "outputs": [{"name": "out", "shape": [1, 1]}],
        "postprocess": {"type": task, **post},
    }


def manifest(
    task: str, post: dict[str, Any], shape: list[int] | None = None, layout: str = "NCHW"
) -> Manifest:
    return Manifest.model_validate(manifest_data(task, post, shape, layout))


def test_classification_top_k_with_softmax_and_labels() -> None:
    logits = np.array([[0.5, 3.0, -1.0, 2.0]], np.float32)
    post = make_decoder(manifest("classification", {"softmax": True, "top_k": 2}), ["a", "b", "c", "d"])
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
    post = make_decoder(manifest("detection", {"format": "yolo", "iou_threshold": 0.5}), ["cat", "dog"])
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
    post = make_decoder(manifest("detection", {"format": "yolo"}), ["thing"])
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
    post = make_decoder(package.manifest, package.labels())
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
    post = make_decoder(manifest("segmentation", {"include_mask": True}), ["bg", "road", "car"])
    result = post([logits], None)
    counts = {c["label"]: c["pixels"] for c in result["classes"]}
    assert counts == {"bg": 5, "road": 10, "car": 5}
    assert result["shape"] == [4, 5] and result["mask"][3] == [2] * 5


def test_raw_is_capped_and_anomaly_thresholded() -> None:
    big = np.arange(10_000, dtype=np.float32).reshape(1, 10_000)
    result = make_decoder(manifest("raw", {"max_values": 100}))([big], None)
    assert len(result["outputs"][0]["data"]) == 100 and result["outputs"][0]["truncated"]
    anomaly = make_decoder(manifest("anomaly", {"threshold": 0.5}))
    assert anomaly([np.array([[0.7]])], None)["anomalous"] is True
    assert anomaly([np.array([[0.2]])], None)["anomalous"] is False
    regression = make_decoder(manifest("regression", {}))([np.array([[1.5, 2.5]])], None)
    assert regression == {"type": "regression", "values": [1.5, 2.5]}


def test_unknown_detection_format_is_refused_when_the_manifest_is_read() -> None:
    raw = json.dumps(manifest_data("detection", {"format": "centernet"})).encode()
    with pytest.raises(
        PackageError, match="manifest.json: postprocess.format: 'centernet' is not one of yolo, yolox"
    ):
        parse_manifest(raw, Path("pkg") / MANIFEST)


# ---------------------------------------------------------------- configs are checked when a package loads


def test_a_typo_in_postprocess_is_refused_at_package_load_naming_the_field(tmp_path: Path) -> None:
    root = classifier_package(tmp_path / "cls")
    data = json.loads((root / MANIFEST).read_text())
    data["postprocess"] = {"type": "classification", "softmax": True, "top-k": 3}
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(PackageError) as caught:
        load_package(root)
    message = str(caught.value)
    assert message == f"{root / MANIFEST}: postprocess.top-k: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("post", "field"),
    [
        ({"type": "clasification"}, "postprocess.type: 'clasification' is not one of classification,"),
        ({"type": "detection", "format": "yolox", "stride": [8]}, "postprocess.stride: Extra inputs"),
        ({"type": "detection", "format": "ssd"}, "postprocess.anchors: Field required"),
        ({"type": "detection", "box_format": "xywh"}, "postprocess.box_format: Input should be 'cxcywh'"),
        ({"type": "detection", "format": 7}, "postprocess.format: must be one of yolo, yolox, ssd, boxes"),
        ({"type": "segmentation", "layout": "NCWH"}, "postprocess.layout: Input should be 'NCHW' or 'NHWC'"),
        ({"type": "anomaly", "reduce": "median"}, "postprocess.reduce: Input should be 'max' or 'mean'"),
        ({"type": "raw", "max_values": -1}, "postprocess.max_values: Input should be greater than"),
        ([1, 2], "postprocess: Input should be a valid dictionary"),
    ],
)
def test_every_config_is_typed_and_names_the_wrong_field(post: object, field: str) -> None:
    data = manifest_data("detection", {})
    data["postprocess"] = post
    with pytest.raises(PackageError, match=f"^pkg/manifest.json: {field}"):
        parse_manifest(json.dumps(data).encode(), Path("pkg") / MANIFEST)


def test_type_defaults_to_the_task_format_to_yolo_and_the_written_shape_is_kept() -> None:
    data = manifest_data("detection", {})
    data["postprocess"] = {"score_threshold": 0.3}
    detector = Manifest.model_validate(data)
    assert (detector.postprocess.type, getattr(detector.postprocess, "format", None)) == ("detection", "yolo")
    # Only what was stated is written back: defaults stay implicit, the converter's shape stays as it was.
    assert json.loads(detector.to_json())["postprocess"] == {"score_threshold": 0.3, "type": "detection"}
    stated = {"type": "classification", "softmax": True, "top_k": 5}
    classifier = manifest("classification", stated)
    assert json.dumps(json.loads(classifier.to_json())["postprocess"]) == json.dumps(stated)
    absent = manifest_data("raw", {})
    del absent["postprocess"]
    assert Manifest.model_validate(absent).postprocess.type == "raw"


# ---------------------------------------------------------------- each detection format on a hand-built head


def test_yolox_grid_cell_gives_the_known_box() -> None:
    # 64x64 input, strides 8/16/32: 8x8 + 4x4 + 2x2 = 84 cells; stride 16, row 1, column 2 is cell 64 + 4 + 2.
    head = np.zeros((1, 84, 7), np.float32)
    head[0, 70] = [0.5, 0.25, np.log(2.0), np.log(2.0), 0.9, 0.2, 0.8]
    head[0, 3] = [0.0, 0.0, 0.0, 0.0, 0.1, 0.9, 0.9]  # objectness 0.1 keeps it under the threshold
    post = make_decoder(manifest("detection", {"format": "yolox", "strides": [8, 16, 32]}), ["a", "b"])
    (found,) = post([head], None)["detections"]
    # centre ((0.5 + 2) * 16, (0.25 + 1) * 16) = (40, 20), size exp(log 2) * 16 = 32 -> xyxy (24, 4, 56, 36)
    assert found == {
        "label": "b",
        "index": 1,
        "score": pytest.approx(0.72),
        "box": [0.375, 0.0625, 0.875, 0.5625],
    }


def test_yolox_sigmoid_scores_and_a_head_that_does_not_match_the_grid() -> None:
    head = np.full((1, 84, 6), -10.0, np.float32)
    head[0, 0, :4] = 0.0
    head[0, 0, 4:] = [2.0, 3.0]  # logits
    post = make_decoder(manifest("detection", {"format": "yolox", "score_activation": "sigmoid"}))
    (found,) = post([head], None)["detections"]
    assert found["score"] == pytest.approx(1 / (1 + np.exp(-2.0)) / (1 + np.exp(-3.0)), abs=1e-6)
    assert found["box"] == [0.0, 0.0, 0.0625, 0.0625]  # cell (0, 0) of stride 8: centre (0, 0), size 8
    with pytest.raises(
        EdgeError, match="postprocess.strides: \\[8, 16, 32\\] on a 64x64 input give 84 cells"
    ):
        post([head[:, :80]], None)


def test_yolo_with_objectness_and_xyxy_boxes() -> None:
    head = np.array([[[16, 16, 48, 32, 0.5, 0.9, 0.2], [0, 0, 8, 8, 0.9, 0.1, 0.1]]], np.float32)
    config = {"objectness": True, "box_format": "xyxy", "score_threshold": 0.3}
    result = make_decoder(manifest("detection", config), ["a", "b"])([head], None)
    assert result["detections"] == [
        {"label": "a", "index": 0, "score": pytest.approx(0.45), "box": [0.25, 0.25, 0.75, 0.5]}
    ]


def test_boxes_format_with_yxyx_order_and_sigmoid_scores() -> None:
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.1, 0.1]]], np.float32)
    scores = np.array([[[3.0, -3.0], [-5.0, -5.0]]], np.float32)
    config = {"format": "boxes", "box_order": "yxyx", "score_activation": "sigmoid"}
    result = make_decoder(manifest("detection", config), ["x", "y"])([boxes, scores], None)
    assert result["detections"] == [
        {"label": "x", "index": 0, "score": pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-6),
         "box": [0.2, 0.1, 0.6, 0.5]}
    ]  # fmt: skip


def test_ssd_decode_of_one_anchor_with_log_sizes() -> None:
    # 32x32 input, stride 16: a 2x2 grid with one anchor per cell; anchor 3 is centred at (0.75, 0.75).
    config = {
        "format": "ssd",
        "anchors": {"strides": [16], "per_cell": [1]},
        "box_scale": 32.0,
        "log_sizes": True,
        "score_activation": "softmax",
        "score_threshold": 0.9,
        "labels": ["face"],
    }
    post = make_decoder(manifest("detection", config, shape=[1, 3, 32, 32]))
    reg = np.zeros((1, 4, 4), np.float32)
    reg[0, 3] = [-8.0, 0.0, np.log(0.25), np.log(0.5)]  # centre moves by -8/32 in x; exp sizes
    scores = np.zeros((1, 4, 2), np.float32)
    scores[0, 3] = [0.0, 4.0]  # background, face
    (found,) = post([reg, scores], None)["detections"]
    assert found["label"] == "face" and found["score"] == pytest.approx(np.exp(4) / (1 + np.exp(4)), abs=1e-6)
    assert found["box"] == pytest.approx([0.5 - 0.125, 0.75 - 0.25, 0.5 + 0.125, 0.75 + 0.25])


# ---------------------------------------------------------------- the registry


def test_the_union_is_derived_from_the_task_modules() -> None:
    from edge.tasks.registry import TASKS, task_keys

    assert set(task_keys()) == {
        "classification", "detection", "segmentation", "regression", "anomaly", "raw", "embedding",
        "text-classification", "text-recognition", "voice-activity",
    }  # fmt: skip
    assert TASKS["regression"] is TASKS["anomaly"]  # one module serves both keys
    assert get_args(Manifest.model_fields["task"].annotation) == task_keys()  # the manifest's task choices


def test_a_new_task_is_one_new_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import edge.tasks
    from edge.tasks import registry

    (tmp_path / "echo.py").write_text(
        "from typing import Literal\n"
        "from edge.tasks.base import TaskConfig\n"
        "class EchoConfig(TaskConfig):\n"
        "    type: Literal['echo']\n"
        "    times: int = 1\n"
        "    def decoder(self, context):\n"
        "        return lambda outputs, letterbox: {'type': 'echo', 'times': self.times}\n"
        "CONFIG = EchoConfig\n"
    )
    monkeypatch.setattr(edge.tasks, "__path__", [*edge.tasks.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "edge.tasks.echo", raising=False)
    try:
        found = registry._discover()
    finally:
        sys.modules.pop("edge.tasks.echo", None)
    assert getattr(found["echo"], "__name__", None) == "EchoConfig"
    assert {"classification", "detection"} < set(found)
