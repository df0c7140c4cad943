"""Voice activity: a VAD's speech probability for the window, and whether it is speech, as
`{"type": "voice-activity", "speech": true, "probability": 0.93}`.

The model's output `output` (an index or an output name, e.g. akiki's `probability`) holds one value per
window: a probability, or a logit with `logits: true`. The window is speech when the probability reaches
`threshold` (0.5, Silero's and akiki's default). A recurrent VAD's state is carried by the session
(`--state h:h_out`), not here: the decision is per window, so a subscriber that wants segments joins
consecutive speech windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.errors import ConfigError
from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig, sigmoid

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class VoiceActivityConfig(TaskConfig):
    type: Literal["voice-activity"]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    logits: bool = False
    output: int | str = 0

    def decoder(self, context: DecoderContext) -> Decoder:
        threshold, logits = self.threshold, self.logits
        index = self._output_index(context)

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            values = np.asarray(outputs[index], dtype=np.float64).reshape(-1)
            if values.size != 1:
                raise ConfigError(
                    f"postprocess.output: voice-activity reads one value per window, output {index} holds "
                    f"{values.size}"
                )
            probability = float(sigmoid(values)[0] if logits else values[0])
            return {
                "type": "voice-activity",
                "speech": probability >= threshold,
                "probability": round(probability, 6),
            }

        return decode

    def _output_index(self, context: DecoderContext) -> int:
        if isinstance(self.output, int):
            return self.output
        if self.output not in context.output_names:
            raise ConfigError(
                f"postprocess.output: '{self.output}' is not an output of the model "
                f"({', '.join(context.output_names) or 'none named'})"
            )
        return context.output_names.index(self.output)


CONFIG = VoiceActivityConfig
