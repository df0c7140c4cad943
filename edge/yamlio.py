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


# Config files nest a few levels; refusing deep nesting early keeps PyYAML's scanner (whose simple-key
# bookkeeping is quadratic in flow depth) and its recursive composer from spending seconds on a tiny file.
MAX_NESTING = 64


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key and sequence item."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[Loc, int] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._walk(node, (), set())
        return super().construct_document(node)

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_NESTING:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_NESTING} levels", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_NESTING and self.indent < column:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_NESTING} levels", self.get_mark()
            )
        return bool(super().add_indent(column))

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # PyYAML's constructors trust explicit tags: `!!int abc`, a 13th month
            problem = f"cannot read a {node.tag} value: {type(exc).__name__}: {exc}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from exc

    def _walk(self, node: yaml.Node, loc: Loc, seen: set[int]) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        # An alias points at a node already walked: walking it again would loop on `&a [*a]` and
        # explode on nested aliases (a "billion laughs" document). Its lines are the anchor's anyway.
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                # a non-scalar key cannot become a dict key (construction refuses it): no line to record
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.tag}>"
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                self._walk(value_node, (*loc, key), seen)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*loc, index), seen)


def load_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file; returns the data and a map from key path to line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    try:
        loader = _LineLoader(text)  # the reader refuses control characters here, before parsing
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(f"{path}:{line}: invalid YAML: character #x{code:04x} is not allowed") from exc
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from exc
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


def _key_path(lines: dict[Loc, int], loc: Sequence[str | int]) -> list[str | int]:
    """pydantic's error location as the key path in the file. pydantic puts a tagged union's tag into
    the location (`backends.0.onnxruntime.delegates` for the `delegates:` key of the first entry): a part
    the file has no key for is dropped when the location goes on below it. The last part stays even
    when the file lacks it: that is a missing key."""
    path: list[str | int] = []
    for index, part in enumerate(loc):
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if (*path, part) not in lines and index < len(loc) - 1:
            continue
        path.append(part)
    return path


def describe_validation_error(path: Path, lines: dict[Loc, int], exc: ValidationError) -> str:
    """First validation error as `file:line: field: message` (one line)."""
    err = exc.errors()[0]
    loc = _key_path(lines, err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # What is wrong is the tag key itself: name it (and so its line), not the entry holding it.
        ctx = err.get("ctx") or {}
        loc.append(str(ctx.get("discriminator", "")).strip("'"))
        if err["type"] == "union_tag_invalid":
            message = f"'{ctx.get('tag')}' is not one of {ctx.get('expected_tags')}"
        else:
            message = "Field required"
    field = ".".join(str(part) for part in loc) or "(top level)"
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
