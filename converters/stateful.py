"""Inputs that are not the data: constants (`--const NAME=VALUE`) and recurrent state (`--state IN:OUT`).

Calibration and evaluation files hold only the data inputs, one sample per consecutive window of a
stream. `complete_feeds` adds every constant and runs the fp32 model over the samples in order, so each
sample's state input is what the previous sample left (zeros at the first): a GRU calibrated with its
state always zero would be calibrated on values it never sees. Every candidate (int8, fp16) is then
scored on those same feeds, i.e. one step from fp32's state: the gate measures each step's error, not
the drift a quantized model's own state might build up over a long stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.package import ConstantInput, StateLink, TensorSpec


def parse_const(text: str) -> ConstantInput:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--const {text}: expected NAME=VALUE, e.g. sr=16000")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--const {text}: VALUE '{value}' is not a number") from None
    return ConstantInput(name=name, value=number)


def parse_state(text: str) -> StateLink:
    source, sep, target = text.partition(":")
    if not sep or not source or not target:
        raise ConfigError(f"--state {text}: expected IN:OUT (an input and the output fed back into it)")
    return StateLink(input=source, output=target)


def check_fed_inputs(
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    constants: list[ConstantInput],
    state: list[StateLink],
) -> list[TensorSpec]:
    """Refuse a `--const`/`--state` that names no tensor of the model or does not fit it; the data inputs
    (the ones calibration files must hold) are returned."""
    by_name = {spec.name: spec for spec in inputs}
    out_by_name = {spec.name: spec for spec in outputs}
    seen: set[str] = set()
    for const in constants:
        spec = by_name.get(const.name)
        if spec is None:
            raise ConfigError(f"--const {const.name}: not an input of the model (inputs: {sorted(by_name)})")
        if np.dtype(spec.dtype).kind in "iub" and not float(const.value).is_integer():
            raise ConfigError(f"--const {const.name}={const.value}: input '{const.name}' is {spec.dtype}")
        seen.add(const.name)
    for link in state:
        spec = by_name.get(link.input)
        if spec is None:
            raise ConfigError(
                f"--state {link.input}:{link.output}: '{link.input}' is not an input (inputs: {sorted(by_name)})"
            )
        if link.input in seen:
            raise ConfigError(f"--state {link.input}:{link.output}: '{link.input}' is already fed")
        out = out_by_name.get(link.output)
        if out is None:
            raise ConfigError(
                f"--state {link.input}:{link.output}: '{link.output}' is not an output "
                f"(outputs: {sorted(out_by_name)})"
            )
        if out.dtype != spec.dtype or not _may_equal(out.shape, spec.shape):
            raise ConfigError(
                f"--state {link.input}:{link.output}: output {out.shape} {out.dtype} does not fit input "
                f"{spec.shape} {spec.dtype}"
            )
        seen.add(link.input)
    data = [spec for spec in inputs if spec.name not in seen]
    if not data:
        raise ConfigError("--const/--state: every input is fed; the model has no data input left")
    return data


def _may_equal(a: list[int | str], b: list[int | str]) -> bool:
    """Same rank, and no dimension fixed in both that differs (a symbolic one may be anything)."""
    fixed = [(x, y) for x, y in zip(a, b, strict=False) if isinstance(x, int) and isinstance(y, int)]
    return len(a) == len(b) and all(x == y or x <= 0 or y <= 0 for x, y in fixed)


def _concrete(shape: list[int | str]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def complete_feeds(
    model: Path,
    feeds: list[dict[str, np.ndarray]],
    inputs: list[TensorSpec],
    constants: list[ConstantInput],
    state: list[StateLink],
) -> list[dict[str, np.ndarray]]:
    """Each data-only sample with the constants and the state the fp32 model carries to it, in order."""
    if not constants and not state:
        return feeds
    import onnxruntime as ort

    specs = {spec.name: spec for spec in inputs}
    fixed = {
        c.name: np.full(_concrete(specs[c.name].shape), c.value, np.dtype(specs[c.name].dtype))
        for c in constants
    }
    carried = {
        link.input: np.zeros(_concrete(specs[link.input].shape), np.dtype(specs[link.input].dtype))
        for link in state
    }
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]) if state else None
    out_names = [link.output for link in state]
    completed = []
    for feed in feeds:
        full = {**feed, **fixed, **carried}
        completed.append(full)
        if session is not None:
            values = session.run(out_names, full)
            carried = {link.input: value for link, value in zip(state, values, strict=True)}
    return completed
