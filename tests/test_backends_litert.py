"""LiteRT backend on a real third-party .tflite (MediaPipe short-range face detector) with XNNPACK;
delegate fallback with a library that does not exist (the profiles' own GPU / NNAPI / Edge TPU delegates
are absent here) or that loads but takes no node; an artifact that loads but fails its golden check."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge.backends import fallback_counts, litert, load_model
from edge.errors import BackendError
from edge.package import load_package
from edge.profiles import DeviceProfile, available_profiles
from tests.test_backends_support import face_detector_package

MISSING_DELEGATE = "libedge_test_no_such_delegate.so"

# An external delegate that loads and accepts the graph but claims no node of it: a driver that
# initialises and computes nothing. Built from source at test time, the smallest honest stand-in for
# an accelerator library that cannot exist on this machine.
NOOP_DELEGATE_C = r"""
#include <stddef.h>
#include <stdint.h>
typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;
static int prepare(void* context, TfLiteDelegate* delegate) { return 0; }
static TfLiteDelegate noop = {0, prepare, 0, 0, 0, 0, 0};
TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t count,
                                              void (*report_error)(const char*)) { return &noop; }
void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) {}
"""


def noop_delegate_library(directory: Path) -> Path:
    """Compile the no-op external delegate (skips the test when no C compiler is installed)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the no-op delegate library")
    source, library = directory / "noop_delegate.c", directory / "libedge_noop_delegate.so"
    source.write_text(NOOP_DELEGATE_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    return library


def profile_accelerator_delegates() -> list[str]:
    """The external delegates the shipped device profiles ask for, plus the short names a profile may use
    for GPU, NNAPI and Edge TPU (none of them can load on this machine)."""
    named = {
        delegate
        for profile in available_profiles().values()
        for preference in profile.backends
        if preference.name == "litert"
        for delegate in preference.delegates
        if delegate not in litert.BUILTIN
    }
    assert {"gpu", "libedgetpu.so.1"} <= named  # rockchip-rk3588 and coral-edgetpu
    return sorted(named | {"gpu", "nnapi", "edgetpu"})


ACCELERATOR_DELEGATES = profile_accelerator_delegates()


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


@pytest.mark.parametrize("delegate", ACCELERATOR_DELEGATES)
def test_profile_delegate_absent_here_falls_back_under_allow_and_counts(face, delegate: str) -> None:
    library = litert.delegate_library(delegate)
    before = fallback_counts().get(delegate, 0)
    model = load_model(face, litert_profile([delegate, "xnnpack"], "allow"))
    assert model.fallback and model.provider == "xnnpack" and model.golden is not None and model.golden.passed
    assert fallback_counts()[delegate] == before + 1
    failed = model.attempts[0]
    assert failed.accelerator == delegate and not failed.ok and f"cannot load '{library}'" in failed.reason


@pytest.mark.parametrize("delegate", ACCELERATOR_DELEGATES)
def test_profile_delegate_absent_here_under_warn_publishes_the_library(face, delegate: str) -> None:
    events: list[tuple[str, dict]] = []
    before = fallback_counts().get(delegate, 0)
    model = load_model(
        face, litert_profile([delegate, "xnnpack"], "warn"), on_event=lambda n, d: events.append((n, d))
    )
    assert model.provider == "xnnpack" and fallback_counts()[delegate] == before + 1
    (name, data), *_ = events
    given_up = data["from"][0]
    assert name == "fallback" and given_up["accelerator"] == delegate
    assert litert.delegate_library(delegate) in given_up["reason"]


@pytest.mark.parametrize("delegate", ACCELERATOR_DELEGATES)
def test_profile_delegate_absent_here_is_refused_under_forbid(face, delegate: str) -> None:
    library = litert.delegate_library(delegate)
    with pytest.raises(BackendError) as raised:
        load_model(face, litert_profile([delegate, "xnnpack"], "forbid"))
    message = str(raised.value)
    assert f"litert {delegate} unusable" in message and "forbid" in message and library in message
    assert "\n" not in message


def test_absent_delegate_error_says_what_to_install() -> None:
    with pytest.raises(litert.DelegateUnavailable) as raised:
        litert.open_interpreter("edgetpu", {}, 1, model_content=b"unused: the library fails first")
    assert raised.value.library == "libedgetpu.so.1" and "libedgetpu1-std" in raised.value.install


def test_delegate_that_loads_but_takes_no_node_falls_back(face, tmp_path: Path) -> None:
    library = str(noop_delegate_library(tmp_path))
    model = load_model(face, litert_profile([library, "xnnpack"], "allow"))
    assert model.fallback and model.provider == "xnnpack"
    assert model.attempts[0].accelerator == library and "holds no nodes" in model.attempts[0].reason
    with pytest.raises(BackendError, match="holds no nodes"):
        load_model(face, litert_profile([library, "xnnpack"], "forbid"))


def test_library_that_is_no_delegate_is_reported_as_such(face) -> None:
    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("no glibc here to stand for a library that is no delegate")
    model = load_model(face, litert_profile(["libc.so.6", "xnnpack"], "allow"))
    assert model.fallback and "no TFLite external delegate" in model.attempts[0].reason


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
