"""The task registry: every module in `edge.tasks` that declares `CONFIG` is a task, keyed by the
`type` values of its config(s); `PostprocessConfig` is the manifest's discriminated union over them.

Adding a task is one new module (see edge.tasks.base); nothing here names a task.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Discriminator, Field, Tag
from pydantic_core import ErrorDetails

from edge.tasks.base import TaskConfig, Variants, literal_values

TaskSpec = type[TaskConfig] | Variants
_NOT_TASKS = frozenset({"base", "registry"})


def _discover() -> dict[str, TaskSpec]:
    import edge.tasks

    found: dict[str, TaskSpec] = {}
    for info in sorted(pkgutil.iter_modules(edge.tasks.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_TASKS:
            continue
        name = f"edge.tasks.{info.name}"
        spec = getattr(importlib.import_module(name), "CONFIG", None)
        if not isinstance(spec, Variants) and not (isinstance(spec, type) and issubclass(spec, TaskConfig)):
            raise TypeError(f"{name}: a task module declares CONFIG, a TaskConfig subclass or Variants")
        for key in _keys(spec):
            if key in found:
                raise TypeError(f"{name}: task '{key}' is already served by another module")
            found[key] = spec
    return found


def _keys(spec: TaskSpec) -> tuple[str, ...]:
    if isinstance(spec, Variants):
        keys = {literal_values(config, "type") for config in spec.configs}
        if len(keys) != 1:
            raise TypeError(f"variants on '{spec.field}' must share one `type`, got {sorted(keys)}")
        return keys.pop()
    return literal_values(spec, "type")


def _pick(field: str, default: str) -> Callable[[object], str | None]:
    def tag(value: object) -> str | None:
        chosen = value.get(field, default) if isinstance(value, dict) else getattr(value, field, None)
        return chosen if isinstance(chosen, str) else None

    return tag


def _member(spec: TaskSpec) -> object:
    if not isinstance(spec, Variants):
        return spec
    tagged = tuple(Annotated[config, Tag(spec.tag(config))] for config in spec.configs)
    return Annotated[Union[tagged], Discriminator(_pick(spec.field, spec.default))]  # noqa: UP007


TASKS: Mapping[str, TaskSpec] = _discover()


def task_keys() -> tuple[str, ...]:
    return tuple(TASKS)


if TYPE_CHECKING:
    PostprocessConfig = TaskConfig
else:
    PostprocessConfig = Annotated[
        Union[tuple(_member(spec) for spec in dict.fromkeys(TASKS.values()))],  # noqa: UP007
        Field(discriminator="type"),
    ]


def explain(error: ErrorDetails) -> tuple[str, str]:
    """(dotted field, message) for a validation error located under the `postprocess` field, with the
    union's tags taken out: `postprocess.top-k`, not `postprocess.classification.top-k`."""
    head, *rest = error["loc"]
    path = [str(head)]
    # Which discriminator failed when the error is about the tag itself: the task, else the variant.
    discriminator: tuple[str, tuple[str, ...]] | None = ("type", task_keys())
    if rest:
        spec = TASKS.get(str(rest.pop(0)))
        discriminator = None
        if isinstance(spec, Variants):
            discriminator = None if rest else (spec.field, spec.tags)
            rest = rest[1:]
    path += [str(p) for p in rest]
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") and discriminator is not None:
        field, choices = discriminator
        tag = error.get("ctx", {}).get("tag")
        known = ", ".join(choices)
        message = f"'{tag}' is not one of {known}" if tag else f"must be one of {known}"
        return ".".join([*path, field]), message
    return ".".join(path), error["msg"]
