"""Plugin discovery: the modules of a package that declare a module-level `PLUGIN`.

Backends and sources are found this way (a new one is one new module); each registry says which plugin
type it collects and which error a duplicate key raises.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

Plugin = TypeVar("Plugin")


def discover(
    package: str, kind: type[Plugin], key: Callable[[Plugin], str], error: Callable[[str], Exception]
) -> dict[str, Plugin]:
    """Every `PLUGIN` of type `kind` in the modules of `package`, by `key`, in module name order."""
    found: dict[str, Plugin] = {}
    for module_info in sorted(
        pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name
    ):
        module = importlib.import_module(f"{package}.{module_info.name}")
        plugin = getattr(module, "PLUGIN", None)
        if not isinstance(plugin, kind):
            continue
        name = key(plugin)
        if name in found:
            raise error(f"plugin '{name}' of {package} is declared twice (again in {module.__name__})")
        found[name] = plugin
    return found
