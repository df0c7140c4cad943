"""docs/contracts.md and the JSON Schemas stay true to the code, and the repository points at nothing
outside itself."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from edge.config import DaemonConfig
from tests.daemon_helpers import make_tiny_package

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = (REPO / "docs" / "contracts.md").read_text()
SCHEMAS = REPO / "edge" / "schemas"


def _schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


def test_the_schema_files_are_what_the_models_generate() -> None:
    out = subprocess.run(
        [sys.executable, "tools/gen_schemas.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("profile", sorted((REPO / "device_profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_validates_against_its_schema(profile: Path) -> None:
    _schema("device-profile.schema.json").validate(yaml.safe_load(profile.read_text()))


def test_the_example_config_and_a_real_manifest_validate(tmp_path: Path) -> None:
    _schema("config.schema.json").validate(yaml.safe_load((REPO / "examples" / "config.yaml").read_text()))
    package = make_tiny_package(tmp_path / "pkg")
    _schema("manifest.schema.json").validate(json.loads((package / "manifest.json").read_text()))


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")} - {
        "--help"
    }


def test_contracts_name_every_command_option_and_config_key() -> None:
    from converters.cli import build_parser as convert_parser
    from edge.cli import SUBCOMMANDS

    missing = [f"edge-convert {flag}" for flag in _options(convert_parser()) if flag not in CONTRACTS]
    for name, (module_name, _) in SUBCOMMANDS.items():
        assert f"edge-infer {name}" in CONTRACTS
        parser = argparse.ArgumentParser()
        importlib.import_module(module_name).add_arguments(parser)
        missing += [f"edge-infer {name} {flag}" for flag in _options(parser) if flag not in CONTRACTS]
    missing += [f"config key {key}" for key in DaemonConfig.model_fields if f"{key}:" not in CONTRACTS]
    assert missing == []


def test_contracts_name_every_edge_sink_option_and_config_key() -> None:
    from pydantic import BaseModel

    from edge.sink.cli import build_parser
    from edge.sink.config import SinkConfig

    section = CONTRACTS[CONTRACTS.index("## edge-sink") : CONTRACTS.index("## Python API")]
    missing = [f"edge-sink {flag}" for flag in _options(build_parser()) if flag not in section]
    missing += [usage for usage in ("edge-sink --config", "edge-sink gaps --config") if usage not in section]
    for name, info in SinkConfig.model_fields.items():
        key = info.alias or name
        if f"{key}:" not in section:
            missing.append(f"sink config key {key}")
        block = info.annotation
        if isinstance(block, type) and issubclass(block, BaseModel):
            missing += [
                f"sink config key {key}.{sub}" for sub in block.model_fields if f"{sub}:" not in section
            ]
    assert missing == []


def test_the_example_sink_config_loads() -> None:
    from edge.sink.config import load_sink_config

    _schema("sink-config.schema.json").validate(yaml.safe_load((REPO / "examples" / "sink.yaml").read_text()))
    config = load_sink_config(REPO / "examples" / "sink.yaml")
    assert config.database.is_sqlite and config.mqtt.group == "sinks"


def test_nothing_in_the_repository_points_outside_it() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in tracked.split():
        path = REPO / name
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".json", ".sh", ".toml", ".service", ".conf"):
            text = path.read_text(errors="replace")
            if "DESIGN.md" in text or "../shared" in text:
                offenders.append(name)
    assert offenders == [name for name in offenders if name == "tests/test_docs_contracts.py"]
