"""Text recognition: a line recognizer's per-step class scores decoded by CTC greedy decoding, as
`{"type": "text-recognition", "text": "...", "confidence": 0.97}`.

The labels file is the charset, one entry per class index (`edge-convert --labels charset.json` keeps
entries such as ' ' and the blank '' exactly). Greedy CTC: the best class at every step, consecutive
repeats merged, the `blank` class dropped. `confidence` is the mean, over the kept steps, of the best
class's softmax probability (1.0 for an empty text). The output is `[T, N, C]` (`layout: TNC`, as
PyTorch's CTC loss takes it), `[N, T, C]` (`NTC`), or `auto`: the axis of size 1 beside the classes'
is the batch (ddddocr's rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig, softmax

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class TextRecognitionConfig(TaskConfig):
    type: Literal["text-recognition"]
    blank: int = Field(default=0, ge=0)
    layout: Literal["auto", "TNC", "NTC"] = "auto"
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        blank, layout, output = self.blank, self.layout, self.output

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            steps = sequence_scores(np.asarray(outputs[output]), layout)
            best = steps.argmax(axis=-1)
            kept = [t for t in range(len(best)) if best[t] != blank and (t == 0 or best[t] != best[t - 1])]
            text = "".join(context.label(int(best[t])) for t in kept)
            confidence = float(softmax(steps[kept].astype(np.float64)).max(axis=-1).mean()) if kept else 1.0
            return {"type": "text-recognition", "text": text, "confidence": round(confidence, 6)}

        return decode


def sequence_scores(array: np.ndarray, layout: str) -> np.ndarray:
    """The one sample's `[T, C]` scores out of a `[T, 1, C]`, `[1, T, C]` or `[T, C]` output."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"text-recognition: output of shape {list(array.shape)}, expected [T, N, C] or [N, T, C]"
        )
    if layout == "auto":
        layout = "TNC" if array.shape[1] == 1 else "NTC"
    return array[:, 0, :] if layout == "TNC" else array[0]


CONFIG = TextRecognitionConfig
