"""LiteRT (TFLite) backend: ai-edge-litert with XNNPACK, or a delegate library named by the profile.

Delegates: `xnnpack` (built into the interpreter, the default), `cpu` (reference kernels, no delegate),
`gpu`, `nnapi`, `edgetpu`, `qnn`, `vx`, or any shared-library name/path, loaded with `load_delegate`
and the profile's `options[<delegate>]`. External delegates run with the default delegates switched off,
so a `DELEGATE` node in the graph proves that *that* delegate took part of the model.

Interpreter modules, best first: `ai_edge_litert.interpreter`, `tflite_runtime.interpreter`,
`tensorflow.lite`. Quantized inputs/outputs are converted with the tensor's scale and zero point when the
caller's spec says float.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

import numpy as np

from edge.backends import LoadRequest, check_feeds
from edge.errors import BackendError
from edge.package import TensorSpec

# Short names for the delegate libraries a profile may ask for.
DELEGATE_LIBRARIES: dict[str, str] = {
    "gpu": "libLiteRtGpuAccelerator.so",
    "nnapi": "libnnapi_delegate.so",
    "edgetpu": "libedgetpu.so.1",
    "qnn": "libQnnTFLiteDelegate.so",
    "vx": "libvx_delegate.so",
}
BUILTIN = ("xnnpack", "cpu")
_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


def interpreter_module() -> Any:
    """The first importable interpreter module, or a BackendError naming what to install."""
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.Interpreter if name == "tensorflow.lite" else module
    raise BackendError("no TFLite interpreter installed: pip install ai-edge-litert")


def _module_of(interpreter: Any) -> Any:
    # tensorflow.lite exposes Interpreter and experimental.load_delegate on the package itself.
    return importlib.import_module(interpreter.__module__)


def version() -> str:
    for dist in ("ai-edge-litert", "tflite-runtime", "tensorflow"):
        try:
            from importlib.metadata import version as dist_version

            return f"{dist} {dist_version(dist)}"
        except Exception:
            continue
    return "absent"


def available_accelerators() -> list[str]:
    try:
        interpreter_module()
    except BackendError:
        return []
    return list(BUILTIN)


def _physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class LiteRTBackend:
    name: ClassVar[str] = "litert"

    def __init__(self, request: LoadRequest) -> None:
        module = interpreter_module()
        interpreter_cls = module.Interpreter if hasattr(module, "Interpreter") else module
        delegate_name = request.accelerators[0]
        threads = request.threads or _physical_cores()
        kwargs: dict[str, Any] = {"model_path": str(request.path), "num_threads": threads}
        resolver = getattr(_module_of(interpreter_cls), "OpResolverType", None)
        if (delegate_name == "cpu" or delegate_name not in BUILTIN) and resolver is not None:
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if delegate_name not in BUILTIN:
            library = DELEGATE_LIBRARIES.get(delegate_name, delegate_name)
            options = {k: str(v) for k, v in request.options.get(delegate_name, {}).items()}
            loader = getattr(_module_of(interpreter_cls), "load_delegate", None)
            if loader is None:
                raise BackendError(f"delegate {delegate_name}: this TFLite interpreter cannot load delegates")
            try:
                kwargs["experimental_delegates"] = [loader(library, options)]
            except (ValueError, OSError, RuntimeError) as exc:
                raise BackendError(f"delegate {delegate_name}: cannot load '{library}': {exc}") from exc
        try:
            self.interpreter = interpreter_cls(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"{request.path}: LiteRT cannot load it with {delegate_name}: {exc}") from exc

        self.providers_in_use = self._in_use(delegate_name)
        details_in = self.interpreter.get_input_details()
        details_out = self.interpreter.get_output_details()
        self._in = self._match(details_in, request.inputs, "input")
        self._out = self._match(details_out, request.outputs, "output")
        self.inputs = [self._spec(name, d, spec) for name, d, spec in self._in]
        self.outputs = [self._spec(name, d, spec) for name, d, spec in self._out]

    def _in_use(self, delegate_name: str) -> list[str]:
        details = getattr(self.interpreter, "_get_ops_details", None)
        if details is None:  # old tflite-runtime: cannot see the graph; report what was asked for
            return [delegate_name]
        ops = details()
        delegated = any(op.get("op_name") == "DELEGATE" for op in ops)
        if delegate_name == "cpu":
            return ["cpu"]
        return [delegate_name, "cpu"] if delegated else ["cpu"]

    @staticmethod
    def _match(
        details: list[dict[str, Any]], specs: list[TensorSpec], kind: str
    ) -> list[tuple[str, dict[str, Any], TensorSpec | None]]:
        """Pair model tensors with manifest specs: by name, else by position (converters rename them)."""
        by_name = {d["name"]: d for d in details}
        if specs and all(s.name in by_name for s in specs):
            return [(s.name, by_name[s.name], s) for s in specs]
        if specs and len(specs) != len(details):
            raise BackendError(
                f"the .tflite has {len(details)} {kind}s, the manifest lists {len(specs)} "
                f"({', '.join(s.name for s in specs)})"
            )
        if specs:
            return [(s.name, d, s) for s, d in zip(specs, details, strict=False)]
        return [(d["name"], d, None) for d in details]

    @staticmethod
    def _spec(name: str, detail: dict[str, Any], declared: TensorSpec | None) -> TensorSpec:
        model_dtype = np.dtype(detail["dtype"]).name
        scale, zero_point = detail.get("quantization", (0.0, 0))
        dtype = model_dtype
        # A float spec over an integer tensor: the backend (de)quantizes with the tensor's own parameters.
        if (
            declared is not None
            and np.dtype(declared.dtype).kind == "f"
            and np.dtype(model_dtype).kind in "iu"
        ):
            if not scale:
                raise BackendError(f"tensor '{name}' is {model_dtype} without quantization parameters")
            dtype = declared.dtype
        return TensorSpec(
            name=name,
            shape=[int(d) for d in detail["shape"]],
            dtype=dtype,
            scale=float(scale) if scale else None,
            zero_point=int(zero_point) if scale else None,
        )

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        try:
            for name, detail, _ in self._in:
                array = feeds[name]
                model_dtype = np.dtype(detail["dtype"])
                if array.dtype != model_dtype:
                    scale, zero_point = detail["quantization"]
                    info = np.iinfo(model_dtype)
                    array = np.clip(np.round(array / scale) + zero_point, info.min, info.max).astype(
                        model_dtype
                    )
                self.interpreter.set_tensor(detail["index"], array)
            self.interpreter.invoke()
            results = []
            for spec, (_, detail, _) in zip(self.outputs, self._out, strict=False):
                value = self.interpreter.get_tensor(detail["index"])
                if value.dtype != np.dtype(spec.dtype) and spec.scale:
                    value = (value.astype(np.float32) - float(spec.zero_point or 0)) * np.float32(spec.scale)
                results.append(value.copy())
            return results
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"LiteRT run failed: {exc}") from exc

    def close(self) -> None:
        self.__dict__.pop("interpreter", None)
