"""Frame sources: cameras, streams and video files (OpenCV), and sensors (serial, files, stdin, WAV).

Every source runs its own capture thread and hands the daemon the newest frame through `read(timeout)`;
see docs/internals.md ("Sources"). OpenCV and pyserial are imported only when a source is opened.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from edge.sources.base import Frame, LatestFrameSlot, Source
from edge.sources.config import SensorSourceConfig, SourceConfig, VideoSourceConfig

__all__ = [
    "Frame",
    "LatestFrameSlot",
    "SensorSourceConfig",
    "Source",
    "SourceConfig",
    "VideoSourceConfig",
    "open_source",
]


def open_source(config: VideoSourceConfig | SensorSourceConfig | dict[str, Any]) -> Source:
    """The source for a config (a model or a plain dict); not started. Missing files raise ConfigError."""
    if isinstance(config, dict):
        config = TypeAdapter(SourceConfig).validate_python(config)
    if isinstance(config, VideoSourceConfig):
        from edge.sources.camera import VideoSource

        return VideoSource(config)
    from edge.sources.sensor import SensorSource

    return SensorSource(config)
