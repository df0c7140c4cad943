"""`edge-infer doctor`: real providers checked with the tiny built-in model, a real package self-check."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge import doctor
from edge.cli import main as cli_main
from tests.test_backends_support import classifier_package


def test_shipped_tiny_model_is_exactly_what_onnx_helper_builds() -> None:
    assert base64.b64decode(doctor.TINY_MODEL_B64) == doctor.build_tiny_model()


def test_cpu_provider_works_and_a_provider_holding_nothing_does_not() -> None:
    cpu = doctor.check_provider("CPUExecutionProvider")
    assert cpu["works"] and cpu["nodes"] >= 1
    # The Azure provider is compiled in but executes no ONNX op: it must not be reported as working.
    azure = doctor.check_provider("AzureExecutionProvider")
    assert not azure["works"] and "holds no nodes" in azure["reason"]


def test_missing_delegate_library_is_not_working() -> None:
    assert doctor.check_delegate("xnnpack")["works"]
    missing = doctor.check_delegate("edgetpu")
    assert not missing["works"] and "libedgetpu.so.1" in missing["reason"]


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
