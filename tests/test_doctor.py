"""`edge-infer doctor`: real providers and delegates checked with the tiny built-in models, the profiles'
accelerator delegates reported absent with their library, a real package self-check."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import doctor
from edge.backends import litert
from edge.cli import main as cli_main
from tests.test_backends_litert import ACCELERATOR_DELEGATES, noop_delegate_library
from tests.test_backends_support import classifier_package


def test_shipped_tiny_model_is_exactly_what_onnx_helper_builds() -> None:
    assert base64.b64decode(doctor.TINY_MODEL_B64) == doctor.build_tiny_model()


def test_cpu_provider_works_and_a_provider_holding_nothing_does_not() -> None:
    cpu = doctor.check_provider("CPUExecutionProvider")
    assert cpu["works"] and cpu["nodes"] >= 1
    # The Azure provider is compiled in but executes no ONNX op: it must not be reported as working.
    azure = doctor.check_provider("AzureExecutionProvider")
    assert not azure["works"] and "holds no nodes" in azure["reason"]


def test_shipped_tiny_tflite_is_the_model_the_schema_builds() -> None:
    pytest.importorskip("ai_edge_litert")
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    # Re-packed with the same flatbuffers version, so the check does not depend on byte layout choices.
    shipped = schema.ModelT.InitFromPackedBuf(bytearray(doctor.tiny_tflite()))
    builder = flatbuffers.Builder(1024)
    builder.Finish(shipped.Pack(builder), file_identifier=b"TFL3")
    assert bytes(builder.Output()) == doctor.build_tiny_tflite()
    assert len(doctor.tiny_tflite()) < 1024


def test_tiny_tflite_runs_on_xnnpack_and_on_reference_kernels() -> None:
    xnnpack = doctor.check_delegate("xnnpack")
    assert xnnpack["works"] and xnnpack["nodes"] >= 1 and xnnpack["max_error"] < 1e-5
    reference = doctor.check_delegate("cpu")  # no delegate at all: the numbers the others must match
    assert reference["works"] and reference["nodes"] == 0 and reference["max_error"] < 1e-5


def test_tflite_with_wrong_numbers_is_failing() -> None:
    bias = doctor.tiny_tflite_bias().tobytes()
    model = doctor.tiny_tflite()
    assert model.count(bias) == 1
    wrong = model.replace(bias, np.array([2.0, -0.125], np.float32).tobytes())
    entry = doctor.check_delegate("xnnpack", model=wrong)
    assert entry["present"] and not entry["works"] and "wrong numbers" in entry["reason"]


@pytest.mark.parametrize("delegate", ACCELERATOR_DELEGATES)
def test_profile_accelerator_delegate_is_absent_with_its_library(delegate: str) -> None:
    entry = doctor.check_delegate(delegate)
    library = litert.delegate_library(delegate)
    assert entry["library"] == library and not entry["present"] and not entry["works"]
    assert f"cannot load '{library}'" in entry["reason"] and entry["install"]


def test_delegate_that_loads_but_takes_no_node_is_failing(tmp_path: Path) -> None:
    entry = doctor.check_delegate(str(noop_delegate_library(tmp_path)))
    assert entry["present"] and not entry["works"] and "takes no node" in entry["reason"]
    assert "FAILING" in doctor._state(entry)


def test_json_reports_the_tiny_tflite_on_each_delegate(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["doctor", "--json", "--profile", "rockchip-rk3588"]) == 0
    report = json.loads(capsys.readouterr().out)
    delegates = {d["name"]: d for d in report["delegates"]}
    assert list(delegates) == ["xnnpack", "cpu", "gpu"]
    assert delegates["xnnpack"]["works"] is True and delegates["xnnpack"]["nodes"] >= 1
    assert delegates["cpu"]["works"] is True
    gpu = delegates["gpu"]
    assert gpu["library"] == "libtensorflowlite_gpu_delegate.so" and gpu["present"] is False
    assert not gpu["works"] and "libtensorflowlite_gpu_delegate.so" in gpu["reason"]
    assert "libmali" in report["install_hints"]["gpu"]  # the profile's own hint wins


def test_text_report_shows_the_absent_edgetpu_and_what_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["doctor", "--profile", "coral-edgetpu"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("delegate") and "libedgetpu.so.1" in row)
    assert "ABSENT" in line and "cannot load 'libedgetpu.so.1'" in line
    assert "hint         libedgetpu.so.1: apt-get install libedgetpu1-std" in out
    assert any(row.startswith("delegate") and "xnnpack" in row and "works" in row for row in out.splitlines())


def test_json_report_with_package_self_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = classifier_package(tmp_path / "cls")
    code = cli_main(["doctor", "--json", "--package", str(package), "--profile", "jetson-orin-nano"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["profile"] == {"name": "jetson-orin-nano", "why": ["chosen explicitly"], "fallback": "warn"}
    by_name = {p["name"]: p for p in report["providers"]}
    assert by_name["CPUExecutionProvider"]["works"]
    assert (
        not by_name["TensorrtExecutionProvider"]["works"]
        and not by_name["TensorrtExecutionProvider"]["present"]
    )
    assert "TensorrtExecutionProvider" in report["install_hints"]
    pkg = report["package"]
    assert pkg["ok"] and pkg["provider"] == "CPUExecutionProvider" and pkg["fallback"] is True
    assert pkg["golden"]["samples"] == 3


def test_failed_self_check_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = classifier_package(tmp_path / "bad", corrupt_golden=True)
    code = cli_main(["doctor", "--package", str(package), "--profile", "x86-64-generic"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "golden check FAILED" in out


def test_doctor_runs_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "profile" in done.stdout and "CPUExecutionProvider" in done.stdout and "works" in done.stdout


def test_self_check_refuses_what_the_daemon_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from converters.cli import main as convert_main
    from tests.assets_models import tiny_classifier

    source = tiny_classifier(tmp_path / "gray.onnx", channels=1)
    np.savez(tmp_path / "calib.npz", input=np.zeros((8, 1, 32, 32), np.float32))
    out = tmp_path / "pkg"
    assert convert_main([str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "-q"]) == 0
    capsys.readouterr()
    # What the converter used to write for a 1-channel input: colour normalization. The golden data still
    # matches; the daemon's image pre-processing refuses the spec, so doctor must too.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["inputs"][0].update(mean=[127.0] * 3, std=[128.0] * 3, color="RGB")
    (out / "manifest.json").write_text(json.dumps(manifest))
    code = cli_main(["doctor", "--package", str(out), "--profile", "x86-64-avx2"])
    text = capsys.readouterr().out
    assert code == 1 and "FAILED" in text and "mean/std need 1 or 1 values" in text
