"""Sources are plugins: the registry finds each module's PLUGIN and derives the config union from them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

import edge.sources
from edge.errors import ConfigError
from edge.sources import SourceConfig, open_source
from edge.sources.camera import VideoSource, VideoSourceConfig
from edge.sources.registry import plugins
from edge.sources.sensor import SensorSource, SensorSourceConfig
from edge.sources.text import TextSource, TextSourceConfig


def test_the_registry_lists_exactly_the_modules_that_declare_a_plugin() -> None:
    declaring = sorted(
        info.name
        for info in pkgutil.iter_modules(edge.sources.__path__)
        if hasattr(__import__(f"edge.sources.{info.name}", fromlist=["PLUGIN"]), "PLUGIN")
    )
    assert declaring == ["camera", "sensor", "text"]
    assert {key: (p.config, p.source) for key, p in plugins().items()} == {
        "video": (VideoSourceConfig, VideoSource),
        "sensor": (SensorSourceConfig, SensorSource),
        "text": (TextSourceConfig, TextSource),
    }


def test_the_union_takes_each_plugins_config_and_refuses_an_unknown_type(tmp_path: Path) -> None:
    adapter = TypeAdapter(SourceConfig)
    assert isinstance(adapter.validate_python({"type": "video", "uri": 0}), VideoSourceConfig)
    assert isinstance(adapter.validate_python({"type": "sensor", "uri": "-"}), SensorSourceConfig)
    with pytest.raises(ValidationError, match="'sensor', 'video'|'video', 'sensor'"):
        adapter.validate_python({"type": "lidar", "uri": "x"})
    samples = tmp_path / "samples.raw"
    samples.write_bytes(b"\0" * 64)
    assert isinstance(open_source({"type": "sensor", "uri": str(samples), "window": 4}), SensorSource)
    with pytest.raises(ConfigError, match="file not found"):
        open_source({"type": "video", "uri": str(tmp_path / "missing.mp4")})


def test_discovering_sources_imports_neither_opencv_nor_pyserial() -> None:
    code = "import sys, edge.sources; print(sorted(m for m in ('cv2', 'serial') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
