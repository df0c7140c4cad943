"""One exception family whose message is a single line a user can act on."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class Finding:
    """What a check made without starting anything found: a problem (`fatal`) or a warning about what it
    could not check. `where` is the config field (`sources.0`, `mqtt.tls.ca_file`)."""

    where: str
    message: str
    fatal: bool = True
