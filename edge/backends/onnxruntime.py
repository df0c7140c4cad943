"""ONNX Runtime backend: the profile's execution providers in order, and proof of which ones hold nodes.

ONNX Runtime quietly assigns nodes an accelerator cannot take to the CPU (and, with its own fallback,
may build a CPU-only session when an accelerator fails to initialise). So `providers_in_use` is read
from the session's node assignment (`session.record_ep_graph_assignment_info`), not from the list that
was asked for.

Session options come from the profile's `options["session"]`:
`graph_optimization_level` (disable|basic|extended|layout|all), `optimized_model_cache` (bool, default
true for CPU-only chains: the optimized graph is saved once and reloaded without re-optimizing),
`inter_op_threads`, `execution_mode` (sequential|parallel). Provider options come from
`options[<provider>]`; TensorRT and OpenVINO get engine/blob cache directories under the cache dir.

A profile names it as `{name: onnxruntime, providers: [...], options: {...}}`; each provider in turn is
tried as the primary one, keeping the providers after it (nodes the primary cannot take land on the next
provider in the profile's order).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from edge.backends.base import (
    BackendPlugin,
    LoadRequest,
    OptionValue,
    PreferenceBase,
    check_feeds,
    normalize_dtype,
)
from edge.errors import BackendError
from edge.package import TensorSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Providers whose nodes are compiled into opaque kernels: their optimized graphs cannot be saved.
_SERIALIZABLE = {CPU, "AzureExecutionProvider"}
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


class OnnxRuntimePreference(PreferenceBase):
    name: Literal["onnxruntime"]
    # Execution providers, best first, e.g. [TensorrtExecutionProvider, CUDAExecutionProvider, ...]
    providers: list[str] = Field(default_factory=list)

    def candidate_chains(self, default_accelerators: Sequence[str]) -> list[list[str]]:
        chain = self.providers or list(default_accelerators)
        return [chain[i:] for i in range(len(chain))]


def version() -> str:
    try:
        import onnxruntime
    except ImportError as exc:
        return f"absent ({exc})"
    return str(onnxruntime.__version__)


def available_accelerators() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _provider_options(
    provider: str, given: Mapping[str, OptionValue], cache_dir: Path | None
) -> dict[str, str]:
    options = {
        key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in given.items()
    }
    if cache_dir is not None:
        if provider == "TensorrtExecutionProvider":
            options.setdefault("trt_engine_cache_enable", "true")
            options.setdefault("trt_engine_cache_path", str(cache_dir / "tensorrt"))
            options.setdefault("trt_timing_cache_enable", "true")
            options.setdefault("trt_timing_cache_path", str(cache_dir / "tensorrt"))
        elif provider == "OpenVINOExecutionProvider":
            options.setdefault("cache_dir", str(cache_dir / "openvino"))
    return options


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


class OnnxRuntimeBackend:
    name: ClassVar[str] = "onnxruntime"

    def __init__(self, request: LoadRequest) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        primary = request.accelerators[0]
        if primary not in available:
            raise BackendError(
                f"{primary} is not available in this onnxruntime {ort.__version__} build "
                f"(has: {', '.join(available)})"
            )
        chain = [p for p in request.accelerators if p in available]
        if CPU not in chain:
            chain.append(CPU)  # ORT adds it anyway; being explicit keeps the assignment honest
        session_opts = dict(request.options.get("session", {}))
        options = ort.SessionOptions()
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if request.threads > 0:
            options.intra_op_num_threads = request.threads
        if "inter_op_threads" in session_opts:
            options.inter_op_num_threads = int(session_opts["inter_op_threads"])
        if str(session_opts.get("execution_mode", "sequential")) == "parallel":
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        level_name = str(session_opts.get("graph_optimization_level", "all"))
        if level_name not in _LEVELS:
            raise BackendError(
                f"options.session.graph_optimization_level: '{level_name}' is not one of {', '.join(_LEVELS)}"
            )
        level = getattr(ort.GraphOptimizationLevel, _LEVELS[level_name])
        options.graph_optimization_level = level

        model_path = request.path
        self.optimized_model: Path | None = None
        use_cache = bool(session_opts.get("optimized_model_cache", True)) and set(chain) <= _SERIALIZABLE
        if use_cache and request.cache_dir is not None and level_name != "disable":
            cached = request.cache_dir / f"ort-{ort.__version__}-{level_name}-{request.threads}.onnx"
            if cached.is_file():
                # Already optimized for this ORT build: loading it skips the optimizer (cold start).
                model_path = cached
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self.optimized_model = cached
            elif _writable_dir(cached.parent):
                options.optimized_model_filepath = str(cached)
                self.optimized_model = cached

        provider_options = [
            _provider_options(p, request.options.get(p, {}), request.cache_dir) for p in chain
        ]
        for opts in provider_options:
            for key in ("trt_engine_cache_path", "cache_dir"):
                if key in opts and not _writable_dir(Path(opts[key])):
                    del opts[key]  # a read-only cache must not stop the model from loading
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=chain, provider_options=provider_options
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            if model_path == request.path or self.optimized_model is None:
                raise BackendError(f"{request.path}: onnxruntime cannot load it with {chain}: {exc}") from exc
            # A stale or truncated cached graph must not keep the model from loading: rebuild it.
            log.warning("%s: cached optimized model unusable (%s); re-optimizing", self.optimized_model, exc)
            self.optimized_model.unlink(missing_ok=True)
            options.graph_optimization_level = level
            options.optimized_model_filepath = str(self.optimized_model)
            try:
                self.session = ort.InferenceSession(
                    str(request.path), options, providers=chain, provider_options=provider_options
                )
            except Exception as retry_exc:
                raise BackendError(
                    f"{request.path}: onnxruntime cannot load it with {chain}: {retry_exc}"
                ) from retry_exc
        self.requested = chain
        self.node_assignment = self._node_assignment()
        self.providers_in_use = [p for p in chain if self.node_assignment.get(p, 0) > 0] + [
            p for p in self.node_assignment if p not in chain
        ]
        self.inputs = [
            TensorSpec(
                name=i.name,
                shape=[d if isinstance(d, int) else str(d) for d in i.shape],
                dtype=normalize_dtype(i.type),
            )
            for i in self.session.get_inputs()
        ]
        model_outputs = self.session.get_outputs()
        names = [o.name for o in model_outputs]
        wanted = [spec.name for spec in request.outputs]
        # Outputs in manifest order when the names match, else the model's own order.
        order = wanted if wanted and all(n in names for n in wanted) else names
        by_name = {o.name: o for o in model_outputs}
        self.outputs = [
            TensorSpec(
                name=n,
                shape=[d if isinstance(d, int) else str(d) for d in by_name[n].shape],
                dtype=normalize_dtype(by_name[n].type),
            )
            for n in order
        ]
        self._output_names = order

    def _node_assignment(self) -> dict[str, int]:
        """Nodes per execution provider after partitioning, read from the built session."""
        getter = getattr(self.session, "get_provider_graph_assignment_info", None)
        if getter is None:  # older onnxruntime: the best it can say is the session's provider list
            return {p: 1 for p in self.session.get_providers()}
        counts: dict[str, int] = {}
        for subgraph in getter():
            counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
        return counts

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        try:
            return list(self.session.run(self._output_names, feeds))
        except Exception as exc:
            raise BackendError(f"onnxruntime run failed: {exc}") from exc

    def close(self) -> None:
        self.__dict__.pop("session", None)


PLUGIN = BackendPlugin(
    key="onnxruntime",
    artifact_format="onnx",
    default_accelerators=(CPU,),
    preference=OnnxRuntimePreference,
    backend=OnnxRuntimeBackend,
    version=version,
)
