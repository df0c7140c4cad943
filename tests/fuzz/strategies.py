"""Hypothesis strategies for hostile input: odd scalars, deep nesting, YAML syntax shards, byte damage."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# Values that break naive code: huge/negative numbers, NaN, control characters, path tricks, unicode.
NASTY_STRINGS = [
    "",
    " ",
    "\t",
    "~",
    "~nosuchuser/x",
    "../../../../etc/passwd",
    "/etc/passwd",
    "a\nb",
    "a\x00b",
    "\x1b[31m",
    "\u202e",
    "\ufeff",
    "é",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "null",
    "true",
    "0x10",
    "1e400",
    "-0",
    "#",
    "+",
    "cmd/+/#",
    "${HOME}",
    "%s%n",
    "a" * 5000,
]
NASTY_SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, 1, 2**31, 2**63, -(2**63), 10**30, -(10**30), 65536, 4095]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(NASTY_STRINGS),
)
NASTY_VALUES: st.SearchStrategy[Any] = st.recursive(
    NASTY_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int, kind: str) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


DEEP_VALUES = st.builds(deep, st.integers(1, 150), st.sampled_from(["list", "dict"]))

# Shards of YAML syntax to splice into text: tags, anchors, aliases, merge keys, directives, flow chars.
YAML_SHARDS = [
    "&a ",
    "*a",
    "*missing",
    "&a [*a]",
    "!!int ",
    "!!int abc",
    "!!float x",
    "!!timestamp 2020-13-45",
    "2001-02-30",
    "!!binary ***",
    "!!bool maybe",
    "!!set {a, b}",
    "!!omap [a]",
    "!!pairs {a: 1}",
    "!!python/object:os.system",
    "!unknown x",
    "<<: *a",
    "<<: [1, 2]",
    "? [a, b]\n: c",
    "{",
    "}",
    "[",
    "]",
    ",",
    ": ",
    "- ",
    "|",
    ">-",
    "%YAML 1.1\n---\n",
    "%TAG ! tag:x,2000:\n---\n",
    "\n---\n",
    "\n...\n",
    "\t",
    "\x00",
    "\x85",
    "\ufeff",
    '"\\ud800"',
    '"\\x00"',
    "'unterminated",
    '"unterminated',
    "\n  bad: indent",
    "1" * 5000,
    "[" * 300,  # deeper nesting is a regression example: PyYAML's scanner is slow on it
    "{a: " * 300,
    "0o777",
    ".nan",
    "-.inf",
]


@st.composite
def damaged_bytes(draw: st.DrawFn, text: str) -> bytes:
    """`text` as UTF-8, then truncated, spliced with YAML shards or raw bytes, or left alone."""
    data = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "shard", "bytes", "flip", "none"]))
        position = draw(st.integers(0, len(data)))
        if kind == "truncate":
            data = data[:position]
        elif kind == "shard":
            shard = draw(st.sampled_from(YAML_SHARDS)).encode("utf-8")
            end = position + draw(st.integers(0, 8))
            data = data[:position] + shard + data[end:]
        elif kind == "bytes":
            data = data[:position] + draw(st.binary(min_size=1, max_size=16)) + data[position:]
        elif kind == "flip" and data:
            index = min(position, len(data) - 1)
            data = data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]
    return data


def key_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts/lists (dict keys and list indexes)."""
    paths: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            paths.append((*prefix, key))
            paths.extend(key_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths.append((*prefix, index))
            paths.extend(key_paths(child, (*prefix, index)))
    return paths


@st.composite
def mutated(
    draw: st.DrawFn, document: dict[str, Any], max_mutations: int = 3
) -> tuple[dict[str, Any], list[str]]:
    """A deep copy of `document` with a few values replaced, keys deleted or unknown keys added.

    Returns the document and a description of each mutation (for failure reports).
    """
    doc = copy.deepcopy(document)
    notes: list[str] = []
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = key_paths(doc)
        kind = draw(st.sampled_from(["set", "set", "delete", "add", "deep"]))
        if not paths:
            kind = "add"
        if kind == "add":
            containers = [()] + [p for p in paths if isinstance(_get(doc, p), dict)]
            where = draw(st.sampled_from(containers))
            key = draw(st.one_of(st.text(max_size=12), st.sampled_from(["colour", "Device_id", "source "])))
            _get(doc, where)[key] = draw(NASTY_VALUES)
            notes.append(f"add {(*where, key)}")
            continue
        path = draw(st.sampled_from(paths))
        parent, last = _get(doc, path[:-1]), path[-1]
        if kind == "delete":
            del parent[last]
            notes.append(f"delete {path}")
        else:
            parent[last] = draw(DEEP_VALUES if kind == "deep" else NASTY_VALUES)
            notes.append(f"{kind} {path}")
    return doc, notes


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc
