"""Embedding: one vector per input, L2-normalised, as `{"type": "embedding", "dims", "vector", "normalized"}`.

Packages `edge-convert` writes from a Hugging Face folder pool inside the graph (mean over the tokens the
attention mask keeps, or the [CLS] token, as the model's sentence-transformers `1_Pooling` says), so the
output is already one vector and the int8 gate scored exactly what is served: `pooling: none`. A model
whose output is per token (batch, seq, hidden) can take its first token with `pooling: cls`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class EmbeddingConfig(TaskConfig):
    type: Literal["embedding"]
    pooling: Literal["none", "cls"] = "none"
    normalize: bool = True
    decimals: int = Field(default=6, ge=1, le=9, description="digits kept per vector value in the payload")
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        output, pooling, normalize, decimals = self.output, self.pooling, self.normalize, self.decimals

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            values = np.asarray(outputs[output], dtype=np.float64)
            if pooling == "cls" and values.ndim >= 2:
                values = values.reshape(-1, *values.shape[-2:])[0, 0]
            vector = values.reshape(-1)
            if normalize:
                norm = float(np.linalg.norm(vector))
                vector = vector / norm if norm > 0.0 else vector
            return {
                "type": "embedding",
                "dims": int(vector.size),
                "vector": [round(float(v), decimals) for v in vector],
                "normalized": normalize,
            }

        return decode


CONFIG = EmbeddingConfig
