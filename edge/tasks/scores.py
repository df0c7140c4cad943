"""Regression and anomaly scores from one output: regression lists the values (at most `max_values`);
anomaly reduces them to one score (`reduce` max|mean) and flags it against `threshold` when one is set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.tasks.base import DEFAULT_MAX_VALUES, Decoder, DecoderContext, Result, TaskConfig, capped

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class ScoresConfig(TaskConfig):
    type: Literal["regression", "anomaly"]
    threshold: float | None = None
    reduce: Literal["max", "mean"] = "max"
    max_values: int = Field(default=DEFAULT_MAX_VALUES, ge=0)
    output: int = Field(default=0, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        output, max_values, threshold, reduce = self.output, self.max_values, self.threshold, self.reduce

        def regression(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            values = np.asarray(outputs[output], dtype=np.float64)
            listed, truncated = capped(values.reshape(-1), max_values)
            return {"type": "regression", "values": listed, **({"truncated": True} if truncated else {})}

        def anomaly(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            values = np.asarray(outputs[output], dtype=np.float64)
            score = float(values.mean() if reduce == "mean" else values.max())
            result: Result = {"type": "anomaly", "score": round(score, 6)}
            if threshold is not None:
                result["threshold"] = float(threshold)
                result["anomalous"] = bool(score >= float(threshold))
            return result

        return regression if self.type == "regression" else anomaly


CONFIG = ScoresConfig
