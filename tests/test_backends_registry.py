"""The backend registry is found from the plugin modules, and everything that names backends reads it:
load_model's candidates, the daemon config's `backend:`, bench's choices and doctor's listing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from edge import doctor
from edge.backends import load_model, registry
from edge.backends.base import BackendPlugin, PreferenceBase
from edge.backends.litert import LiteRTBackend, LiteRTPreference
from edge.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimePreference
from edge.cli import main as cli_main
from edge.config import load_config
from edge.errors import BackendError, ConfigError
from edge.package import load_package
from edge.profiles import DeviceProfile
from tests.test_backends_support import classifier_package

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_plugins_are_found_with_what_they_declare() -> None:
    plugins = registry.plugins()
    assert {"onnxruntime", "litert"} <= set(plugins)
    assert registry.names() == sorted(registry.names())  # module order: stable across runs
    ort, lite = plugins["onnxruntime"], plugins["litert"]
    assert (ort.artifact_format, ort.default_accelerators) == ("onnx", ("CPUExecutionProvider",))
    assert (lite.artifact_format, lite.default_accelerators) == ("tflite", ("xnnpack",))
    assert ort.preference is OnnxRuntimePreference and ort.backend is OnnxRuntimeBackend
    assert lite.preference is LiteRTPreference and lite.backend is LiteRTBackend
    assert registry.artifact_format("litert") == "tflite"


def test_an_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(BackendError) as err:
        registry.plugin_for("tensorrt")
    assert str(err.value) == f"unknown backend 'tensorrt' (known: {', '.join(registry.names())})"


def test_discovery_imports_no_runtime() -> None:
    code = (
        "import sys\nfrom edge.backends import registry\nregistry.plugins()\nimport edge.profiles\n"
        "print(sorted(m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'onnx', 'torch', 'cv2')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_each_plugin_turns_its_preference_into_candidate_chains() -> None:
    ort, lite = registry.plugin_for("onnxruntime"), registry.plugin_for("litert")
    chain = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort.candidate_chains(OnnxRuntimePreference(name="onnxruntime", providers=chain)) == [
        chain,
        chain[1:],
        chain[2:],
    ]
    assert ort.candidate_chains(OnnxRuntimePreference(name="onnxruntime")) == [["CPUExecutionProvider"]]
    assert lite.candidate_chains(LiteRTPreference(name="litert", delegates=["gpu", "xnnpack"])) == [
        ["gpu"],
        ["xnnpack"],
    ]
    assert lite.candidate_chains(LiteRTPreference(name="litert")) == [["xnnpack"]]


def test_a_plugin_whose_preference_is_for_another_key_is_refused() -> None:
    class Mislabelled(PreferenceBase):
        name: Literal["litert"]

    with pytest.raises(BackendError, match=r"'mine'.*Mislabelled.name must be Literal\['mine'\]"):
        BackendPlugin(
            key="mine",
            artifact_format="onnx",
            default_accelerators=("x",),
            preference=Mislabelled,
            backend=OnnxRuntimeBackend,
            version=lambda: "1",
        )


def test_forcing_a_backend_the_profile_does_not_name_uses_its_defaults(tmp_path: Path) -> None:
    package = load_package(classifier_package(tmp_path / "cls"))
    profile = DeviceProfile.model_validate(
        {"name": "t", "description": "t", "arch": "x86_64", "backends": [{"name": "litert"}], "threads": 1}
    )
    model = load_model(package, profile, backend="onnxruntime", cache_dir=tmp_path / "e")
    assert (model.backend_name, model.provider) == ("onnxruntime", "CPUExecutionProvider")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt' \\(known: "):
        load_model(package, profile, backend="tensorrt", cache_dir=tmp_path / "e")


def test_config_backend_must_be_a_registered_one(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(
        "device_id: cam-01\nmodel: models/current\nsource: {type: video, uri: clip.avi}\nbackend: tensorrt\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    known = ", ".join(registry.names())
    assert str(err.value) == (f"{path}:4: backend: Value error, unknown backend 'tensorrt' (known: {known})")
    path.write_text(path.read_text().replace("tensorrt", "litert"))
    assert load_config(path, environ={}).backend == "litert"


def test_bench_choices_are_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", str(REPO), "--backend", "tensorrt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    choices = err.split("(choose from ", 1)[1]
    assert all(name in choices for name in registry.names()), err


def test_doctor_lists_every_registered_backend_with_its_version() -> None:
    versions = doctor._backend_versions()
    assert list(versions) == registry.names()
    import onnxruntime

    assert versions["onnxruntime"] == onnxruntime.__version__
