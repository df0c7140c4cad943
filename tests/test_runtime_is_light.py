"""The device runtime must stay light: no torch ever, and no cv2/matplotlib until a frame is processed."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_modules_import_nothing_heavy():
    modules = [
        "edge", "edge.cli", "edge.config", "edge.daemon", "edge.backends", "edge.package", "edge.profiles",
        "edge.publish.mqtt", "edge.publish.outbox", "edge.sources", "edge.health", "edge.trust",
        "edge.client", "edge.sink.cli", "edge.sink.service",
    ]  # fmt: skip
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in ('torch', 'cv2', 'matplotlib', 'onnx', 'skimage') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_edge_never_imports_torch_or_the_converters():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "edge").rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("import torch", "from torch", "import converters", "from converters"))
    ]
    assert offenders == []


def test_the_runtime_install_does_not_pull_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [dep.lower() for dep in project["dependencies"]]
    assert not [dep for dep in runtime if dep.startswith(("torch", "matplotlib", "onnxscript"))]
    assert any(dep.startswith("torch==") for dep in project["optional-dependencies"]["convert"])
