"""edge-infer: the device runtime. Nothing heavy (torch, cv2, matplotlib) is imported here.

`from edge import open_model` is the Python API (edge.session); it is imported on first use, so
`import edge` stays free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["__version__", "open_model"]

if TYPE_CHECKING:
    from edge.session import open_model


def __getattr__(name: str) -> object:
    if name == "open_model":
        from edge.session import open_model

        return open_model
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
