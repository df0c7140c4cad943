"""Post-processing driven by the manifest: model outputs -> the prediction payload's `result` object.

`manifest.postprocess["type"]` (default: the manifest task) picks the decoder:
- classification: `top_k` (5), `softmax` (false), `sigmoid` (multi-label, false), `output` (0).
- detection: `format` `yolo` (one head [1, N, 4+C] or [1, 4+C, N], boxes `box_format` cxcywh|xyxy in input
  pixels, `objectness` for YOLOv5-style [1, N, 5+C]), `ssd` (anchor decode of [1, N, >=4] regressors and
  [1, N, C] scores; anchors from `anchors: {input_size, strides, per_cell}`, `box_scale`, `box_order`
  xywh|yxhw, `variances`) or `boxes` (already decoded normalized xyxy boxes + scores). Then score
  threshold, class-aware greedy NMS with vectorised IoU, and boxes mapped back through the Letterbox
  to 0..1 of the original frame.
- segmentation: arg-max over the class axis -> class ids, per-class pixel counts; `include_mask` adds the
  id mask (only up to `max_values` pixels).
- regression / anomaly: scores from output 0 (`threshold` flags anomalies); raw: every output as lists
  with at most `max_values` values each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge.errors import ConfigError
from edge.package import Manifest
from edge.processing.preprocess import Letterbox

PostProcessor = Callable[[list[np.ndarray], Letterbox | None], dict[str, Any]]
DEFAULT_MAX_VALUES = 4096


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def _input_hw(manifest: Manifest) -> tuple[int, int]:
    spec = manifest.inputs[0]
    dims = [d if isinstance(d, int) else 0 for d in spec.shape]
    if len(dims) != 4:
        return 1, 1
    if (spec.layout or "NCHW") == "NHWC":
        return dims[1], dims[2]
    return dims[2], dims[3]


# ---------------------------------------------------------------- classification


def classification(config: dict[str, Any], labels: Sequence[str]) -> PostProcessor:
    top_k = int(config.get("top_k", 5))
    use_softmax = bool(config.get("softmax", False))
    use_sigmoid = bool(config.get("sigmoid", False))
    output = int(config.get("output", 0))

    def post(outputs: list[np.ndarray], letterbox: Letterbox | None = None) -> dict[str, Any]:
        scores = np.asarray(outputs[output], dtype=np.float32).reshape(-1)
        if use_softmax:
            scores = softmax(scores)
        elif use_sigmoid:
            scores = sigmoid(scores)
        k = min(top_k, scores.size)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return {
            "type": "classification",
            "top_k": [
                {"label": _label(labels, int(i)), "index": int(i), "score": round(float(scores[i]), 6)}
                for i in best
            ],
        }

    return post


# ---------------------------------------------------------------- detection


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_detections: int
) -> np.ndarray:
    """Class-aware greedy NMS: indices kept, best first. Boxes of different classes are shifted apart
    so one pass handles every class; each step suppresses with one vectorised IoU row."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    shifted = boxes + (classes.astype(np.float64) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou_one_to_many(shifted[best], shifted[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def ssd_anchors(input_size: Sequence[int], strides: Sequence[int], per_cell: Sequence[int]) -> np.ndarray:
    """Anchor centres (cx, cy) and unit size, as MediaPipe's SsdAnchorsCalculator with fixed sizes:
    for each stride, every cell of the (H/stride, W/stride) grid repeats `per_cell` anchors."""
    height, width = int(input_size[0]), int(input_size[1])
    rows = []
    for stride, count in zip(strides, per_cell, strict=False):
        gh, gw = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        rows.append(np.repeat(centres, count, axis=0))
    centres = np.concatenate(rows)
    return np.concatenate([centres, np.ones_like(centres)], axis=1)


def _to_frame(boxes: np.ndarray, letterbox: Letterbox | None, input_hw: tuple[int, int]) -> np.ndarray:
    """Boxes normalized to the model input -> normalized to the original frame (through the letterbox)."""
    if letterbox is None:
        return np.clip(boxes, 0.0, 1.0)
    in_h, in_w = input_hw
    px = boxes * np.array([in_w, in_h, in_w, in_h], dtype=np.float64)
    fx = (px[:, [0, 2]] - letterbox.pad_x) / letterbox.scale_x / letterbox.width
    fy = (px[:, [1, 3]] - letterbox.pad_y) / letterbox.scale_y / letterbox.height
    return np.clip(np.stack([fx[:, 0], fy[:, 0], fx[:, 1], fy[:, 1]], axis=1), 0.0, 1.0)


def _cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    return np.stack([b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], axis=1)


