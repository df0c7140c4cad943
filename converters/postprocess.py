"""`--postprocess JSON` / `--postprocess @file.json`: the manifest's typed post-processing, validated by
the same union the runtime loads it with (edge.tasks.registry), so a package never carries a config its
devices refuse. Errors are one line naming the source and the field:
`--postprocess: strides: Input should be a valid list` or `head.json: format: 'yolov9' is not one of ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from edge.errors import ConfigError
from edge.tasks.base import TaskConfig
from edge.tasks.registry import PostprocessConfig, explain

OPTION = "--postprocess"
_ADAPTER: TypeAdapter[TaskConfig] = TypeAdapter(PostprocessConfig)


def parse_postprocess(text: str, task: str | None = None) -> TaskConfig:
    """The config in `text` (JSON, or `@path` of a JSON file). Without `type`, `task` (--task) is it."""
    where = OPTION
    if text.startswith("@"):
        path = Path(text[1:])
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{OPTION} @{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f'{where}: expected a JSON object such as {{"type": "detection", "format": "yolo"}}'
        )
    if "type" not in data and task is not None:
        data = {"type": task, **data}
    if task is not None and data.get("type") != task:
        raise ConfigError(f"{where}: type: '{data.get('type')}' does not match --task {task}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        error["loc"] = ("postprocess", *error["loc"])
        field, message = explain(error)
        raise ConfigError(f"{where}: {field.removeprefix('postprocess.')}: {message}") from None
