"""LiteRT backend on a real third-party .tflite (MediaPipe short-range face detector) with XNNPACK;
delegate fallback with a library that does not exist; an artifact that loads but fails its golden check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.backends import fallback_counts, load_model
from edge.errors import BackendError
from edge.package import load_package
from edge.profiles import DeviceProfile
from tests.test_backends_support import face_detector_package

MISSING_DELEGATE = "libedge_test_no_such_delegate.so"


def litert_profile(delegates: list[str], fallback: str = "allow", onnx_first: bool = False) -> DeviceProfile:
    backends = [{"name": "litert", "delegates": delegates}]
    if onnx_first:
        backends.insert(0, {"name": "onnxruntime", "providers": ["CPUExecutionProvider"]})
    return DeviceProfile.model_validate(
        {
            "name": "t",
            "description": "t",
            "arch": "x86_64",
            "backends": backends,
            "threads": 2,
            "fallback": fallback,
        }
    )


@pytest.fixture
def face(tmp_path: Path, cache_dir: Path):  # type: ignore[no-untyped-def]
    return load_package(face_detector_package(tmp_path / "face", cache_dir))


def test_real_tflite_runs_on_xnnpack_and_passes_golden(face) -> None:
    model = load_model(face, litert_profile(["xnnpack"]))
    assert model.backend_name == "litert" and model.provider == "xnnpack"
    assert model.backend.providers_in_use[0] == "xnnpack"  # a DELEGATE node holds the graph
    assert model.golden is not None and model.golden.passed and not model.fallback
    regressors, scores = model.run({"input": np.load(face.root / "golden/inputs.npz")["input"]})
    assert regressors.shape == (1, 896, 16) and scores.shape == (1, 896, 1)


def test_reference_kernels_agree_with_xnnpack(face) -> None:
    model = load_model(face, litert_profile(["cpu"]))
    assert model.backend.providers_in_use == ["cpu"]
    assert model.self_check().passed


def test_missing_delegate_library_falls_back_and_counts(face) -> None:
    before = fallback_counts().get(MISSING_DELEGATE, 0)
    model = load_model(face, litert_profile([MISSING_DELEGATE, "xnnpack"], "allow"))
    assert model.fallback and model.provider == "xnnpack"
    assert fallback_counts()[MISSING_DELEGATE] == before + 1
    assert MISSING_DELEGATE in model.attempts[0].reason


def test_missing_edgetpu_under_warn_publishes_event(face) -> None:
    events: list[tuple[str, dict]] = []
    load_model(
        face, litert_profile(["edgetpu", "xnnpack"], "warn"), on_event=lambda n, d: events.append((n, d))
    )
    assert events[0][0] == "fallback" and events[0][1]["from"][0]["accelerator"] == "edgetpu"


def test_missing_delegate_under_forbid_names_it(face) -> None:
    with pytest.raises(BackendError, match=f"litert {MISSING_DELEGATE} unusable .*forbid"):
        load_model(face, litert_profile([MISSING_DELEGATE, "xnnpack"], "forbid"))


def test_artifact_that_loads_but_disagrees_with_golden_falls_back(tmp_path: Path, cache_dir: Path) -> None:
    # An ONNX artifact with the same input but another model's numbers: it loads and runs, and only the
    # golden check can tell that its answers are wrong.
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(_same_io_wrong_model())
    root = face_detector_package(
        tmp_path / "face2", cache_dir, more_artifacts=[("model.onnx", wrong, "onnx", "fp32")]
    )
    package = load_package(root)
    events: list[tuple[str, dict]] = []
    model = load_model(
        package,
        litert_profile(["xnnpack"], "warn", onnx_first=True),
        on_event=lambda n, d: events.append((n, d)),
        cache_dir=tmp_path / "e",
    )
    assert model.backend_name == "litert"
    first = events[0][1]["from"][0]
    assert first["backend"] == "onnxruntime" and "golden check FAILED" in first["reason"]
    with pytest.raises(BackendError, match="forbid"):
        load_model(package, litert_profile(["xnnpack"], "forbid", onnx_first=True), cache_dir=tmp_path / "e")


def test_wrong_shape_names_the_input(face) -> None:
    model = load_model(face, litert_profile(["xnnpack"]))
    with pytest.raises(BackendError, match="input 'input': shape"):
        model.run({"input": np.zeros((1, 96, 96, 3), np.float32)})
    with pytest.raises(BackendError, match="input 'input': dtype uint8"):
        model.run({"input": np.zeros((1, 128, 128, 3), np.uint8)})


def _same_io_wrong_model() -> bytes:
    """NHWC [1,128,128,3] -> regressors [1,896,16], classificators [1,896,1], all constant-ish."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
        helper.make_node("Add", ["m", "reg_bias"], ["regressors"]),
        helper.make_node("Add", ["m", "cls_bias"], ["classificators"]),
    ]
    inits = [
        numpy_helper.from_array(np.full((1, 896, 16), 5.0, np.float32), "reg_bias"),
        numpy_helper.from_array(np.full((1, 896, 1), -5.0, np.float32), "cls_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "wrong",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 128, 128, 3])],
        [
            helper.make_tensor_value_info("regressors", TensorProto.FLOAT, [1, 896, 16]),
            helper.make_tensor_value_info("classificators", TensorProto.FLOAT, [1, 896, 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
