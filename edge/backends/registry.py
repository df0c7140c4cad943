"""The backends there are, found rather than listed: every module of the `edge.backends` package that
declares a module-level `PLUGIN` (an `edge.backends.base.BackendPlugin`) is one. Adding a backend is adding
one such file; names, artifact formats, CLI choices and the profile's `backends:` union all come from here.

Plugin modules stay light at import (their runtimes are imported when a model is opened), so discovering
them imports nothing heavy.
"""

from __future__ import annotations

import functools
from typing import Annotated, Union

from pydantic import Field

from edge.backends.base import BackendPlugin, PreferenceBase
from edge.errors import BackendError
from edge.plugins import discover

PACKAGE = "edge.backends"


@functools.cache
def plugins() -> dict[str, BackendPlugin]:
    """Every backend plugin by key, in module name order."""
    return discover(PACKAGE, BackendPlugin, lambda plugin: plugin.key, BackendError)


def names() -> list[str]:
    return list(plugins())


def plugin_for(name: str) -> BackendPlugin:
    try:
        return plugins()[name]
    except KeyError:
        raise BackendError(f"unknown backend '{name}' (known: {', '.join(plugins())})") from None


def artifact_format(name: str) -> str:
    """The manifest artifact `format` the backend reads ("onnx", "tflite")."""
    return plugin_for(name).artifact_format


def preference_union() -> object:
    """The type of one `backends:` entry of a device profile: each plugin's preference model, chosen by
    `name`. (An `Annotated` union is a value at run time, not a class; mypy sees `PreferenceBase`.)"""
    preferences: list[type[PreferenceBase]] = [plugin.preference for plugin in plugins().values()]
    if len(preferences) == 1:
        return preferences[0]
    return Annotated[Union[tuple(preferences)], Field(discriminator="name")]  # noqa: UP007
