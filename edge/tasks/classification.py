"""Classification: the `top_k` best classes of one output, optionally through softmax or sigmoid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig, sigmoid, softmax

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class ClassificationConfig(TaskConfig):
    type: Literal["classification"]
    softmax: bool = False
    sigmoid: bool = False  # multi-label heads; softmax wins when both are set
    top_k: int = Field(default=5, ge=1)
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        top_k, output = self.top_k, self.output
        use_softmax, use_sigmoid = self.softmax, self.sigmoid

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
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
                    {"label": context.label(int(i)), "index": int(i), "score": round(float(scores[i]), 6)}
                    for i in best
                ],
            }

        return decode


CONFIG = ClassificationConfig
