"""Text classification: the `top_k` best labels of a sequence classifier's logits, as
`{"type": "text-classification", "top_k": [{"label", "index", "score"}]}`.

Labels come from the package's labels file, which `edge-convert` writes from the model's `id2label`.
Scores go through softmax (single-label heads) or sigmoid (`multi_label: true`), as Hugging Face's
`problem_type` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig, sigmoid, softmax

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class TextClassificationConfig(TaskConfig):
    type: Literal["text-classification"]
    multi_label: bool = False
    top_k: int = Field(default=5, ge=1)
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        top_k, output, multi_label = self.top_k, self.output, self.multi_label

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            logits = np.asarray(outputs[output], dtype=np.float64).reshape(-1)
            scores = sigmoid(logits) if multi_label else softmax(logits)
            k = min(top_k, scores.size)
            best = np.argsort(-scores, kind="stable")[:k]
            return {
                "type": "text-classification",
                "top_k": [
                    {"label": context.label(int(i)), "index": int(i), "score": round(float(scores[i]), 6)}
                    for i in best
                ],
            }

        return decode


CONFIG = TextClassificationConfig
