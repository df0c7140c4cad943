"""Device profiles: what a device can run and how a model for it should be built.

A profile is a YAML file in `device_profiles/` (or a directory named by `EDGE_PROFILES_DIR`). Both halves
read it: the converter takes the quantization scheme and formats, the runtime the backends, providers,
threads and fallback policy. `detect_profile` picks one from `/proc/cpuinfo`, `/proc/device-tree/model`,
the machine architecture and the libraries present.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.backends import registry
from edge.backends.base import PreferenceBase
from edge.errors import ConfigError
from edge.yamlio import load_model

FallbackPolicy = Literal["allow", "warn", "forbid"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# One `backends:` entry: the preference model of the backend its `name` picks (ONNX Runtime `providers`,
# LiteRT `delegates`, ...), each with extra="forbid", so a key of another backend is an error.
if TYPE_CHECKING:
    BackendPreference = PreferenceBase
else:
    BackendPreference = registry.preference_union()


class QuantizationScheme(_Strict):
    """How `edge-convert` should compress a model for this device."""

    precision: Literal["int8", "fp16", "fp32"] = "int8"
    scheme: Literal["qdq", "qoperator"] = "qdq"
    activations: Literal["uint8", "int8"] = "uint8"
    weights: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    # 7-bit weights: x86 without VNNI sums u8 x s8 pairs in int16 (VPMADDUBSW), which full-range weights saturate.
    reduce_range: bool = False
    formats: list[Literal["onnx", "tflite"]] = Field(default_factory=lambda: ["onnx"])  # type: ignore[arg-type]


class PruningScheme(_Strict):
    """How `edge-convert --prune` should shape a model for this device."""

    # Kept channel counts are rounded up to this multiple. The device's int8 kernels work on whole vectors
    # of channels and fall back to slow tails otherwise: on x86 AVX2 (ORT/MLAS), EfficientNet-Lite0 pruned
    # 0.3 with multiples of 8 ran its int8 depthwise convs 22 % *slower* than the unpruned model; with 16
    # they ran 36 % faster.
    channel_multiple: int = Field(default=8, ge=1, le=256)


class DetectRules(_Strict):
    """All given rules must match; the highest `priority` among matching profiles wins."""

    arch: list[str] = Field(default_factory=list)
    cpu_flags_all: list[str] = Field(default_factory=list)
    cpu_flags_any: list[str] = Field(default_factory=list)
    device_tree_model: list[str] = Field(default_factory=list)
    libraries_any: list[str] = Field(default_factory=list)
    priority: int = 0


class DeviceProfile(_Strict):
    name: str
    description: str
    arch: Literal["x86_64", "aarch64", "armv7l"]
    isa: list[str] = Field(default_factory=list)
    cores: int | None = Field(default=None, ge=1)
    memory_mb: int | None = Field(default=None, ge=64)
    backends: list[BackendPreference] = Field(min_length=1)
    threads: int = Field(default=0, ge=0, description="0: one per physical core")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="inference workers the daemon runs when its config does not say (each a session copy)",
    )
    quantization: QuantizationScheme = Field(default_factory=QuantizationScheme)
    pruning: PruningScheme = Field(default_factory=PruningScheme)
    fallback: FallbackPolicy = "warn"
    detect: DetectRules = Field(default_factory=DetectRules)
    install_hints: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("must be letters, digits, '-', '_' or '.'")
        return value

    def backend(self, name: str) -> BackendPreference | None:
        return next((b for b in self.backends if b.name == name), None)


def profiles_dir() -> Path:
    """Where profiles live: $EDGE_PROFILES_DIR, else the installed `device_profiles` package."""
    override = os.environ.get("EDGE_PROFILES_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("device_profiles")))


def load_profile_file(path: Path) -> DeviceProfile:
    profile = load_model(path, DeviceProfile)
    if profile.name != path.stem:
        raise ConfigError(f"{path}:1: name: '{profile.name}' does not match the file name '{path.stem}'")
    return profile


def available_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    directory = directory or profiles_dir()
    return {p.stem: load_profile_file(p) for p in sorted(directory.glob("*.yaml"))}


def load_profile(name_or_path: str, directory: Path | None = None) -> DeviceProfile:
    """A profile by name (from the profiles directory) or by path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not _is_file(candidate):
            raise ConfigError(f"{candidate}: device profile file not found")
        return load_profile_file(candidate)
    directory = directory or profiles_dir()
    path = directory / f"{name_or_path}.yaml"
    if not _is_file(path):
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"unknown device profile '{name_or_path}' (known: {known})")
    return load_profile_file(path)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system is not a profile either
        return False


