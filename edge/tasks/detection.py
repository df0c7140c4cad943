"""Detection: one config per head format, all sharing thresholds, NMS and the mapping back to the frame.

Every format turns the model outputs into (boxes as normalized xyxy of the model input, class scores
[N, C]); then the shared part keeps scores >= `score_threshold`, runs class-aware greedy NMS and maps the
boxes through the Letterbox to 0..1 of the original frame. Formats (`format`, default `yolo`):
- `yolo`: one head [1, N, 4+C] or [1, 4+C, N] of boxes (`box_format` cxcywh|xyxy, input pixels unless
  `normalized`) and class scores; `objectness` for YOLOv5-style [1, N, 5+C].
- `yolox`: raw grid outputs [1, N, 5+C] over the cells of every stride (row-major, strides in order):
  box = ((tx + grid_x) * stride, (ty + grid_y) * stride, exp(tw) * stride, exp(th) * stride) cxcywh in
  input pixels, score = objectness * class score (already sigmoided by most exports).
- `ssd`: anchor decode of [1, N, >=4] regressors and [1, N, C] scores (MediaPipe-style anchors).
- `boxes`: already decoded normalized xyxy (or yxyx) boxes beside scores.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge.errors import ConfigError
from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig, Variants, sigmoid, softmax

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox

# outputs -> (boxes normalized xyxy to the model input [N, 4], class scores [N, C])
HeadDecoder = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `boxes` [N, 4]."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.asarray(inter / np.maximum(area + areas - inter, 1e-12))


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


def to_frame(boxes: np.ndarray, letterbox: Letterbox | None, input_hw: tuple[int, int]) -> np.ndarray:
    """Boxes normalized to the model input -> normalized to the original frame (through the letterbox)."""
    if letterbox is None:
        return np.clip(boxes, 0.0, 1.0)
    in_h, in_w = input_hw
    px = boxes * np.array([in_w, in_h, in_w, in_h], dtype=np.float64)
    fx = (px[:, [0, 2]] - letterbox.pad_x) / letterbox.scale_x / letterbox.width
    fy = (px[:, [1, 3]] - letterbox.pad_y) / letterbox.scale_y / letterbox.height
    return np.clip(np.stack([fx[:, 0], fy[:, 0], fx[:, 1], fy[:, 1]], axis=1), 0.0, 1.0)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    return np.stack([b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], axis=1)


def _pixels(input_hw: tuple[int, int]) -> np.ndarray:
    return np.array([input_hw[1], input_hw[0], input_hw[1], input_hw[0]])


class DetectionConfig(TaskConfig):
    """What every format shares; `format` picks the subclass."""

    type: Literal["detection"]
    format: str
    score_threshold: float = 0.25
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=0)
    labels: list[str] | None = None  # overrides the package's labels.txt

    @abstractmethod
    def head(self, context: DecoderContext) -> HeadDecoder:
        """The format's own part, built once per package."""

    def decoder(self, context: DecoderContext) -> Decoder:
        head = self.head(context)
        labels = self.labels if self.labels is not None else context.labels
        score_threshold, iou_threshold = self.score_threshold, self.iou_threshold
        max_detections, input_hw = self.max_detections, context.input_hw

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            boxes, scores = head(outputs)
            classes = scores.argmax(axis=1)
            best = scores[np.arange(scores.shape[0]), classes]
            mask = best >= score_threshold
            boxes, best, classes = boxes[mask], best[mask], classes[mask]
            keep = nms(boxes, best, classes, iou_threshold, max_detections)
            frame_boxes = to_frame(boxes[keep], letterbox, input_hw)
            return {
                "type": "detection",
                "detections": [
                    {
                        "label": context.label(int(c), labels),
                        "index": int(c),
                        "score": round(float(s), 6),
                        "box": [round(float(v), 6) for v in b],
                    }
                    for b, s, c in zip(frame_boxes, best[keep], classes[keep], strict=False)
                ],
            }

        return decode


def _attributes_first(shape: tuple[int, ...], extra: int, classes: int, layout: str | None) -> bool:
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


class YoloConfig(DetectionConfig):
    format: Literal["yolo"] = "yolo"
    objectness: bool = False
    head_layout: Literal["attributes_first", "channels_first", "boxes_first", "anchors_first"] | None = None
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh"
    normalized: bool = False
    score_activation: Literal["none", "sigmoid"] = "none"

    def head(self, context: DecoderContext) -> HeadDecoder:
        extra = 5 if self.objectness else 4
        classes = len(self.labels if self.labels is not None else context.labels)
        use_sigmoid = self.score_activation == "sigmoid"
        pixels = None if self.normalized else _pixels(context.input_hw)

        def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            head = np.asarray(outputs[0], dtype=np.float32)
            head = head.reshape(head.shape[-2], head.shape[-1])
            if _attributes_first(head.shape, extra, classes, self.head_layout):
                head = head.T  # [4+C, N] -> [N, 4+C]
            boxes = head[:, :4].astype(np.float64)
            scores = head[:, extra:]
            if use_sigmoid:
                scores = sigmoid(scores)
            if extra == 5:
                scores = scores * (sigmoid(head[:, 4:5]) if use_sigmoid else head[:, 4:5])
            if self.box_format == "cxcywh":
                boxes = cxcywh_to_xyxy(boxes)
            if pixels is not None:
                boxes = boxes / pixels
            return boxes, scores

        return decode


