"""Raw: every output as (nested) lists with its name and shape, each cut to at most `max_values` values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edge.jsontypes import JSONObject, JSONValue
from edge.tasks.base import DEFAULT_MAX_VALUES, Decoder, DecoderContext, Result, TaskConfig, capped

if TYPE_CHECKING:
    from edge.processing.preprocess import Letterbox


class RawConfig(TaskConfig):
    type: Literal["raw"]
    max_values: int = Field(default=DEFAULT_MAX_VALUES, ge=0)

    def decoder(self, context: DecoderContext) -> Decoder:
        max_values, names = self.max_values, context.output_names

        def decode(outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result:
            items: list[JSONValue] = []
            for position, array in enumerate(outputs):
                data, truncated = capped(np.asarray(array), max_values)
                item: JSONObject = {
                    "name": names[position] if position < len(names) else f"output{position}",
                    "shape": list(np.shape(array)),
                    "data": data,
                }
                if truncated:
                    item["truncated"] = True
                items.append(item)
            return {"type": "raw", "outputs": items}

        return decode


CONFIG = RawConfig
