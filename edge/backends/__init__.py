"""Inference backends behind one protocol, chosen per device profile, verified before they serve.

`load_model(package, profile)` walks the profile's backends and accelerators best first (ONNX Runtime
execution providers, LiteRT delegates), opens the package artifact each backend reads, checks that the
accelerator really holds nodes, and runs the package's golden inputs against its golden outputs. The first
candidate that passes serves. Anything that did not work on the way is a *fallback*; the profile's policy
decides what happens to it: `allow` (log and count), `warn` (also `on_event("fallback", ...)`), `forbid`
(refuse with one line naming the provider or delegate).

Which backends exist is not written here: `edge.backends.registry` finds every module of this package
that declares a `PLUGIN` (its key, artifact format, default accelerators, profile preference type and
backend class; see `edge.backends.base`). Plugin modules import their runtimes only when a model is opened,
so `import edge.backends` costs nothing and a device without ai-edge-litert never imports it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.backends import registry
from edge.backends.base import Backend, BackendPlugin, LoadRequest, PreferenceBase
from edge.backends.golden import GoldenReport, run_golden
from edge.errors import BackendError, EdgeError
from edge.jsontypes import JSONObject
from edge.package import Artifact, Package, TensorSpec

if TYPE_CHECKING:  # edge.profiles builds its `backends:` union from the registry, so it imports us
    from edge.profiles import DeviceProfile

log = logging.getLogger(__name__)

# name, payload: "fallback" with {"package", "from", "to", "policy"}
EventCallback = Callable[[str, JSONObject], None]

_fallbacks: Counter[str] = Counter()
_fallbacks_lock = threading.Lock()


def fallback_counts() -> dict[str, int]:
    """Fallbacks since start, keyed by the accelerator that was given up (for metrics)."""
    with _fallbacks_lock:
        return dict(_fallbacks)


def _count_fallback(what: str) -> None:
    with _fallbacks_lock:
        _fallbacks[what] += 1


@dataclass(frozen=True)
class Attempt:
    backend: str
    accelerator: str
    ok: bool
    reason: str = ""

    def to_dict(self) -> JSONObject:
        return {
            "backend": self.backend,
            "accelerator": self.accelerator,
            "ok": self.ok,
            "reason": self.reason,
        }


@dataclass
class LoadedModel:
    """A backend that passed its golden check, with the provenance a prediction carries."""

    backend: Backend
    artifact: Artifact
    package: Package
    provider: str
    fallback: bool
    attempts: list[Attempt]
    golden: GoldenReport | None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def input_specs(self) -> list[TensorSpec]:
        """What the pre-processor must produce for this artifact (its own I/O, else the package's)."""
        return self.artifact.inputs or self.package.manifest.inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self.artifact.outputs or self.package.manifest.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.backend.run(feeds)

    def self_check(self) -> GoldenReport:
        """Run the package's golden inputs now and compare them with its golden outputs."""
        report = golden_check(self.backend, self.package, self.artifact)
        if report is None:
            raise BackendError(f"package '{self.package.manifest.name}' has no golden data to check against")
        return report

    def close(self) -> None:
        self.backend.close()


def relayout(array: np.ndarray, source: str | None, target: str | None) -> np.ndarray:
    """NCHW <-> NHWC when a package tensor and an artifact's own tensor disagree on layout."""
    if array.ndim == 4 and source == "NCHW" and target == "NHWC":
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    if array.ndim == 4 and source == "NHWC" and target == "NCHW":
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    return array


def _to_backend_input(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    wanted = np.dtype(spec.dtype)
    if array.dtype.kind == "f" and wanted.kind in "iu" and spec.scale:
        info = np.iinfo(wanted)
        quantized = np.round(array / spec.scale) + (spec.zero_point or 0)
        return np.clip(quantized, info.min, info.max).astype(wanted)
    return array


def golden_check(backend: Backend, package: Package, artifact: Artifact | None = None) -> GoldenReport | None:
    """Golden data is stored in the package's tensor layout; an artifact with its own I/O (an NHWC
    .tflite beside an NCHW .onnx, int8 inputs) gets it converted the way the pre-processor would."""
    manifest = package.manifest
    golden = manifest.golden
    if golden is None:
        return None
    package_inputs, package_outputs = manifest.inputs, manifest.outputs
    artifact_inputs, artifact_outputs = _artifact_specs(package, artifact) if artifact else (None, None)
    artifact_inputs = artifact_inputs or package_inputs
    artifact_outputs = artifact_outputs or package_outputs
    if len(backend.inputs) != len(package_inputs) or len(backend.outputs) != len(package_outputs):
        raise BackendError(
            f"model has {len(backend.inputs)} inputs/{len(backend.outputs)} outputs, the manifest lists "
            f"{len(package_inputs)}/{len(package_outputs)}"
        )

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        adapted = {
            model_spec.name: _to_backend_input(
                relayout(feeds[spec.name], spec.layout, own.layout), model_spec
            )
            for spec, own, model_spec in zip(package_inputs, artifact_inputs, backend.inputs, strict=True)
        }
        outputs = backend.run(adapted)
        return [
            relayout(np.asarray(out), own.layout, spec.layout)
            for out, own, spec in zip(outputs, artifact_outputs, package_outputs, strict=True)
        ]

    return run_golden(
        run,
        package_inputs,
        package_outputs,
        package.path(golden.inputs),
        package.path(golden.outputs),
        golden.tolerance,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime")) / "engines"


def pick_artifact(package: Package, backend: str, profile: DeviceProfile) -> Artifact | None:
    """The package artifact this backend reads, preferring the profile's precision."""
    fmt = registry.artifact_format(backend)
    matching = [a for a in package.manifest.artifacts if a.format == fmt]
    preferred = [a for a in matching if a.precision == profile.quantization.precision]
    candidates = preferred or matching
    return candidates[0] if candidates else None


def _candidates(
    profile: DeviceProfile, backend: str | None
) -> list[tuple[BackendPlugin, list[str], PreferenceBase]]:
    """(plugin, accelerator chain, preference) best first; each plugin turns its preference into chains."""
    prefs: list[PreferenceBase] = list(profile.backends)
    if backend is not None:
        forced = registry.plugin_for(backend)
        prefs = [profile.backend(backend) or forced.preference(name=backend)]
    out: list[tuple[BackendPlugin, list[str], PreferenceBase]] = []
    for pref in prefs:
        plugin = registry.plugin_for(pref.name)
        out.extend((plugin, chain, pref) for chain in plugin.candidate_chains(pref))
    return out


def _artifact_specs(package: Package, artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    manifest = package.manifest
    return artifact.inputs or manifest.inputs, artifact.outputs or manifest.outputs


def load_model(
    package: Package,
    profile: DeviceProfile,
    *,
    backend: str | None = None,
    threads: int | None = None,
    on_event: EventCallback | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Open the best backend/accelerator for this package on this profile that passes the golden check."""
    policy = profile.fallback
    failures: list[Attempt] = []
    attempts: list[Attempt] = []
    manifest = package.manifest

    if manifest.profile and manifest.profile != profile.name:
        reason = f"package '{manifest.name}' was built for profile '{manifest.profile}', this device is '{profile.name}'"
        if policy == "forbid":
            raise BackendError(f"{reason} (fallback policy: forbid)")
        failures.append(Attempt("package", f"profile:{manifest.profile}", False, reason))

    engines_root = cache_dir or default_cache_dir()
    for plugin, chain, pref in _candidates(profile, backend):
        name, accelerator = plugin.key, chain[0]
        artifact = pick_artifact(package, name, profile)
        if artifact is None:
            attempts.append(
                Attempt(name, accelerator, False, f"package has no {plugin.artifact_format} artifact")
            )
            continue
        inputs, outputs = _artifact_specs(package, artifact)
        request = LoadRequest(
            path=package.path(artifact.path),
            inputs=inputs,
            outputs=outputs,
            accelerators=list(chain),
            options={k: dict(v) for k, v in pref.options.items()},
            threads=profile.threads if threads is None else threads,
            cache_dir=engines_root / artifact.sha256[:16],
        )
        attempt, loaded = _try_candidate(plugin, accelerator, request, package, artifact)
        attempts.append(attempt)
        if loaded is None:
            failures.append(attempt)
            if policy == "forbid":
                break
            continue
        backend_obj, report = loaded
        fallback = bool(failures)
        if fallback:
            _apply_policy(policy, failures, attempt, manifest.name, on_event)
        provider = backend_obj.providers_in_use[0] if backend_obj.providers_in_use else accelerator
        return LoadedModel(backend_obj, artifact, package, provider, fallback, attempts, report)

    if not attempts:
        raise BackendError(f"profile '{profile.name}' names no backend for package '{manifest.name}'")
    if failures and policy == "forbid":
        first = failures[0]
        raise BackendError(
            f"{first.backend} {first.accelerator} unusable and fallback policy is forbid: {first.reason}"
        )
    reasons = "; ".join(f"{a.backend} {a.accelerator}: {a.reason}" for a in attempts)
    raise BackendError(f"no backend can run package '{manifest.name}' here: {reasons}")


def _try_candidate(
    plugin: BackendPlugin, accelerator: str, request: LoadRequest, package: Package, artifact: Artifact
) -> tuple[Attempt, tuple[Backend, GoldenReport | None] | None]:
    name = plugin.key
    try:
        backend_obj = plugin.backend(request)
    except EdgeError as exc:
        return Attempt(name, accelerator, False, str(exc)), None
    if accelerator not in backend_obj.providers_in_use:
        held = ", ".join(backend_obj.providers_in_use) or "nothing"
        backend_obj.close()
        return Attempt(name, accelerator, False, f"{accelerator} holds no nodes (in use: {held})"), None
    try:
        report = golden_check(backend_obj, package, artifact)
    except BackendError as exc:
        backend_obj.close()
        return Attempt(name, accelerator, False, f"golden run failed: {exc}"), None
    if report is not None and not report.passed:
        backend_obj.close()
        return Attempt(name, accelerator, False, report.summary()), None
    return Attempt(name, accelerator, True), (backend_obj, report)


def _apply_policy(
    policy: str, failures: list[Attempt], chosen: Attempt, package_name: str, on_event: EventCallback | None
) -> None:
    for failure in failures:
        _count_fallback(failure.accelerator)
    event: JSONObject = {
        "package": package_name,
        "from": [failure.to_dict() for failure in failures],
        "to": {"backend": chosen.backend, "accelerator": chosen.accelerator},
        "policy": policy,
    }
    text = "; ".join(f"{f.backend} {f.accelerator}: {f.reason}" for f in failures)
    if policy == "warn":
        log.warning("fell back to %s %s (%s)", chosen.backend, chosen.accelerator, text)
        if on_event is not None:
            on_event("fallback", event)
    else:
        log.info("fell back to %s %s (%s)", chosen.backend, chosen.accelerator, text)
