"""The sources there are, found rather than listed: every module of the `edge.sources` package that
declares a module-level `PLUGIN` (an `edge.sources.base.SourcePlugin`) is one. Adding a source type is one
such file; the config's `source:`/`sources:` union and `open_source` come from here.

Source modules stay light at import (OpenCV and pyserial are imported when a source opens).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Union

from pydantic import BaseModel, Field, TypeAdapter

from edge.errors import ConfigError
from edge.plugins import discover
from edge.sources.base import Source, SourcePlugin

PACKAGE = "edge.sources"


@functools.cache
def plugins() -> dict[str, SourcePlugin]:
    """Every source plugin by its config `type`, in module name order."""
    return discover(PACKAGE, SourcePlugin, lambda plugin: plugin.key, ConfigError)


def source_config_union() -> object:
    """The type of one `source:` entry: each plugin's config model, chosen by `type`. (An `Annotated`
    union is a value at run time, not a class; mypy sees `BaseModel`.)"""
    configs = [plugin.config for plugin in plugins().values()]
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="type")]  # noqa: UP007


if TYPE_CHECKING:
    SourceConfig = BaseModel
else:
    SourceConfig = source_config_union()


def open_source(config: BaseModel | dict[str, object]) -> Source:
    """The source for a config (a model or a plain dict); not started. Missing files raise ConfigError."""
    if isinstance(config, dict):
        config = TypeAdapter(SourceConfig).validate_python(config)
    for plugin in plugins().values():
        if isinstance(config, plugin.config):
            return plugin.source(config)
    known = ", ".join(plugins())
    raise ConfigError(f"source: {type(config).__name__} is not the config of a source type (known: {known})")
