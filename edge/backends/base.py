"""What every backend plugin shares: the protocol it implements, what it is asked to open, how it checks
feeds, and the description a plugin module publishes as `PLUGIN` for the registry to find.

Plugin modules import this module, never the package `__init__` (which imports the registry, which imports
the plugins): so there is no cycle however the package is first imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge.errors import BackendError
from edge.package import TensorSpec

OptionValue = str | int | float | bool
# Per provider/delegate (or "session" for ONNX Runtime): option name -> value.
BackendOptions = dict[str, dict[str, OptionValue]]


class Backend(Protocol):
    name: ClassVar[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers_in_use: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoadRequest:
    """Everything a backend needs to open one artifact on one accelerator chain."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Best first; how long a chain is is the plugin's choice (ONNX Runtime: providers, LiteRT: one delegate).
    accelerators: list[str]
    options: Mapping[str, Mapping[str, OptionValue]] = field(default_factory=dict)
    threads: int = 0
    cache_dir: Path | None = None


class PreferenceBase(BaseModel):
    """One entry of a device profile's `backends:` list. Each plugin subclasses it with
    `name: Literal["<key>"]` and its own accelerator fields; the registry joins the subclasses into one
    union discriminated by `name`, so a key another backend would take is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    # Provider/delegate specific options, e.g. {"TensorrtExecutionProvider": {"trt_fp16_enable": true}}
    options: BackendOptions = Field(default_factory=dict)

    def candidate_chains(self, default_accelerators: Sequence[str]) -> list[list[str]]:
        """The accelerator chains to try, best first: one per accelerator unless a plugin says otherwise."""
        return [[accelerator] for accelerator in default_accelerators]


@dataclass(frozen=True)
class BackendPlugin:
    """What a backend module declares as its module-level `PLUGIN`; the registry needs nothing else."""

    key: str
    artifact_format: str  # the manifest `format` of the artifacts it reads: "onnx", "tflite"
    default_accelerators: tuple[str, ...]  # what it runs on when a profile names no accelerator
    preference: type[PreferenceBase]  # its `backends:` entry in a device profile
    backend: Callable[[LoadRequest], Backend]  # opens an artifact; raises BackendError when it cannot
    version: Callable[[], str]  # for `edge-infer doctor`: never raises, says "absent (...)" instead

    def __post_init__(self) -> None:
        tags = get_args(self.preference.model_fields["name"].annotation)
        if tags != (self.key,):
            raise BackendError(
                f"backend plugin '{self.key}': {self.preference.__name__}.name must be Literal['{self.key}']"
            )
        if not self.default_accelerators:
            raise BackendError(f"backend plugin '{self.key}': default_accelerators is empty")

    def candidate_chains(self, preference: PreferenceBase) -> list[list[str]]:
        return preference.candidate_chains(self.default_accelerators)


_DTYPE_NAMES = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}


def normalize_dtype(name: str) -> str:
    """ONNX Runtime's 'tensor(float)' / numpy's 'float32' -> numpy dtype name."""
    name = name.removeprefix("tensor(").removesuffix(")")
    return _DTYPE_NAMES.get(name, name)


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Refuse feeds the model would misread: missing/unknown names, other dtype, other fixed dims."""
    wanted = {spec.name for spec in specs}
    unknown = sorted(set(feeds) - wanted)
    if unknown:
        raise BackendError(f"input '{unknown[0]}' is not a model input (inputs: {', '.join(sorted(wanted))})")
    for spec in specs:
        if spec.name not in feeds:
            raise BackendError(f"input '{spec.name}' is missing from the feeds")
        array = feeds[spec.name]
        if not isinstance(array, np.ndarray):
            raise BackendError(f"input '{spec.name}': expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise BackendError(f"input '{spec.name}': dtype {array.dtype}, the model takes {spec.dtype}")
        fixed = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
        if array.ndim != len(fixed) or any(
            f is not None and f != a for f, a in zip(fixed, array.shape, strict=False)
        ):
            shown = [d if d is not None else "?" for d in fixed]
            raise BackendError(f"input '{spec.name}': shape {list(array.shape)}, the model takes {shown}")
