"""Pruning stage of `edge-convert`: structured (channels really removed) or unstructured (zeros only).

Structured pruning uses torch-pruning's dependency graph so that every layer that consumes a pruned
channel (BatchNorm, depthwise convs, residual adds, concatenations) is cut consistently; the exported
graph is then really smaller and faster. Unstructured L1 pruning only zeroes weights: the file
compresses better but dense kernels run exactly as fast as before, and the result says so.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from converters.torch_outputs import flatten_outputs
from edge.errors import ConfigError

if TYPE_CHECKING:
    import torch

MAX_RATIO = 0.95
PruneMode = Literal["structured", "unstructured"]


class PruneConfigError(ConfigError, ValueError):
    """A pruning option is out of range (a ConfigError for the CLI, a ValueError for library callers)."""


@dataclass
class PruneResult:
    model: Any  # torch.nn.Module, eval mode
    mode: str
    ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    nonzero_params_after: int
    weights_gzip_bytes_before: int = 0
    weights_gzip_bytes_after: int = 0
    kept_layers: list[str] = field(default_factory=list)  # output layers left whole
    notes: list[str] = field(default_factory=list)  # honest one-liners for the report

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params_after / self.params_after if self.params_after else 0.0

    @property
    def gzip_ratio(self) -> float:
        if not self.weights_gzip_bytes_before:
            return 1.0
        return self.weights_gzip_bytes_after / self.weights_gzip_bytes_before


def validate_prune_options(ratio: float, mode: str, round_to: int = 8) -> None:
    if mode not in ("structured", "unstructured"):
        raise PruneConfigError(f"--prune-mode: expected 'structured' or 'unstructured', got {mode!r}")
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= MAX_RATIO:
        raise PruneConfigError(f"--prune: ratio must be within [0, {MAX_RATIO}], got {ratio!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise PruneConfigError(f"--prune round_to: expected a positive integer, got {round_to!r}")


def prune_model(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float,
    mode: PruneMode,
    round_to: int = 8,
) -> PruneResult:
    """Prune a copy of `model`; the original is left untouched.

    `example_inputs` is one tensor or a tuple of tensors (a batch of one is enough) used to trace the
    dependency graph and count MACs.
    """
    import copy

    import torch
    import torch_pruning as tp

    validate_prune_options(ratio, mode, round_to)
    inputs = _as_input_tuple(example_inputs)
    pruned = copy.deepcopy(model).eval()

    with torch.no_grad():
        reference_outputs = flatten_outputs(pruned(*inputs))
    macs_before, params_before = _count(tp, pruned, inputs)
    gzip_before = weights_gzip_bytes(pruned)
    kept = _output_layers(pruned, inputs, reference_outputs)
    notes: list[str] = []

    if ratio > 0 and mode == "structured":
        pruner = tp.pruner.MagnitudePruner(
            pruned,
            inputs if len(inputs) > 1 else inputs[0],
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=float(ratio),
            ignored_layers=[module for _, module in kept],
            round_to=round_to,
        )
        pruner.step()
        notes.append(
            f"structured: whole channels removed (multiples of {round_to}); the exported graph is smaller "
            "and runs faster"
        )
    elif ratio > 0:
        # Shapes do not change, so output layers are thinned too: `ratio` is the real weight sparsity.
        _unstructured_l1(pruned, float(ratio))
        kept = []
        notes.append(
            "unstructured: weights zeroed in place, tensor shapes unchanged; smaller only once compressed, "
            "no speed-up with dense kernels"
        )
    pruned.eval()

    with torch.no_grad():
        new_outputs = flatten_outputs(pruned(*inputs))
    old_shapes = [tuple(t.shape) for t in reference_outputs]
    new_shapes = [tuple(t.shape) for t in new_outputs]
    if old_shapes != new_shapes:
        raise PruneConfigError(
            f"pruning changed the model's output shapes {old_shapes} -> {new_shapes}; "
            "its output layers could not be identified to keep them whole"
        )

    macs_after, params_after = _count(tp, pruned, inputs)
    if mode == "unstructured":
        macs_after = macs_before  # dense kernels multiply the zeros too
    return PruneResult(
        model=pruned,
        mode=mode,
        ratio=float(ratio),
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=sum(int(p.count_nonzero()) for p in pruned.parameters()),
        weights_gzip_bytes_before=gzip_before,
        weights_gzip_bytes_after=weights_gzip_bytes(pruned),
        kept_layers=[name for name, _ in kept],
        notes=notes,
    )


def weights_gzip_bytes(model: torch.nn.Module) -> int:
    """Size of all parameters and buffers as raw float bytes after gzip: what a sparse file saves."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as stream:
        for tensor in model.state_dict().values():
            stream.write(tensor.detach().cpu().contiguous().numpy().tobytes())
    return buffer.tell()


def _as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import numpy as np
    import torch

    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    converted = tuple(torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in items)
    if not converted or not all(isinstance(x, torch.Tensor) for x in converted):
        raise PruneConfigError("prune: example_inputs must be a tensor or a tuple of tensors")
    return converted


def _count(tp: Any, model: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, inputs if len(inputs) > 1 else inputs[0])
    return int(macs), int(params)


def _output_layers(
    model: torch.nn.Module, inputs: tuple[Any, ...], outputs: list[Any]
) -> list[tuple[str, torch.nn.Module]]:
    """Conv/Linear layers whose channels reach a model output: pruning them would change its shape.

    For each output, the last-executed Conv/Linear whose channel count matches one of that output's
    dimensions is kept whole (the classifier head, a detector's box/score convs).
    """
    import torch

    executed: list[tuple[str, torch.nn.Module, int]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            channels = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels

            def record(mod: Any, _args: Any, _out: Any, name: str = name, channels: int = channels) -> None:
                executed.append((name, mod, channels))

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    kept: dict[str, torch.nn.Module] = {}
    for output in outputs:
        dims = set(output.shape[1:]) if output.dim() > 1 else set(output.shape)
        for name, module, channels in reversed(executed):
            if channels in dims:
                kept[name] = module
                break
    return list(kept.items())


def _unstructured_l1(model: torch.nn.Module, ratio: float) -> None:
    import torch
    from torch.nn.utils import prune

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            prune.l1_unstructured(module, name="weight", amount=ratio)
            prune.remove(module, "weight")  # bake the mask in: a plain tensor with zeros
