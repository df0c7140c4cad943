"""A backend is one file: `edge/backends/null.py` is found by the registry and served through the same
load path, profile union and CLI choices as the real ones, with nothing else edited."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.backends import load_model, registry
from edge.errors import BackendError
from edge.package import load_package
from edge.profiles import load_profile_file
from tests.daemon_helpers import make_tiny_package

NULL_PROFILE = """\
name: null-only
description: runs nothing (wiring tests)
arch: x86_64
backends:
  - name: "null"  # quoted: a bare null is YAML's None
fallback: forbid
"""


def _without_golden(package: Path) -> Path:
    manifest = json.loads((package / "manifest.json").read_text())
    manifest.pop("golden")
    (package / "manifest.json").write_text(json.dumps(manifest))
    return package


def test_the_null_backend_is_registered_and_serves_zeros(tmp_path: Path) -> None:
    assert "null" in registry.names() and registry.artifact_format("null") == "onnx"
    profile_path = tmp_path / "null-only.yaml"
    profile_path.write_text(NULL_PROFILE)
    profile = load_profile_file(profile_path)
    package = load_package(_without_golden(make_tiny_package(tmp_path / "pkg")))
    model = load_model(package, profile)
    assert (model.backend_name, model.provider) == ("null", "null")
    outputs = model.run({"input": np.ones((1, 3, 32, 32), np.float32)})
    assert [o.shape for o in outputs] == [(1, 4)] and not outputs[0].any()
    with pytest.raises(BackendError, match="dtype float64"):
        model.run({"input": np.ones((1, 3, 32, 32), np.float64)})


def test_zeros_never_pass_a_real_models_golden_check(tmp_path: Path) -> None:
    profile_path = tmp_path / "null-only.yaml"
    profile_path.write_text(NULL_PROFILE)
    package = load_package(make_tiny_package(tmp_path / "pkg"))
    with pytest.raises(
        BackendError, match="null null unusable and fallback policy is forbid: golden check FAILED"
    ):
        load_model(package, load_profile_file(profile_path))


def test_a_null_entry_with_another_backends_key_is_a_field_error(tmp_path: Path) -> None:
    from edge.errors import ConfigError

    profile_path = tmp_path / "null-only.yaml"
    profile_path.write_text(
        NULL_PROFILE.replace("fallback: forbid", "    providers: [CPUExecutionProvider]\nfallback: forbid")
    )
    with pytest.raises(ConfigError, match=r"null-only.yaml:6: backends\.0\.providers"):
        load_profile_file(profile_path)
