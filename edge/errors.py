"""One exception family whose message is a single line a user can act on."""

from __future__ import annotations


class EdgeError(Exception):
    """A failure with a one-line, user-facing reason (names the file, field or topic)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(EdgeError):
    """A config, profile or CLI argument is invalid."""


class PackageError(EdgeError):
    """A model package is missing, malformed or untrusted."""


class BackendError(EdgeError):
    """An inference backend could not load or run a model."""
