"""LiteRT (TFLite) backend: ai-edge-litert with XNNPACK, or a delegate library named by the profile.

Delegates: `xnnpack` (built into the interpreter, the default), `cpu` (reference kernels, no delegate),
`gpu`, `nnapi`, `edgetpu`, `qnn`, `vx`, or any shared-library name/path, loaded with `load_delegate`
and the profile's `options[<delegate>]`. External delegates run with the default delegates switched off,
so a `DELEGATE` node in the graph proves that *that* delegate took part of the model.

Interpreter modules, best first: `ai_edge_litert.interpreter`, `tflite_runtime.interpreter`,
`tensorflow.lite`. Quantized inputs/outputs are converted with the tensor's scale and zero point when the
caller's spec says float.

A profile names it as `{name: litert, delegates: [...], options: {...}}`; each delegate is one candidate.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from edge.backends.base import BackendPlugin, LoadRequest, OptionValue, PreferenceBase, check_feeds
from edge.errors import BackendError
from edge.package import TensorSpec

# Short names for the delegate libraries a profile may ask for. Each is an *external delegate* library
# (it exports `tflite_plugin_create_delegate`), the only kind the Python interpreter can load.
DELEGATE_LIBRARIES: dict[str, str] = {
    "gpu": "libtensorflowlite_gpu_delegate.so",
    "nnapi": "libnnapi_delegate.so",
    "edgetpu": "libedgetpu.so.1",
    "qnn": "libQnnTFLiteDelegate.so",
    "vx": "libvx_delegate.so",
}
# What to install when a delegate library does not load (a profile's install_hints take precedence).
DELEGATE_INSTALL: dict[str, str] = {
    "gpu": "build tensorflow/lite/delegates/gpu:libtensorflowlite_gpu_delegate.so as an external delegate "
    "and install the GPU's OpenCL/OpenGL ES driver, then put the library on LD_LIBRARY_PATH",
    "nnapi": "NNAPI exists only on Android: build tensorflow/lite/delegates/nnapi as the external delegate "
    "libnnapi_delegate.so for the device",
    "edgetpu": "apt-get install libedgetpu1-std (Coral apt repository, https://coral.ai/software/)",
    "qnn": "install the Qualcomm AI Engine Direct (QNN) SDK, which ships libQnnTFLiteDelegate.so",
    "vx": "install the NPU vendor's TIM-VX delegate (libvx_delegate.so and libtim-vx.so)",
}
RUNTIME_INSTALL = "pip install ai-edge-litert"
BUILTIN = ("xnnpack", "cpu")
_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


class LiteRTPreference(PreferenceBase):
    name: Literal["litert"]
    # xnnpack (built in), cpu, gpu, nnapi, edgetpu, qnn, vx, or a shared-library path/name
    delegates: list[str] = Field(default_factory=list)

    def candidate_chains(self, default_accelerators: Sequence[str]) -> list[list[str]]:
        return [[delegate] for delegate in self.delegates or default_accelerators]


class DelegateUnavailable(BackendError):
    """A delegate library that does not load; `library` and `install` say what is missing."""

    def __init__(self, delegate: str, library: str, detail: str) -> None:
        self.delegate = delegate
        self.library = library
        self.install = install_hint(delegate)
        super().__init__(f"delegate {delegate}: cannot load '{library}': {detail}")


def delegate_library(delegate: str) -> str:
    """The shared library behind a delegate name; a name that is not a short name is a library already."""
    return DELEGATE_LIBRARIES.get(delegate, delegate)


def delegate_short_name(delegate: str) -> str:
    """`libedgetpu.so.1` -> `edgetpu`; short names and unknown libraries stay as they are."""
    by_library = {library: short for short, library in DELEGATE_LIBRARIES.items()}
    return by_library.get(delegate, delegate)


def install_hint(delegate: str) -> str:
    short = delegate_short_name(delegate)
    return DELEGATE_INSTALL.get(
        short, f"install the library '{delegate_library(delegate)}' where the dynamic loader finds it"
    )


def interpreter_module() -> Any:
    """The first importable interpreter module, or a BackendError naming what to install."""
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.Interpreter if name == "tensorflow.lite" else module
    raise BackendError(f"no TFLite interpreter installed: {RUNTIME_INSTALL}")


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


def _check_delegate_library(delegate_name: str, library: str) -> None:
    """Open the library first: `load_delegate` on a missing one leaves a half-built Delegate whose
    finalizer raises, and a library without the external-delegate entry point is no delegate at all."""
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        detail = " ".join(str(exc).split()).removeprefix(f"{library}: ")
        raise DelegateUnavailable(delegate_name, library, detail[:200]) from exc
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        raise DelegateUnavailable(
            delegate_name, library, "it is no TFLite external delegate (no tflite_plugin_create_delegate)"
        )


def open_interpreter(
    delegate_name: str,
    options: Mapping[str, OptionValue],
    threads: int,
    *,
    model_path: str | None = None,
    model_content: bytes | None = None,
) -> tuple[Any, list[Any]]:
    """An allocated interpreter on one delegate, and the delegate objects it needs kept alive.

    `xnnpack` is the interpreter's default path; `cpu` and every external delegate switch the default
    delegates off, so a DELEGATE node in the graph can only come from the delegate that was asked for.
    Raises `DelegateUnavailable` when the delegate library does not load, `BackendError` otherwise."""
    module = interpreter_module()
    interpreter_cls = module.Interpreter if hasattr(module, "Interpreter") else module
    kwargs: dict[str, Any] = {"num_threads": threads}
    if model_content is not None:
        kwargs["model_content"] = model_content
    else:
        kwargs["model_path"] = model_path
    resolver = getattr(_module_of(interpreter_cls), "OpResolverType", None)
    if (delegate_name == "cpu" or delegate_name not in BUILTIN) and resolver is not None:
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    delegates: list[Any] = []
    if delegate_name not in BUILTIN:
        library = delegate_library(delegate_name)
        loader = getattr(_module_of(interpreter_cls), "load_delegate", None)
        if loader is None:
            raise BackendError(f"delegate {delegate_name}: this TFLite interpreter cannot load delegates")
        _check_delegate_library(delegate_name, library)
        try:
            delegates.append(loader(library, {k: str(v) for k, v in options.items()}))
        except (ValueError, OSError, RuntimeError) as exc:
            raise DelegateUnavailable(delegate_name, library, " ".join(str(exc).split())[:200]) from exc
        kwargs["experimental_delegates"] = delegates
    where = model_path or "the model"
    try:
        interpreter = interpreter_cls(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise BackendError(f"{where}: LiteRT cannot load it with {delegate_name}: {exc}") from exc
    return interpreter, delegates


def delegated_nodes(interpreter: Any) -> int | None:
    """How many graph nodes a delegate took over (DELEGATE nodes); None when this interpreter cannot tell."""
    details = getattr(interpreter, "_get_ops_details", None)
    if details is None:
        return None
    return sum(1 for op in details() if op.get("op_name") == "DELEGATE")


class LiteRTBackend:
    name: ClassVar[str] = "litert"

    def __init__(self, request: LoadRequest) -> None:
        delegate_name = request.accelerators[0]
        self.interpreter, self._delegates = open_interpreter(
            delegate_name,
            request.options.get(delegate_name, {}),
            request.threads or _physical_cores(),
            model_path=str(request.path),
        )
        self.providers_in_use = self._in_use(delegate_name)
        details_in = self.interpreter.get_input_details()
        details_out = self.interpreter.get_output_details()
        self._in = self._match(details_in, request.inputs, "input")
        self._out = self._match(details_out, request.outputs, "output")
        self.inputs = [self._spec(name, d, spec) for name, d, spec in self._in]
        self.outputs = [self._spec(name, d, spec) for name, d, spec in self._out]

    def _in_use(self, delegate_name: str) -> list[str]:
        delegated = delegated_nodes(self.interpreter)
        if delegated is None:  # old tflite-runtime: cannot see the graph; report what was asked for
            return [delegate_name]
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
        # The interpreter must go before the delegate it runs on.
        self.__dict__.pop("interpreter", None)
        self.__dict__.pop("_delegates", None)


PLUGIN = BackendPlugin(
    key="litert",
    artifact_format="tflite",
    default_accelerators=("xnnpack",),
    preference=LiteRTPreference,
    backend=LiteRTBackend,
    version=version,
)
