"""`edge-infer doctor [--json] [--package PKG] [--profile NAME]`: what this device is and what really works.

Reports the detected profile and why it matched, CPU features, the backends and their versions, the
ONNX Runtime providers and LiteRT delegates present *and* which of them actually run a tiny built-in
model (an accelerator that initialises but computes nothing, or computes wrong numbers, is not working),
the package's golden self-check, and install hints for accelerators the profile expects but that do not
work here.

The tiny model (1x1 Conv -> ReLU -> GlobalAveragePool) is built with `onnx.helper` when `onnx` is
installed; the device runtime does not depend on `onnx`, so the same bytes ship below as base64 (a test
checks that both are identical).
"""

from __future__ import annotations

import argparse
import base64
import json
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


def check_delegate(delegate: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Built-in delegates work when an interpreter imports; external ones when the library loads."""
    from edge.backends import litert

    try:
        module = litert.interpreter_module()
    except BackendError as exc:
        return {"name": delegate, "works": False, "reason": str(exc)}
    if delegate in litert.BUILTIN:
        return {"name": delegate, "works": True}
    library = litert.DELEGATE_LIBRARIES.get(delegate, delegate)
    loader = getattr(litert._module_of(getattr(module, "Interpreter", module)), "load_delegate", None)
    if loader is None:
        return {"name": delegate, "works": False, "reason": "this interpreter cannot load delegates"}
    try:
        loader(library, {k: str(v) for k, v in (options or {}).items()})
    except (ValueError, OSError, RuntimeError) as exc:
        return {
            "name": delegate,
            "works": False,
            "reason": f"cannot load '{library}': {' '.join(str(exc).split())[:160]}",
        }
    return {"name": delegate, "works": True, "library": library}


def _backend_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    try:
        from edge.backends import onnxruntime as ort_backend

        versions["onnxruntime"] = ort_backend.version()
    except ImportError as exc:
        versions["onnxruntime"] = f"absent ({exc})"
    from edge.backends import litert

    versions["litert"] = litert.version()
    return versions


def collect(profile_name: str | None = None, package_dir: str | None = None) -> dict[str, Any]:
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
        wanted = [p for pref in (profile.backends if profile else []) for p in pref.providers]
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
    litert_pref = profile.backend("litert") if profile else None
    for name in dict.fromkeys(["xnnpack", *(litert_pref.delegates if litert_pref else [])]):
        delegates.append(check_delegate(name, litert_pref.options.get(name) if litert_pref else None))
    report["delegates"] = delegates

    broken = {e["name"] for e in providers + delegates if not e["works"]}
    hints = profile.install_hints if profile else {}
    report["install_hints"] = {name: hint for name, hint in hints.items() if name in broken}

    if package_dir:
        report["package"] = self_check(package_dir, profile)
    return report


def self_check(package_dir: str, profile: Any) -> dict[str, Any]:
    from edge.backends import load_model
    from edge.package import load_package

    events: list[dict[str, Any]] = []
    try:
        package = load_package(package_dir)
        if profile is None:
            raise ConfigError("no device profile to load the package with")
        model = load_model(
            package, profile, on_event=lambda name, data: events.append({"event": name, **data})
        )
    except EdgeError as exc:
        return {"path": package_dir, "ok": False, "error": str(exc)}
    result = {
        "path": package_dir,
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
    model.close()
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
            state = "works" if entry["works"] else f"NOT usable: {entry.get('reason', '')}"
            lines.append(f"{kind[:-1]:<12} {entry['name']:<34} {state}")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--package", metavar="PKG", help="also load this package and run its golden self-check"
    )
    parser.add_argument("--profile", default="auto", help="device profile name or path (default: auto)")


def main(args: argparse.Namespace) -> int:
    if args.package and not Path(args.package).exists():
        raise ConfigError(f"{args.package}: package directory not found")
    report = collect(args.profile, args.package)
    print(json.dumps(report, indent=2) if args.json else render(report))
    package = report.get("package")
    return 1 if package is not None and not package.get("ok") else 0
