"""A profile's `backends:` entries are one union discriminated by `name`, built from the backend plugins:
each backend's own keys, and a wrong one is a `file:line: field` error pointing at the key's own line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.backends import registry
from edge.backends.litert import LiteRTPreference
from edge.backends.onnxruntime import OnnxRuntimePreference
from edge.errors import ConfigError
from edge.profiles import load_profile

HEAD = "name: bad\ndescription: x\narch: x86_64\nbackends:\n"  # lines 1-4


def _profile_error(tmp_path: Path, backends: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(HEAD + backends)
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:") and "\n" not in message, message
    return message.removeprefix(str(path))


def test_each_entry_becomes_its_backends_own_preference(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(
        "name: good\ndescription: x\narch: x86_64\nbackends:\n"
        "  - name: onnxruntime\n    providers: [CUDAExecutionProvider, CPUExecutionProvider]\n"
        "  - name: litert\n    delegates: [gpu, xnnpack]\n    options: {gpu: {precision_loss: true}}\n"
    )
    ort, lite = load_profile(str(path)).backends
    assert isinstance(ort, OnnxRuntimePreference) and ort.providers[0] == "CUDAExecutionProvider"
    assert isinstance(lite, LiteRTPreference) and lite.delegates == ["gpu", "xnnpack"]
    assert lite.options == {"gpu": {"precision_loss": True}}


def test_delegates_under_onnxruntime_is_an_error_on_its_line(tmp_path: Path) -> None:
    message = _profile_error(
        tmp_path,
        "  - name: onnxruntime\n    providers: [CPUExecutionProvider]\n    delegates: [gpu]\n",
    )
    assert message == ":7: backends.0.delegates: unknown key"


def test_providers_under_litert_is_an_error_on_its_line(tmp_path: Path) -> None:
    message = _profile_error(
        tmp_path,
        "  - name: onnxruntime\n  - name: litert\n    delegates: [xnnpack]\n"
        "    providers: [CPUExecutionProvider]\n",
    )
    assert message == ":8: backends.1.providers: unknown key"


def test_a_typo_in_a_key_of_the_second_entry(tmp_path: Path) -> None:
    message = _profile_error(tmp_path, "  - name: onnxruntime\n  - name: litert\n    delgates: [gpu]\n")
    assert message == ":7: backends.1.delgates: unknown key"


def test_a_wrong_value_names_the_field_not_the_tag(tmp_path: Path) -> None:
    message = _profile_error(tmp_path, "  - name: onnxruntime\n    providers: CPUExecutionProvider\n")
    assert message == ":6: backends.0.providers: Input should be a valid list"


def test_an_unknown_backend_name_is_an_error_on_the_name_line(tmp_path: Path) -> None:
    message = _profile_error(tmp_path, "  - providers: [CPUExecutionProvider]\n    name: onnxruntim\n")
    known = ", ".join(f"'{name}'" for name in registry.names())
    assert message == f":6: backends.0.name: 'onnxruntim' is not one of {known}"


def test_an_entry_without_a_name_is_an_error(tmp_path: Path) -> None:
    message = _profile_error(tmp_path, "  - name: litert\n  - providers: [CPUExecutionProvider]\n")
    assert message == ":6: backends.1.name: Field required"


def test_flow_style_entries_point_at_their_line(tmp_path: Path) -> None:
    message = _profile_error(
        tmp_path, "  - {name: litert, delegates: [xnnpack]}\n  - {name: onnxruntime, delegates: [gpu]}\n"
    )
    assert message == ":6: backends.1.delegates: unknown key"
