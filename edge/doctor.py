"""`edge-infer doctor [--json] [--package PKG] [--profile NAME]`: what this device is and what really works.

Reports the detected profile and why it matched, CPU features, the backends and their versions, the
ONNX Runtime providers and LiteRT delegates present *and* which of them actually run a tiny built-in
model (an accelerator that initialises but computes nothing, or computes wrong numbers, is not working),
the package's golden self-check, and install hints for accelerators the profile expects but that do not
work here.

The tiny ONNX model (1x1 Conv -> ReLU -> GlobalAveragePool) is built with `onnx.helper` when `onnx` is
installed; the device runtime does not depend on `onnx`, so the same bytes ship below as base64 (a test
checks that both are identical). Its TFLite twin (NHWC CONV_2D with fused ReLU -> MEAN, under 1 KB) ships
the same way: `build_tiny_tflite` writes it with the flatbuffers schema module that ai-edge-litert
installs, and a test checks that the shipped bytes are that model. Inline bytes rather than a generated
package-data file: no torch/TensorFlow step to regenerate it, nothing to list in pyproject, and the same
bytes work with tflite-runtime, which ships no schema module.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BackendError, ConfigError, EdgeError

TINY_MODEL_B64 = (
    "CAcSC2VkZ2UtZG9jdG9yGgExOrwBChUKAXgKAXcSAWMaBGNvbnYiBENvbnYKEgoBYxIBchoEcmVsdSIEUmVsdQofCgFyEgF5GgRwb29s"
    "IhFHbG9iYWxBdmVyYWdlUG9vbBILZWRnZV9kb2N0b3IqJwgCCAMIAQgBEAFCAXdKGAAAIL8AAMC+AAAAvgAAAD4AAMA+AAAgP1obCgF4"
    "EhYKFAgBEhAKAggBCgIIAwoCCAQKAggEYhsKAXkSFgoUCAESEAoCCAEKAggCCgIIAQoCCAFCBAoAEA0="
)
TINY_TFLITE_B64 = (
    "CAAAAFRGTDNG////FAAAAJgAAACkAAAA0AIAAAMAAAAHAAAAgAAAAHQAAABMAAAALAAAACQAAAAMAAAABAAAAKD////S////BAAAAAgA"
    "AAABAAAAAgAAALj////q////BAAAAAgAAAAAAIA+AAAAvgAABgAIAAQABgAAAAQAAAAYAAAAAAAgvwAAwL4AAAC+AAAAPgAAwD4AACA/"
    "/P///wQABAAEAAAACwAAAGVkZ2UtZG9jdG9yAAEAAAAUAAAAAAAOABgAFAAQAAwACAAEAA4AAAAUAAAAIAAAANAAAADUAAAA2AAAAAsA"
    "AABlZGdlX2RvY3RvcgACAAAAZAAAABQAAAAAAA4AGgAUABAADAALAAQADgAAABwAAAAAAAAbHAAAACAAAAABAAAAAAAGAAgABwAGAAAA"
    "AAAAAQEAAAAFAAAAAgAAAAMAAAAEAAAAAAAOABQAAAAQAAwACwAEAA4AAAAcAAAAAAAAASgAAAAsAAAADAAUABMADAAIAAcADAAAAAAA"
    "AAEBAAAAAQAAAAAAAAEBAAAAAwAAAAMAAAAAAAAAAQAAAAIAAAABAAAABQAAAAEAAAAAAAAABgAAAPwAAADAAAAAnAAAAGwAAABAAAAA"
    "BAAAACj///8MAAAABgAAAAwAAAABAAAAeQAAAAQAAAABAAAAAQAAAAEAAAACAAAADAAUABAADwAIAAQADAAAABAAAAAFAAAAAAAAAhAA"
    "AAAEAAAAYXhlcwAAAAABAAAAAgAAAIj///8MAAAABAAAAAwAAAABAAAAYwAAAAQAAAABAAAABAAAAAQAAAACAAAAtP///wwAAAADAAAA"
    "DAAAAAEAAABiAAAAAQAAAAIAAADU////DAAAAAIAAAAMAAAAAQAAAHcAAAAEAAAAAgAAAAEAAAABAAAAAwAAAAwAEAAMAAAACAAEAAwA"
    "AAAMAAAAAQAAAAwAAAABAAAAeAAAAAQAAAABAAAABAAAAAQAAAADAAAAAgAAACAAAAAEAAAA9P///ygAAAAAAAAoDAAMAAsAAAAAAAQA"
    "DAAAAAMAAAAAAAAD"
)
# Output tolerance on the tiny models: wrong numbers are off by far more; fp16 GPU delegates are not.
TINY_ATOL = 5e-3
INTERESTING_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "sve",
    "sve2",
    "bf16",
    "neon",
    "vfpv4",
)


def tiny_weights() -> np.ndarray:
    return ((np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1) - 2.5) / 4).astype(np.float32)


def build_tiny_model() -> bytes:
    """The tiny doctor model, built with onnx.helper (needs the `onnx` package)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool"),
    ]
    graph = helper.make_graph(
        nodes,
        "edge_doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 1, 1])],
        [numpy_helper.from_array(tiny_weights(), "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-doctor", producer_version="1"
    )
    model.ir_version = 7
    return bytes(model.SerializeToString())


def tiny_model() -> bytes:
    try:
        return build_tiny_model()
    except ImportError:
        return base64.b64decode(TINY_MODEL_B64)


def tiny_expected(x: np.ndarray) -> np.ndarray:
    conv = np.einsum("oc,nchw->nohw", tiny_weights()[:, :, 0, 0], x)
    return np.maximum(conv, 0).mean(axis=(2, 3), keepdims=True)


def tiny_tflite_bias() -> np.ndarray:
    return np.array([0.25, -0.125], dtype=np.float32)


def build_tiny_tflite() -> bytes:
    """The tiny doctor .tflite, written with the TFLite flatbuffers schema that ai-edge-litert ships."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def tensor(name: str, shape: list[int], buffer: int, dtype: int = schema.TensorType.FLOAT32) -> Any:
        result = schema.TensorT()
        result.name, result.shape, result.buffer, result.type = name, shape, buffer, dtype
        return result

    def buffer(data: np.ndarray | None = None) -> Any:
        result = schema.BufferT()
        if data is not None:
            result.data = list(np.ascontiguousarray(data).tobytes())
        return result

    def opcode(code: int) -> Any:
        result = schema.OperatorCodeT()
        result.builtinCode, result.deprecatedBuiltinCode, result.version = code, code, 1
        return result

    conv = schema.OperatorT()
    conv.opcodeIndex, conv.inputs, conv.outputs = 0, [0, 1, 2], [3]
    conv.builtinOptionsType = schema.BuiltinOptions.Conv2DOptions
    conv.builtinOptions = schema.Conv2DOptionsT()
    conv.builtinOptions.padding = schema.Padding.VALID
    conv.builtinOptions.strideW = conv.builtinOptions.strideH = 1
    conv.builtinOptions.dilationWFactor = conv.builtinOptions.dilationHFactor = 1
    conv.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.RELU
    mean = schema.OperatorT()
    mean.opcodeIndex, mean.inputs, mean.outputs = 1, [3, 4], [5]
    mean.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
    mean.builtinOptions = schema.ReducerOptionsT()
    mean.builtinOptions.keepDims = True

    graph = schema.SubGraphT()
    graph.name = "edge_doctor"
    graph.tensors = [
        tensor("x", [1, 4, 4, 3], 1),
        tensor("w", [2, 1, 1, 3], 2),
        tensor("b", [2], 3),
        tensor("c", [1, 4, 4, 2], 4),
        tensor("axes", [2], 5, schema.TensorType.INT32),
        tensor("y", [1, 1, 1, 2], 6),
    ]
    graph.inputs, graph.outputs, graph.operators = [0], [5], [conv, mean]
    model = schema.ModelT()
    model.version = 3
    model.description = "edge-doctor"
    model.operatorCodes = [opcode(schema.BuiltinOperator.CONV_2D), opcode(schema.BuiltinOperator.MEAN)]
    model.subgraphs = [graph]
    filters_ohwi = tiny_weights()[:, :, 0, 0].reshape(2, 1, 1, 3)
    axes = np.array([1, 2], dtype=np.int32)
    model.buffers = [buffer(), buffer(), buffer(filters_ohwi), buffer(tiny_tflite_bias()), buffer()]
    model.buffers += [buffer(axes), buffer()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tiny_tflite() -> bytes:
    return base64.b64decode(TINY_TFLITE_B64)


def tiny_tflite_input() -> np.ndarray:
    return np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 4, 4, 3)


def tiny_tflite_expected(x: np.ndarray) -> np.ndarray:
    conv = x @ tiny_weights()[:, :, 0, 0].T + tiny_tflite_bias()
    return np.maximum(conv, 0).mean(axis=(1, 2), keepdims=True)


def check_provider(provider: str) -> dict[str, Any]:
    """Run the tiny model on one provider: does it hold nodes, and are the numbers right?"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(tiny_model(), options, providers=[provider])
        x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
        y = session.run(None, {"x": x})[0]
    except Exception as exc:
        return {"name": provider, "works": False, "reason": " ".join(str(exc).split())[:200]}
    held: dict[str, int] = {}
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is not None:
        for subgraph in getter():
            held[subgraph.ep_name] = held.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    else:
        held = {p: 1 for p in session.get_providers()}
    if held.get(provider, 0) == 0:
        return {"name": provider, "works": False, "reason": f"holds no nodes (ran on {', '.join(held)})"}
    if not np.allclose(y, tiny_expected(x), atol=1e-3):
        return {"name": provider, "works": False, "reason": "wrong numbers on the tiny model"}
    return {"name": provider, "works": True, "nodes": held[provider]}


def check_delegate(
    delegate: str, options: dict[str, Any] | None = None, model: bytes | None = None
) -> dict[str, Any]:
    """Run the tiny .tflite on one delegate: does its library load, does it take nodes, are the numbers right?

    `xnnpack` is the interpreter's default path, `cpu` its reference kernels with no delegate at all;
    anything else is an external delegate library (`gpu`, `nnapi`, `edgetpu`, ... or a library name)."""
    from edge.backends import litert

    entry: dict[str, Any] = {"name": delegate}
    if delegate not in litert.BUILTIN:
        entry["library"] = litert.delegate_library(delegate)
    try:
        litert.interpreter_module()
    except BackendError as exc:
        return {
            **entry,
            "present": False,
            "works": False,
            "reason": str(exc),
            "install": litert.RUNTIME_INSTALL,
        }
    try:
        interpreter, kept = litert.open_interpreter(
            delegate, options or {}, 1, model_content=model or tiny_tflite()
        )
    except litert.DelegateUnavailable as exc:
        reason = str(exc).removeprefix(f"delegate {delegate}: ")
        return {**entry, "present": False, "works": False, "reason": reason, "install": exc.install}
    except BackendError as exc:
        return {**entry, "present": True, "works": False, "reason": str(exc)}
    entry["present"] = True
    x = tiny_tflite_input()
    try:
        nodes = litert.delegated_nodes(interpreter)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    except (ValueError, RuntimeError) as exc:
        return {**entry, "works": False, "reason": f"tiny model failed: {' '.join(str(exc).split())[:160]}"}
    finally:
        del interpreter, kept  # the interpreter goes before the delegate it runs on
    error = float(np.abs(y - tiny_tflite_expected(x)).max()) if y.shape == (1, 1, 1, 2) else float("inf")
    entry.update({"nodes": nodes, "max_error": error})
    if error > TINY_ATOL:
        return {**entry, "works": False, "reason": f"wrong numbers on the tiny model (max error {error:.3g})"}
    if delegate == "cpu" or nodes is None:  # reference kernels; or an interpreter that cannot show its graph
        return {**entry, "works": True}
    if nodes == 0:
        if litert.delegate_short_name(delegate) == "edgetpu":
            # The Edge TPU runs only graphs compiled by edgetpu_compiler: loading is all a float model shows.
            return {**entry, "works": True, "note": "library loads; only edgetpu_compiler graphs run on it"}
        return {**entry, "works": False, "reason": "loads but takes no node of the tiny model"}
    return {**entry, "works": True}


def _backend_versions() -> dict[str, str]:
    from edge.backends import registry

    return {name: plugin.version() for name, plugin in registry.plugins().items()}


def collect(profile_name: str | None = None, package_dir: str | None = None) -> dict[str, Any]:
    from edge.backends.litert import LiteRTPreference
    from edge.backends.onnxruntime import OnnxRuntimePreference
    from edge.profiles import HostFacts, resolve_profile

    facts = HostFacts.from_system()
    report: dict[str, Any] = {
        "host": {"arch": facts.arch, "machine": platform.machine(), "python": platform.python_version()},
        "cpu_features": sorted(f for f in INTERESTING_FLAGS if f in facts.cpu_flags),
    }
    if facts.device_tree_model:
        report["host"]["device_tree_model"] = facts.device_tree_model
    profile = None
    try:
        detection = resolve_profile(profile_name or "auto")
        profile = detection.profile
        report["profile"] = {"name": profile.name, "why": detection.reasons, "fallback": profile.fallback}
    except ConfigError as exc:
        report["profile"] = {"name": None, "error": str(exc)}
    report["backends"] = _backend_versions()

    providers: list[dict[str, Any]] = []
    try:
        import onnxruntime

        present = onnxruntime.get_available_providers()
        wanted = [
            provider
            for pref in (profile.backends if profile else [])
            if isinstance(pref, OnnxRuntimePreference)
            for provider in pref.providers
        ]
        for name in dict.fromkeys(present + wanted):
            entry = (
                check_provider(name)
                if name in present
                else {"name": name, "works": False, "reason": "not in this onnxruntime build"}
            )
            entry["present"] = name in present
            providers.append(entry)
    except ImportError:
        pass
    report["providers"] = providers

    delegates: list[dict[str, Any]] = []
    chosen = profile.backend("litert") if profile else None
    litert_pref = chosen if isinstance(chosen, LiteRTPreference) else None
    for name in dict.fromkeys(["xnnpack", "cpu", *(litert_pref.delegates if litert_pref else [])]):
        delegates.append(check_delegate(name, litert_pref.options.get(name) if litert_pref else None))
    report["delegates"] = delegates

    broken = {e["name"] for e in providers + delegates if not e["works"]}
    hints = {e["name"]: e["install"] for e in delegates if not e["works"] and e.get("install")}
    hints.update(profile.install_hints if profile else {})  # the profile knows its device best
    report["install_hints"] = {name: hint for name, hint in hints.items() if name in broken}

    if package_dir:
        report["package"] = self_check(package_dir, profile)
    return report


def self_check(path: str, profile: Any) -> dict[str, Any]:
    from edge.package import package_dir

    try:
        with package_dir(path) as root:
            return {**_self_check(root, profile), "path": path}
    except EdgeError as exc:
        return {"path": path, "ok": False, "error": str(exc)}


def _self_check(package_dir: Path, profile: Any) -> dict[str, Any]:
    """Open the package as `edge-infer run` does (`open_session`: backend, golden check, pre-processing,
    decoder, warm-up), so that doctor passes exactly the packages the daemon serves."""
    from edge.package import load_package
    from edge.session import open_session

    events: list[dict[str, Any]] = []
    try:
        package = load_package(package_dir)
        if profile is None:
            raise ConfigError("no device profile to load the package with")
        session = open_session(
            package, profile, on_event=lambda name, data: events.append({"event": name, **data})
        )
    except (EdgeError, ValueError) as exc:
        return {"ok": False, "error": str(exc)}
    model = session.loaded
    result = {
        "name": package.manifest.name,
        "version": package.manifest.version,
        "ok": model.golden.passed if model.golden else True,
        "backend": model.backend_name,
        "provider": model.provider,
        "artifact": model.artifact.path,
        "fallback": model.fallback,
        "attempts": [a.to_dict() for a in model.attempts],
        "golden": model.golden.to_dict() if model.golden else None,
        "golden_summary": model.golden.summary() if model.golden else "package has no golden data",
    }
    session.close()
    return result


def render(report: dict[str, Any]) -> str:
    lines = []
    prof = report["profile"]
    if prof.get("name"):
        lines.append(
            f"profile      {prof['name']}  (because: {', '.join(prof['why'])}; fallback: {prof['fallback']})"
        )
    else:
        lines.append(f"profile      none: {prof.get('error')}")
    host = report["host"]
    lines.append(
        f"host         {host['arch']} python {host['python']}"
        + (f" device-tree '{host['device_tree_model']}'" if "device_tree_model" in host else "")
    )
    lines.append(f"cpu features {' '.join(report['cpu_features']) or '-'}")
    lines.append("backends     " + "; ".join(f"{k} {v}" for k, v in report["backends"].items()))
    for kind in ("providers", "delegates"):
        for entry in report[kind]:
            lines.append(f"{kind[:-1]:<12} {entry['name']:<34} {_state(entry)}")
    for name, hint in report["install_hints"].items():
        lines.append(f"hint         {name}: {hint}")
    if "package" in report:
        pkg = report["package"]
        if "error" in pkg:
            lines.append(f"package      {pkg['path']}: FAILED: {pkg['error']}")
        else:
            lines.append(
                f"package      {pkg['name']} {pkg['version']} on {pkg['backend']} {pkg['provider']}"
                f"{' (fallback)' if pkg['fallback'] else ''}: {pkg['golden_summary']}"
            )
    return "\n".join(lines)


def _state(entry: dict[str, Any]) -> str:
    if entry["works"]:
        detail = [f"holds {entry['nodes']} node(s)"] if entry.get("nodes") else []
        if "max_error" in entry:
            detail.append(f"tiny model max error {entry['max_error']:.1e}")
        if "note" in entry:
            detail.append(entry["note"])
        return "works" + (f" ({'; '.join(detail)})" if detail else "")
    if not entry.get("present", True):
        return f"ABSENT: {entry.get('reason', '')}"
    return f"FAILING: {entry.get('reason', '')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--package", metavar="PKG", help="also load this package and run its golden self-check"
    )
    parser.add_argument(
        "--profile", default=None, help="device profile name or path (default: the config's, else auto)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="also check this daemon config: its files (as check-config), its package, and the broker, "
        "tried with the config's TLS and credentials",
    )


def check_config(path: Path) -> dict[str, Any]:
    """What `check-config` finds, plus one real connection to the configured broker."""
    from edge.config import load_config, preflight
    from edge.publish.mqtt import probe_broker

    config = load_config(path)
    findings = [
        {"where": f.where, "message": f.message, "fatal": f.fatal}
        for f in preflight(config)
        if f.where != "mqtt"  # the broker is tried below instead
    ]
    try:
        broker = probe_broker(config.mqtt, f"edge-doctor-{config.device_id}-{os.getpid()}")
    except ConfigError as exc:
        broker = {"ok": False, "reason": "config", "detail": str(exc)}
    return {
        "path": str(path),
        "device_id": config.device_id,
        "profile": config.profile,
        "model": str(config.model),
        "findings": findings,
        "broker": {"host": config.mqtt.host, "port": config.mqtt.port, **broker},
        "ok": bool(broker["ok"]) and not any(f["fatal"] for f in findings),
    }


def render_config(checked: dict[str, Any]) -> str:
    lines = [f"config       {checked['path']}: device {checked['device_id']}"]
    for finding in checked["findings"]:
        kind = "error" if finding["fatal"] else "warning"
        lines.append(f"config       {kind}: {finding['where']}: {finding['message']}")
    broker = checked["broker"]
    where = f"{broker['host']}:{broker['port']}"
    if broker["ok"]:
        lines.append(f"broker       {where}: connected ({broker['detail']})")
    else:
        lines.append(f"broker       {where}: FAILED ({broker['reason']}): {broker['detail']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.package and not Path(args.package).exists():
        raise ConfigError(f"{args.package}: neither a package directory nor a package .tar")
    checked = check_config(args.config) if args.config else None
    profile = args.profile or (checked["profile"] if checked else "auto")
    package_dir = args.package or (checked["model"] if checked else None)
    report = collect(profile, package_dir)
    if checked:
        report["config"] = checked
    text = render(report) + ("\n" + render_config(checked) if checked else "")
    print(json.dumps(report, indent=2) if args.json else text)
    package = report.get("package")
    failed = package is not None and not package.get("ok")
    return 1 if failed or (checked and not checked["ok"]) else 0