@dataclass(frozen=True)
class HostFacts:
    """What auto-detection looks at; built from the live machine or given in tests."""

    arch: str
    cpu_flags: frozenset[str]
    device_tree_model: str = ""
    libraries: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_system(cls, proc: Path = Path("/proc")) -> HostFacts:
        cpuinfo = _read(proc / "cpuinfo")
        model = _read(proc / "device-tree" / "model").rstrip("\x00").strip()
        return cls(
            arch=_normalize_arch(platform.machine()),
            cpu_flags=parse_cpu_flags(cpuinfo),
            device_tree_model=model,
            libraries=frozenset(),
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _normalize_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def _library_present(name: str, facts: HostFacts) -> bool:
    if name in facts.libraries:
        return True
    if facts.libraries:  # explicit facts given (tests): do not look at the live system
        return False
    if os.sep in name:
        return Path(name).exists()
    return ctypes.util.find_library(name.removeprefix("lib").split(".so")[0]) is not None


def match_reasons(profile: DeviceProfile, facts: HostFacts) -> list[str] | None:
    """Why the profile matches this host, or None if any rule fails."""
    rules = profile.detect
    reasons: list[str] = []
    if facts.arch != profile.arch:
        return None
    reasons.append(f"arch {facts.arch}")
    if rules.arch and facts.arch not in rules.arch:
        return None
    missing = [f for f in rules.cpu_flags_all if f not in facts.cpu_flags]
    if missing:
        return None
    if rules.cpu_flags_all:
        reasons.append("cpu flags " + ",".join(rules.cpu_flags_all))
    if rules.cpu_flags_any:
        hit = [f for f in rules.cpu_flags_any if f in facts.cpu_flags]
        if not hit:
            return None
        reasons.append("cpu flag " + hit[0])
    if rules.device_tree_model:
        hit = [m for m in rules.device_tree_model if m.lower() in facts.device_tree_model.lower()]
        if not hit:
            return None
        reasons.append(f"device-tree model '{facts.device_tree_model}'")
    if rules.libraries_any:
        hit = [lib for lib in rules.libraries_any if _library_present(lib, facts)]
        if not hit:
            return None
        reasons.append("library " + hit[0])
    return reasons


@dataclass(frozen=True)
class Detection:
    profile: DeviceProfile
    reasons: list[str]


def detect_profile(facts: HostFacts | None = None, directory: Path | None = None) -> Detection:
    """The best matching profile for this host (highest detect.priority among matches)."""
    facts = facts or HostFacts.from_system()
    matches: list[tuple[int, str, DeviceProfile, list[str]]] = []
    for name, profile in available_profiles(directory).items():
        reasons = match_reasons(profile, facts)
        if reasons is not None:
            matches.append((profile.detect.priority, name, profile, reasons))
    if not matches:
        raise ConfigError(
            f"no device profile matches this host (arch {facts.arch}); set `profile:` explicitly"
        )
    matches.sort(key=lambda m: (m[0], m[1]), reverse=True)
    _, _, profile, reasons = matches[0]
    return Detection(profile=profile, reasons=reasons)


def resolve_profile(name: str | None, directory: Path | None = None) -> Detection:
    """`auto`/None detects; anything else loads by name or path."""
    if name in (None, "", "auto"):
        return detect_profile(directory=directory)
    return Detection(profile=load_profile(name, directory), reasons=["chosen explicitly"])
