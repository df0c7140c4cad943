"""The contract every post-processing task in `edge.tasks` follows.

A task module declares `CONFIG`: a `TaskConfig` subclass whose `type: Literal[...]` names the key(s) it
serves, or `Variants` of several configs for one key told apart by a second field (detection's
`format`). The config builds its decoder from a `DecoderContext`; the registry (edge.tasks.registry)
finds the modules and derives the manifest's `postprocess` union from their configs, so adding a task
is one new module.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict

from edge.jsontypes import JSONObject, JSONValue

if TYPE_CHECKING:
    from edge.package import Manifest, TensorSpec
    from edge.processing.preprocess import Letterbox

# What a decoder returns: the prediction payload's `result` object, plain JSON all the way down.
Result: TypeAlias = JSONObject

DEFAULT_MAX_VALUES = 4096


class Decoder(Protocol):
    """Model outputs (in the manifest's output order) and the frame geometry -> the `result` object."""

    def __call__(self, outputs: list[np.ndarray], letterbox: Letterbox | None) -> Result: ...


@dataclass(frozen=True)
class DecoderContext:
    """What a decoder may know about its package besides its own config."""

    labels: tuple[str, ...] = ()
    input_hw: tuple[int, int] = (1, 1)  # height, width of an image input; (1, 1) for other inputs
    output_names: tuple[str, ...] = ()

    @classmethod
    def from_specs(
        cls, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], labels: Sequence[str] | None = None
    ) -> DecoderContext:
        return cls(tuple(labels or ()), _image_hw(inputs[0]), tuple(spec.name for spec in outputs))

    @classmethod
    def from_manifest(cls, manifest: Manifest, labels: Sequence[str] | None = None) -> DecoderContext:
        return cls.from_specs(manifest.inputs, manifest.outputs, labels)

    def label(self, index: int, labels: Sequence[str] | None = None) -> str:
        names = self.labels if labels is None else labels
        return names[index] if 0 <= index < len(names) else str(index)


def _image_hw(spec: TensorSpec) -> tuple[int, int]:
    dims = [d if isinstance(d, int) else 0 for d in spec.shape]
    if len(dims) != 4:
        return 1, 1
    if (spec.layout or "NCHW") == "NHWC":
        return dims[1], dims[2]
    return dims[2], dims[3]


class TaskConfig(BaseModel):
    """One task's post-processing options as the manifest states them; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str  # each task narrows this to Literal[its key(s)]: the registry derives its keys from it

    @abstractmethod
    def decoder(self, context: DecoderContext) -> Decoder:
        """Build the decoder once per package (anchors, grids and labels are resolved here)."""


@dataclass(frozen=True)
class Variants:
    """Several configs for one task key, chosen by `field`; a config without that field gets `default`."""

    field: str
    default: str
    configs: tuple[type[TaskConfig], ...]

    def tag(self, config: type[TaskConfig]) -> str:
        return literal_values(config, self.field)[0]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self.tag(config) for config in self.configs)


def literal_values(config: type[TaskConfig], field: str) -> tuple[str, ...]:
    """The values a `Literal[...]` field of a config admits (its key or its format)."""
    values = get_args(config.model_fields[field].annotation)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{config.__name__}.{field} must be a Literal of strings")
    return values


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=axis, keepdims=True))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0))))


def capped(array: np.ndarray, max_values: int) -> tuple[JSONValue, bool]:
    """The array as (nested) lists, flattened and cut to `max_values` when it holds more."""
    flat = array.reshape(-1)
    truncated = flat.size > max_values
    values = flat[:max_values] if truncated else array
    listed: JSONValue = values.tolist()
    return listed, truncated
