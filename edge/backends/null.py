"""`null`: a backend that runs nothing and answers zeros shaped like the model's outputs.

For wiring the daemon, the session and the MQTT side without paying for inference (tests, load tests of
the publishing path). It reads the package's ONNX artifact's declared I/O, checks feeds like the real
backends, and never passes a golden check of a real model, so the profile's fallback policy applies to it
like to any other backend.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from edge.backends.base import BackendPlugin, LoadRequest, PreferenceBase, check_feeds
from edge.errors import BackendError
from edge.package import TensorSpec

ACCELERATOR = "null"


class NullPreference(PreferenceBase):
    name: Literal["null"]


class NullBackend:
    name: ClassVar[str] = "null"

    def __init__(self, request: LoadRequest) -> None:
        if not request.path.is_file():
            raise BackendError(f"{request.path}: artifact not found")
        self.inputs: list[TensorSpec] = list(request.inputs)
        self.outputs: list[TensorSpec] = list(request.outputs)
        self.providers_in_use = [ACCELERATOR]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        return [np.zeros(_shape(spec, batch), np.dtype(spec.dtype)) for spec in self.outputs]

    def close(self) -> None:
        return None


def _shape(spec: TensorSpec, batch: int) -> list[int]:
    """Fixed dims as declared; a dynamic batch dim follows the feed's, any other dynamic dim is 1."""
    return [
        d if isinstance(d, int) and d > 0 else (batch if position == 0 else 1)
        for position, d in enumerate(spec.shape)
    ]


PLUGIN = BackendPlugin(
    key="null",
    artifact_format="onnx",
    default_accelerators=(ACCELERATOR,),
    preference=NullPreference,
    backend=NullBackend,
    version=lambda: "built in",
)
