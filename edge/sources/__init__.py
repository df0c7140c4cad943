"""Frame sources: cameras, streams and video files (OpenCV), and sensors (serial, files, stdin, WAV).

Each source type is a plugin module (`camera.py` is `type: video`, `sensor.py` is `type: sensor`) with its
config model and Source class; `edge.sources.registry` finds them. Every source runs its own capture thread
and hands the daemon the newest frame through `read(timeout)`; see docs/internals.md ("Sources"). OpenCV
and pyserial are imported only when a source is opened.
"""

from __future__ import annotations

from edge.sources.base import Frame, LatestFrameSlot, Source, SourcePlugin
from edge.sources.registry import SourceConfig, open_source

__all__ = ["Frame", "LatestFrameSlot", "Source", "SourceConfig", "SourcePlugin", "open_source"]