class YoloxConfig(DetectionConfig):
    format: Literal["yolox"]
    strides: list[int] = Field(default=[8, 16, 32], min_length=1)
    score_activation: Literal["none", "sigmoid"] = "none"

    def head(self, context: DecoderContext) -> HeadDecoder:
        in_h, in_w = context.input_hw
        if any(s <= 0 for s in self.strides) or min(in_h, in_w) < max(self.strides):
            raise ConfigError(f"postprocess.strides: {self.strides} do not tile a {in_h}x{in_w} input")
        cells, cell_strides = [], []
        for stride in self.strides:
            rows, cols = in_h // stride, in_w // stride
            ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
            cell_strides.append(np.full(rows * cols, stride))
        grid = np.concatenate(cells).astype(np.float64)
        stride_of = np.concatenate(cell_strides).astype(np.float64)[:, None]
        pixels = _pixels(context.input_hw)
        use_sigmoid = self.score_activation == "sigmoid"
        strides = self.strides

        def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            head = np.asarray(outputs[0], dtype=np.float64)
            head = head.reshape(-1, head.shape[-1])
            if head.shape[0] != grid.shape[0]:
                raise ConfigError(
                    f"postprocess.strides: {strides} on a {in_h}x{in_w} input give {grid.shape[0]} cells, "
                    f"the head has {head.shape[0]} rows"
                )
            centres = (head[:, :2] + grid) * stride_of
            sizes = np.exp(np.minimum(head[:, 2:4], 80.0)) * stride_of
            objectness, scores = head[:, 4:5], head[:, 5:]
            if use_sigmoid:
                objectness, scores = sigmoid(objectness), sigmoid(scores)
            boxes = cxcywh_to_xyxy(np.concatenate([centres, sizes], axis=1)) / pixels
            return boxes, scores * objectness

        return decode


class SsdAnchors(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: list[int] | None = Field(default=None, min_length=2, max_length=2)  # default: the input
    strides: list[int] = Field(min_length=1)
    per_cell: list[int] = Field(min_length=1)


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


class SsdConfig(DetectionConfig):
    format: Literal["ssd"]
    anchors: SsdAnchors
    box_scale: float = 1.0
    box_order: Literal["xywh", "yxhw"] = "xywh"
    variances: list[float] = Field(default=[1.0, 1.0, 1.0, 1.0], min_length=4, max_length=4)
    log_sizes: bool = False
    score_activation: Literal["none", "sigmoid", "softmax"] = "none"
    background_class: bool = True  # with softmax: class 0 is background and dropped

    def head(self, context: DecoderContext) -> HeadDecoder:
        spec = self.anchors
        anchors = ssd_anchors(spec.input_size or context.input_hw, spec.strides, spec.per_cell)
        activation, var, box_scale = self.score_activation, self.variances, self.box_scale

        def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            reg = np.asarray(outputs[0], dtype=np.float64).reshape(anchors.shape[0], -1)
            scores = np.asarray(outputs[1], dtype=np.float32).reshape(anchors.shape[0], -1)
            if activation == "sigmoid":
                scores = sigmoid(scores)
            elif activation == "softmax":
                scores = softmax(scores)[:, 1:] if self.background_class else softmax(scores)
            if self.box_order == "yxhw":
                reg = reg[:, [1, 0, 3, 2]]
            cx = reg[:, 0] / box_scale * var[0] * anchors[:, 2] + anchors[:, 0]
            cy = reg[:, 1] / box_scale * var[1] * anchors[:, 3] + anchors[:, 1]
            if self.log_sizes:
                w = np.exp(reg[:, 2] * var[2]) * anchors[:, 2]
                h = np.exp(reg[:, 3] * var[3]) * anchors[:, 3]
            else:
                w = reg[:, 2] / box_scale * var[2] * anchors[:, 2]
                h = reg[:, 3] / box_scale * var[3] * anchors[:, 3]
            return cxcywh_to_xyxy(np.stack([cx, cy, w, h], axis=1)), scores

        return decode


class BoxesConfig(DetectionConfig):
    format: Literal["boxes"]
    box_order: Literal["xyxy", "yxyx"] = "xyxy"
    score_activation: Literal["none", "sigmoid"] = "none"

    def head(self, context: DecoderContext) -> HeadDecoder:
        use_sigmoid, yxyx = self.score_activation == "sigmoid", self.box_order == "yxyx"

        def decode(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            boxes = np.asarray(outputs[0], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(outputs[1], dtype=np.float32).reshape(boxes.shape[0], -1)
            if yxyx:
                boxes = boxes[:, [1, 0, 3, 2]]
            return boxes, sigmoid(scores) if use_sigmoid else scores

        return decode


CONFIG = Variants(field="format", default="yolo", configs=(YoloConfig, YoloxConfig, SsdConfig, BoxesConfig))
