"""Segmentation: arg-max over the class axis -> class ids and per-class pixel counts; `include_mask` adds
the id mask itself while it holds at most `max_values` pixels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import DEFAULT_MAX_VALUES, Decoder, DecoderContext, Result, TaskConfig

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class SegmentationConfig(TaskConfig):
    type: Literal["segmentation"]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    max_values: int = Field(default=DEFAULT_MAX_VALUES, ge=0)
    include_mask: bool = False
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        class_axis = 0 if self.layout == "NCHW" else -1
        output, include_mask, max_values = self.output, self.include_mask, self.max_values

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            out = np.asarray(outputs[output])
            if out.ndim == 4:
                ids = out[0].argmax(axis=class_axis)
            elif out.ndim == 3 and np.issubdtype(out.dtype, np.integer):
                ids = out[0]
            elif out.ndim == 3:
                ids = out.argmax(axis=class_axis)
            else:
                ids = out.astype(np.int64)
            counts = np.bincount(ids.reshape(-1).astype(np.int64))
            present = np.nonzero(counts)[0]
            result: Result = {
                "type": "segmentation",
                "shape": list(ids.shape),
                "classes": [
                    {
                        "index": int(i),
                        "label": context.label(int(i)),
                        "pixels": int(counts[i]),
                        "fraction": round(float(counts[i] / ids.size), 6),
                    }
                    for i in present
                ],
            }
            if include_mask and ids.size <= max_values:
                result["mask"] = ids.astype(np.int64).tolist()
            return result

        return decode


CONFIG = SegmentationConfig
