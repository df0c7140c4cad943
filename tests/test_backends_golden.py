"""Golden comparison criteria and bad golden data, on a real onnxruntime-backed package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.backends import golden_check, relayout
from edge.backends.base import LoadRequest
from edge.backends.golden import run_golden
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.errors import PackageError
from edge.package import TensorSpec, load_package
from tests.test_backends_support import classifier_package


@pytest.fixture
def backend_and_package(tmp_path: Path):  # type: ignore[no-untyped-def]
    package = load_package(classifier_package(tmp_path / "cls"))
    manifest = package.manifest
    backend = OnnxRuntimeBackend(
        LoadRequest(package.path("model.onnx"), manifest.inputs, manifest.outputs, ["CPUExecutionProvider"])
    )
    return backend, package


def _golden(package, tolerance: dict[str, float], backend):  # type: ignore[no-untyped-def]
    manifest = package.manifest
    return run_golden(
        backend.run, manifest.inputs, manifest.outputs,
        package.root / "golden/inputs.npz", package.root / "golden/outputs.npz", tolerance,
    )  # fmt: skip


def test_each_criterion_can_fail_on_its_own(backend_and_package) -> None:  # type: ignore[no-untyped-def]
    backend, package = backend_and_package
    logits = np.load(package.root / "golden/outputs.npz")["logits"]
    batch = np.load(package.root / "golden/inputs.npz")["input"]
    # Scale the reference: same arg-max and cosine 1.0, but far off elementwise.
    np.savez(package.root / "golden/outputs.npz", logits=logits * 2.0)
    assert _golden(package, {"cosine": 0.999, "top1": 1.0}, backend).passed
    report = _golden(package, {"atol": 0.01}, backend)
    assert not report.passed and "exceeds atol/rtol" in report.failures[0]
    # Shift one sample's reference so its arg-max moves: top-1 agreement 2/3.
    moved = logits.copy()
    moved[0] = moved[0][::-1] * 5
    np.savez(package.root / "golden/outputs.npz", logits=moved)
    report = _golden(package, {"top1": 1.0}, backend)
    assert not report.passed and report.top1_agreement == pytest.approx(2 / 3)
    assert report.samples == batch.shape[0] == 3


def test_unknown_criterion_and_missing_tensor_are_named(backend_and_package) -> None:  # type: ignore[no-untyped-def]
    backend, package = backend_and_package
    with pytest.raises(PackageError, match=r"golden.tolerance: unknown criteria \['l2'\]"):
        _golden(package, {"l2": 0.1}, backend)
    np.savez(
        package.root / "golden/inputs.npz", image=np.zeros((1, 3, 16, 16), np.float32), extra=np.zeros(1)
    )
    with pytest.raises(PackageError, match="inputs.npz: no array for tensor\\(s\\) input"):
        golden_check(backend, package)


def test_relayout_round_trips() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    nhwc = relayout(x, "NCHW", "NHWC")
    assert nhwc.shape == (2, 4, 5, 3) and np.array_equal(relayout(nhwc, "NHWC", "NCHW"), x)
    assert relayout(x, None, "NHWC") is x


def test_litert_names_what_to_install_when_no_interpreter_is_present() -> None:
    # Hide every TFLite interpreter module: the fallback chain ends in one clear line.
    code = (
        "import sys\n"
        "for name in ('ai_edge_litert', 'tflite_runtime', 'tensorflow'): sys.modules[name] = None\n"
        "from edge.backends.litert import interpreter_module\n"
        "from edge.errors import BackendError\n"
        "try:\n    interpreter_module()\nexcept BackendError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "no TFLite interpreter installed: pip install ai-edge-litert"


def test_backend_inputs_are_read_from_the_session(backend_and_package) -> None:  # type: ignore[no-untyped-def]
    backend, _ = backend_and_package
    assert backend.inputs == [TensorSpec(name="input", shape=[1, 3, 16, 16], dtype="float32")]
