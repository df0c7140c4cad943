"""ONNX Runtime backend: real sessions on tiny onnx.helper packages; fallback policy with absent providers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.backends import fallback_counts, load_model
from edge.errors import BackendError
from edge.package import load_package
from edge.profiles import DeviceProfile, load_profile
from tests.test_backends_support import classifier_package


def profile_with(
    providers: list[str], fallback: str = "allow", name: str = "test-profile", **extra: Any
) -> DeviceProfile:
    return DeviceProfile.model_validate(
        {
            "name": name,
            "description": "test",
            "arch": "x86_64",
            "backends": [{"name": "onnxruntime", "providers": providers, **extra}],
            "threads": 1,
            "fallback": fallback,
        }
    )


@pytest.fixture
def package(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_package(classifier_package(tmp_path / "cls"))


def test_cpu_session_reports_the_provider_holding_nodes_and_passes_golden(package, tmp_path: Path) -> None:
    model = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    assert model.backend_name == "onnxruntime"
    assert model.provider == "CPUExecutionProvider"
    assert model.backend.providers_in_use == ["CPUExecutionProvider"]
    assert sum(model.backend.node_assignment.values()) >= 4  # conv, relu, pool, gemm (some may fuse)
    assert model.fallback is False
    assert model.golden is not None and model.golden.passed and model.golden.samples == 3
    assert model.self_check().passed


def test_outputs_match_a_bare_onnxruntime_session(package, tmp_path: Path) -> None:
    model = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    batch = np.load(package.root / "golden/inputs.npz")["input"][1:2]
    want = np.load(package.root / "golden/outputs.npz")["logits"][1:2]
    np.testing.assert_allclose(model.run({"input": batch})[0], want, rtol=1e-4, atol=1e-5)


def test_optimized_model_is_cached_and_reused(package, tmp_path: Path) -> None:
    first = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    cached = first.backend.optimized_model
    assert cached is not None and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    second = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    assert second.backend.optimized_model == cached and cached.stat().st_mtime_ns == stamp
    assert second.golden is not None and second.golden.passed


def test_truncated_cached_graph_is_rebuilt(package, tmp_path: Path) -> None:
    first = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    cached = first.backend.optimized_model
    assert cached is not None
    cached.write_bytes(cached.read_bytes()[:50])  # a crash while ORT was writing it
    again = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "engines")
    assert again.golden is not None and again.golden.passed
    assert cached.stat().st_size > 50


@pytest.mark.parametrize("missing", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
def test_allow_falls_back_to_cpu_and_counts(package, tmp_path: Path, missing: str) -> None:
    before = fallback_counts().get(missing, 0)
    events: list[tuple[str, dict]] = []
    model = load_model(
        package,
        profile_with([missing, "CPUExecutionProvider"], "allow"),
        on_event=lambda n, d: events.append((n, d)),
        cache_dir=tmp_path / "engines",
    )
    assert model.fallback is True and model.provider == "CPUExecutionProvider"
    assert fallback_counts()[missing] == before + 1
    assert events == []
    assert not model.attempts[0].ok and missing in model.attempts[0].reason


def test_warn_falls_back_and_publishes_an_event(package, tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    model = load_model(
        package,
        profile_with(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "warn"),
        on_event=lambda n, d: events.append((n, d)),
        cache_dir=tmp_path / "engines",
    )
    assert model.provider == "CPUExecutionProvider"
    assert [name for name, _ in events] == ["fallback"]
    data = events[0][1]
    assert [f["accelerator"] for f in data["from"]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert data["to"] == {"backend": "onnxruntime", "accelerator": "CPUExecutionProvider"}


def test_forbid_refuses_naming_the_provider(package, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="TensorrtExecutionProvider.*forbid"):
        load_model(
            package,
            profile_with(["TensorrtExecutionProvider", "CPUExecutionProvider"], "forbid"),
            cache_dir=tmp_path / "engines",
        )


def test_golden_mismatch_is_refused_even_under_allow(tmp_path: Path) -> None:
    package = load_package(classifier_package(tmp_path / "bad", corrupt_golden=True))
    with pytest.raises(BackendError, match="golden check FAILED"):
        load_model(package, profile_with(["CPUExecutionProvider"], "allow"), cache_dir=tmp_path / "e")


def test_package_for_another_profile(tmp_path: Path) -> None:
    package = load_package(classifier_package(tmp_path / "other", profile="jetson-orin-nano"))
    with pytest.raises(BackendError, match="built for profile 'jetson-orin-nano'"):
        load_model(package, profile_with(["CPUExecutionProvider"], "forbid"), cache_dir=tmp_path / "e")
    events: list[tuple[str, dict]] = []
    model = load_model(
        package,
        profile_with(["CPUExecutionProvider"], "warn"),
        on_event=lambda n, d: events.append((n, d)),
        cache_dir=tmp_path / "e",
    )
    assert model.fallback and events[0][1]["from"][0]["accelerator"] == "profile:jetson-orin-nano"


def test_real_jetson_profile_here_falls_back_with_an_event(package, tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    model = load_model(
        package,
        load_profile("jetson-orin-nano"),
        on_event=lambda n, d: events.append((n, d)),
        cache_dir=tmp_path / "e",
    )
    assert model.provider == "CPUExecutionProvider" and events and events[0][0] == "fallback"


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"input": np.zeros((1, 3, 8, 8), np.float32)}, "input 'input': shape"),
        ({"input": np.zeros((1, 3, 16, 16), np.float64)}, "input 'input': dtype float64"),
        ({"image": np.zeros((1, 3, 16, 16), np.float32)}, "input 'image' is not a model input"),
        ({}, "input 'input' is missing"),
    ],
)
def test_wrong_feeds_name_the_input(package, tmp_path: Path, feeds: dict, message: str) -> None:
    model = load_model(package, profile_with(["CPUExecutionProvider"]), cache_dir=tmp_path / "e")
    with pytest.raises(BackendError, match=message):
        model.run(feeds)


def test_bad_graph_optimization_level_is_named(package, tmp_path: Path) -> None:
    profile = profile_with(
        ["CPUExecutionProvider"], "allow", options={"session": {"graph_optimization_level": "max"}}
    )
    with pytest.raises(BackendError, match="graph_optimization_level: 'max'"):
        load_model(package, profile, cache_dir=tmp_path / "e")
