"""Load the SOURCE of `edge-convert`: an fp32 ONNX file, a `.tflite` file, or a Python factory of a torch module.

Nothing here unpickles an arbitrary file: `--weights` is read with `torch.load(weights_only=True)` or as
safetensors. Every failure is an `EdgeError` whose one line names the file or factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.errors import ConfigError, PackageError
from edge.package import TensorSpec

SourceKind = Literal["onnx", "tflite", "torch"]

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


@dataclass
class LoadedSource:
    kind: SourceKind
    name: str
    path: Path | None = None
    module: Any = None  # torch.nn.Module for factories
    # Declared tensors; dims may be symbolic (str) until `--input-shape` fixes them.
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    opset: int | None = None


def load_source(spec: str, weights: Path | None = None) -> LoadedSource:
    """Dispatch on the SOURCE string: `*.onnx`, `*.tflite`, or `file.py:fn` / `pkg.module:fn`."""
    lowered = spec.lower()
    if lowered.endswith(".onnx"):
        return load_onnx_source(Path(spec))
    if lowered.endswith(".tflite"):
        return load_tflite_source(Path(spec))
    if ":" in spec:
        return load_factory_source(spec, weights)
    raise ConfigError(
        f"SOURCE '{spec}': expected an .onnx file, a .tflite file, or a factory 'file.py:fn' / 'pkg.module:fn'"
    )


def load_onnx_source(path: Path) -> LoadedSource:
    import onnx

    if not path.is_file():
        raise ConfigError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and friends for truncated/corrupt files
        raise PackageError(f"{path}: not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    if not model.graph.node:
        raise PackageError(f"{path}: not a readable ONNX model (corrupt or truncated?): graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PackageError(f"{path}: ONNX model is invalid: {str(exc).splitlines()[0]}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_value_info_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_value_info_spec(v) for v in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return LoadedSource(kind="onnx", name=path.stem, path=path, inputs=inputs, outputs=outputs, opset=opset)


def _value_info_spec(value: Any) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return TensorSpec(name=value.name, shape=dims, dtype=_ONNX_DTYPES.get(tensor_type.elem_type, "float32"))


def load_tflite_source(path: Path) -> LoadedSource:
    if not path.is_file():
        raise ConfigError(f"{path}: TFLite file not found")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ConfigError(
            f"{path}: packaging a .tflite needs ai-edge-litert (pip install ai-edge-litert)"
        ) from exc
    try:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    except Exception as exc:
        raise PackageError(f"{path}: not a loadable TFLite model: {str(exc).splitlines()[0]}") from exc

    def spec(detail: dict[str, Any]) -> TensorSpec:
        scale, zero_point = detail.get("quantization", (0.0, 0))
        quantized = np.dtype(detail["dtype"]).kind in "iu" and scale
        return TensorSpec(
            name=detail["name"],
            shape=[int(d) for d in detail["shape"]],
            dtype=np.dtype(detail["dtype"]).name,
            scale=float(scale) if quantized else None,
            zero_point=int(zero_point) if quantized else None,
        )

    return LoadedSource(
        kind="tflite",
        name=path.stem,
        path=path,
        inputs=[spec(d) for d in interpreter.get_input_details()],
        outputs=[spec(d) for d in interpreter.get_output_details()],
    )


def resolve_callable(spec: str, what: str) -> Any:
    """`path/to/file.py:fn` or `pkg.module:fn` -> the callable (importing the file as a module)."""
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise ConfigError(f"{what} '{spec}': expected 'file.py:fn' or 'pkg.module:fn'")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise ConfigError(f"{what} '{spec}': file '{file}' not found")
            module_name = f"_edge_user_{abs(hash(str(file.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, file)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"{what} '{spec}': cannot import '{file}'")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{what} '{spec}': importing '{target}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{what} '{spec}': '{target}' has no callable '{attribute}'")
    return function


def load_factory_source(spec: str, weights: Path | None = None) -> LoadedSource:
    import torch

    factory = resolve_callable(spec, "factory")
    try:
        module = factory()
    except Exception as exc:
        raise ConfigError(f"factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"factory '{spec}' returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(module, weights)
    module.eval()
    target = spec.rpartition(":")[0]
    name = (Path(target).stem if target.endswith(".py") else target.rpartition(".")[2]).replace("_", "-")
    return LoadedSource(kind="torch", name=name, module=module)


def load_weights(module: Any, weights: Path) -> None:
    """A state dict from safetensors or `torch.load(weights_only=True)`; never arbitrary unpickling."""
    import torch

    if not weights.is_file():
        raise ConfigError(f"{weights}: weights file not found")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(weights))
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PackageError(f"{weights}: cannot read weights safely: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PackageError(f"{weights}: expected a state dict of tensors, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{weights}: does not fit the model: {str(exc).splitlines()[1:2] or exc}") from exc
