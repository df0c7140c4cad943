"""Helpers shared by the torch stages (prune, distill); torch is imported lazily."""

from __future__ import annotations

from typing import Any


def flatten_outputs(outputs: Any) -> list[Any]:
    """A module's outputs (tensor, tuple/list, dict, nested) as a flat list of tensors, in order."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat: list[Any] = []
    for item in outputs:
        flat.extend(flatten_outputs(item))
    return flat
