"""YAML loading that remembers line numbers, so validation errors can say `file:line: field`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edge.errors import ConfigError

Loc = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key and sequence item."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[Loc, int] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._walk(node, ())
        return super().construct_document(node)

    def _walk(self, node: yaml.Node, loc: Loc) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                self._walk(value_node, (*loc, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*loc, index))


def load_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file; returns the data and a map from key path to line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    loader = _LineLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return data, loader.lines


def line_of(lines: dict[Loc, int], loc: Sequence[str | int]) -> int:
    """The line of the deepest key path that exists in the file."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)


def describe_validation_error(path: Path, lines: dict[Loc, int], exc: ValidationError) -> str:
    """First validation error as `file:line: field: message` (one line)."""
    err = exc.errors()[0]
    loc = [part for part in err["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
    field = ".".join(str(part) for part in loc) or "(top level)"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{path}:{line_of(lines, loc)}: {field}: {message}{suffix}"


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    """Load a YAML file into a pydantic model; errors name file, line and field."""
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, lines, exc)) from exc