def _attributes_first(shape: tuple[int, ...], extra: int, classes: int, layout: Any) -> bool:
    """Is a YOLO head [4+C, N] (v8 style) rather than [N, 4+C]? Stated, else from the class count,
    else the smaller axis holds the box attributes."""
    if layout in ("attributes_first", "channels_first"):
        return True
    if layout in ("boxes_first", "anchors_first"):
        return False
    if classes:
        if shape[1] == extra + classes:
            return False
        if shape[0] == extra + classes:
            return True
    return shape[0] < shape[1]


def detection(config: dict[str, Any], labels: Sequence[str], manifest: Manifest) -> PostProcessor:
    fmt = str(config.get("format", "yolo"))
    if fmt not in ("yolo", "ssd", "boxes"):
        raise ConfigError(f"postprocess.format: '{fmt}' is not one of yolo, ssd, boxes")
    score_threshold = float(config.get("score_threshold", 0.25))
    iou_threshold = float(config.get("iou_threshold", 0.45))
    max_detections = int(config.get("max_detections", 100))
    class_labels = list(config.get("labels", labels))
    input_hw = _input_hw(manifest)
    activation = str(config.get("score_activation", "none"))
    anchors: np.ndarray | None = None
    if fmt == "ssd":
        spec = config.get("anchors")
        if not isinstance(spec, dict):
            raise ConfigError("postprocess.anchors: the ssd format needs {input_size, strides, per_cell}")
        anchors = ssd_anchors(spec.get("input_size", input_hw), spec["strides"], spec["per_cell"])

    def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """-> (boxes normalized xyxy to the model input, class scores [N, C])."""
        if fmt == "yolo":
            head = np.asarray(outputs[0], dtype=np.float32)
            head = head.reshape(head.shape[-2], head.shape[-1])
            extra = 5 if config.get("objectness") else 4
            if _attributes_first(head.shape, extra, len(class_labels), config.get("head_layout")):
                head = head.T  # [4+C, N] -> [N, 4+C]
            raw_boxes = head[:, :4].astype(np.float64)
            scores = head[:, extra:]
            if activation == "sigmoid":
                scores = sigmoid(scores)
            if extra == 5:
                obj = sigmoid(head[:, 4:5]) if activation == "sigmoid" else head[:, 4:5]
                scores = scores * obj
            if config.get("box_format", "cxcywh") == "cxcywh":
                raw_boxes = _cxcywh_to_xyxy(raw_boxes)
            if not config.get("normalized", False):
                raw_boxes = raw_boxes / np.array([input_hw[1], input_hw[0], input_hw[1], input_hw[0]])
            return raw_boxes, scores
        if fmt == "boxes":
            boxes = np.asarray(outputs[0], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(outputs[1], dtype=np.float32).reshape(boxes.shape[0], -1)
            if config.get("box_order", "xyxy") == "yxyx":
                boxes = boxes[:, [1, 0, 3, 2]]
            return boxes, sigmoid(scores) if activation == "sigmoid" else scores
        assert anchors is not None
        reg = np.asarray(outputs[0], dtype=np.float64).reshape(anchors.shape[0], -1)
        scores = np.asarray(outputs[1], dtype=np.float32).reshape(anchors.shape[0], -1)
        if activation == "sigmoid":
            scores = sigmoid(scores)
        elif activation == "softmax":
            scores = softmax(scores)[:, 1:] if config.get("background_class", True) else softmax(scores)
        box_scale = float(config.get("box_scale", 1.0))
        var = config.get("variances", [1.0, 1.0, 1.0, 1.0])
        if config.get("box_order", "xywh") == "yxhw":
            reg = reg[:, [1, 0, 3, 2]]
        cx = reg[:, 0] / box_scale * var[0] * anchors[:, 2] + anchors[:, 0]
        cy = reg[:, 1] / box_scale * var[1] * anchors[:, 3] + anchors[:, 1]
        if config.get("log_sizes", False):
            w = np.exp(reg[:, 2] * var[2]) * anchors[:, 2]
            h = np.exp(reg[:, 3] * var[3]) * anchors[:, 3]
        else:
            w = reg[:, 2] / box_scale * var[2] * anchors[:, 2]
            h = reg[:, 3] / box_scale * var[3] * anchors[:, 3]
        return _cxcywh_to_xyxy(np.stack([cx, cy, w, h], axis=1)), scores

    def post(outputs: list[np.ndarray], letterbox: Letterbox | None = None) -> dict[str, Any]:
        boxes, scores = decode(outputs)
        classes = scores.argmax(axis=1)
        best = scores[np.arange(scores.shape[0]), classes]
        mask = best >= score_threshold
        boxes, best, classes = boxes[mask], best[mask], classes[mask]
        keep = nms(boxes, best, classes, iou_threshold, max_detections)
        frame_boxes = _to_frame(boxes[keep], letterbox, input_hw)
        return {
            "type": "detection",
            "detections": [
                {
                    "label": _label(class_labels, int(c)),
                    "index": int(c),
                    "score": round(float(s), 6),
                    "box": [round(float(v), 6) for v in b],
                }
                for b, s, c in zip(frame_boxes, best[keep], classes[keep], strict=False)
            ],
        }

    return post


# ---------------------------------------------------------------- segmentation, scores, raw


def _capped(array: np.ndarray, max_values: int) -> tuple[list[Any], bool]:
    flat = array.reshape(-1)
    truncated = flat.size > max_values
    values = flat[:max_values] if truncated else array
    return values.tolist(), truncated


def segmentation(config: dict[str, Any], labels: Sequence[str]) -> PostProcessor:
    layout = str(config.get("layout", "NCHW"))
    max_values = int(config.get("max_values", DEFAULT_MAX_VALUES))
    include_mask = bool(config.get("include_mask", False))

    def post(outputs: list[np.ndarray], letterbox: Letterbox | None = None) -> dict[str, Any]:
        out = np.asarray(outputs[int(config.get("output", 0))])
        if out.ndim == 4:
            ids = out[0].argmax(axis=0 if layout == "NCHW" else -1)
        elif out.ndim == 3 and np.issubdtype(out.dtype, np.integer):
            ids = out[0]
        elif out.ndim == 3:
            ids = out.argmax(axis=0 if layout == "NCHW" else -1)
        else:
            ids = out.astype(np.int64)
        counts = np.bincount(ids.reshape(-1).astype(np.int64))
        present = np.nonzero(counts)[0]
        result: dict[str, Any] = {
            "type": "segmentation",
            "shape": list(ids.shape),
            "classes": [
                {
                    "index": int(i),
                    "label": _label(labels, int(i)),
                    "pixels": int(counts[i]),
                    "fraction": round(float(counts[i] / ids.size), 6),
                }
                for i in present
            ],
        }
        if include_mask and ids.size <= max_values:
            result["mask"] = ids.astype(np.int64).tolist()
        return result

    return post


def scores(kind: str, config: dict[str, Any]) -> PostProcessor:
    threshold = config.get("threshold")
    reduce = str(config.get("reduce", "max"))
    max_values = int(config.get("max_values", DEFAULT_MAX_VALUES))

    def post(outputs: list[np.ndarray], letterbox: Letterbox | None = None) -> dict[str, Any]:
        values = np.asarray(outputs[int(config.get("output", 0))], dtype=np.float64)
        if kind == "regression":
            listed, truncated = _capped(values.reshape(-1), max_values)
            return {"type": "regression", "values": listed, **({"truncated": True} if truncated else {})}
        score = float(values.mean() if reduce == "mean" else values.max())
        result: dict[str, Any] = {"type": "anomaly", "score": round(score, 6)}
        if threshold is not None:
            result["threshold"] = float(threshold)
            result["anomalous"] = bool(score >= float(threshold))
        return result

    return post


def raw(config: dict[str, Any], manifest: Manifest) -> PostProcessor:
    max_values = int(config.get("max_values", DEFAULT_MAX_VALUES))
    names = [spec.name for spec in manifest.outputs]

    def post(outputs: list[np.ndarray], letterbox: Letterbox | None = None) -> dict[str, Any]:
        items = []
        for position, array in enumerate(outputs):
            data, truncated = _capped(np.asarray(array), max_values)
            item: dict[str, Any] = {
                "name": names[position] if position < len(names) else f"output{position}",
                "shape": list(np.shape(array)),
                "data": data,
            }
            if truncated:
                item["truncated"] = True
            items.append(item)
        return {"type": "raw", "outputs": items}

    return post


def make_postprocessor(manifest: Manifest, labels: Sequence[str] | None = None) -> PostProcessor:
    """The decoder the manifest asks for, as `post(outputs, letterbox) -> result`."""
    config = dict(manifest.postprocess)
    kind = str(config.get("type", manifest.task))
    labels = list(labels or [])
    if kind == "classification":
        return classification(config, labels)
    if kind == "detection":
        return detection(config, labels, manifest)
    if kind == "segmentation":
        return segmentation(config, labels)
    if kind in ("regression", "anomaly"):
        return scores(kind, config)
    if kind == "raw":
        return raw(config, manifest)
    raise ConfigError(
        f"postprocess.type: '{kind}' is not one of classification, detection, segmentation, "
        "regression, anomaly, raw"
    )
