"""Post-processing as plugins: one module per task turns model outputs into the payload's `result`.

`make_decoder(manifest, labels)` is the one entry point; the manifest's `postprocess` is already a typed,
validated config (edge.tasks.registry.PostprocessConfig) by the time a package is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edge.tasks.base import Decoder, DecoderContext

if TYPE_CHECKING:
    from edge.package import Manifest


def make_decoder(manifest: Manifest, labels: Sequence[str] | None = None) -> Decoder:
    """The decoder the manifest's `postprocess` asks for: `decoder(outputs, letterbox) -> result`."""
    return manifest.postprocess.decoder(DecoderContext.from_manifest(manifest, labels))
