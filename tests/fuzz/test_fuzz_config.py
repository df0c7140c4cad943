"""Daemon config files (edge/config.py via edge/yamlio.py): any bytes give a config or one clear error.

Every example writes a real file and loads it the way `edge-infer check-config` does. A pass is a valid
`DaemonConfig`; a refusal is a `ConfigError` whose single line starts with the file name (and names the
field for a validation error). Any other exception, a multi-line message or a hang fails the property.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, note
from hypothesis import strategies as st

from edge import cli
from edge.config import DaemonConfig, load_config
from edge.errors import ConfigError
from tests.fuzz.strategies import NASTY_VALUES, YAML_SHARDS, damaged_bytes, mutated
from tests.fuzz.support import TEST_TIMEOUT_S, assert_clear_error, fuzz_settings, no_hang, with_field

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

VALID: dict[str, Any] = {
    "device_id": "cam-01",
    "profile": "auto",
    "model": "models/current",
    "sources": [
        {"type": "video", "uri": "clip.avi", "fps": 5, "loop": False, "reconnect_min_s": 0.5},
        {"type": "sensor", "uri": "/dev/ttyUSB0", "window": 128, "hop": 64, "format": "s16le", "channels": 2},
    ],
    "mqtt": {
        "host": "127.0.0.1",
        "port": 1883,
        "protocol": 5,
        "qos": 1,
        "topic_prefix": "edge",
        "keepalive": 30,
        "tls": {"ca_file": "ca.pem"},
    },
    "outbox": {"path": "state/outbox.db", "max_bytes": 1048576},
    "metrics": {"port": 9464, "addr": "127.0.0.1"},
    "trusted_keys": ["keys/release.pub"],
    "backend": "onnxruntime",
    "threads": 2,
    "frame_queue": 4,
    "flush_timeout_s": 5.0,
    "exit_on_source_end": True,
}
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def dump(document: Any, flow: bool, unicode: bool) -> str:
    return yaml.safe_dump(document, default_flow_style=flow, allow_unicode=unicode, sort_keys=False)


def check_load(data: bytes) -> DaemonConfig | str:
    """Load `data` as a config file; returns the config or the (checked) error message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.yaml"
        path.write_bytes(data)
        try:
            with no_hang():
                config = load_config(path, environ={})
        except ConfigError as exc:
            message = assert_clear_error(exc)
            assert message.startswith(f"{path}:"), message
            return message[len(str(path)) :]
    assert isinstance(config, DaemonConfig)
    assert DEVICE_ID.fullmatch(config.device_id), repr(config.device_id)
    assert config.model.is_absolute() and config.outbox.path.is_absolute()
    assert all(key.is_absolute() for key in config.trusted_keys)
    assert len(config.all_sources) >= 1
    return config


def test_the_valid_document_loads() -> None:
    config = check_load(dump(VALID, flow=False, unicode=True).encode())
    assert isinstance(config, DaemonConfig) and config.device_id == "cam-01"


@fuzz_settings(100)
@given(st.data(), st.booleans(), st.booleans())
def test_mutated_valid_config(data: st.DataObject, flow: bool, unicode: bool) -> None:
    document, notes = data.draw(mutated(VALID))
    note(notes)
    check_load(dump(document, flow, unicode).encode("utf-8", "surrogatepass"))


@given(st.sampled_from(["cam-01\n", "cam-01\r\n", "\ncam-01"]))
@example("cam-01\n").via("regression: `re.match` with `$` let a trailing newline into the MQTT topic")
def test_device_id_with_a_line_break_is_refused(device_id: str) -> None:
    document = {**VALID, "device_id": device_id}
    message = check_load(yaml.safe_dump(document).encode())
    assert isinstance(message, str) and re.match(r"^:\d+: device_id:", message), message


@fuzz_settings(100)
@given(st.data())
def test_damaged_config_text(data: st.DataObject) -> None:
    """Valid or mutated YAML, then truncated, spliced with YAML syntax shards or raw bytes."""
    document = data.draw(st.one_of(st.just(VALID), mutated(VALID, max_mutations=1).map(lambda pair: pair[0])))
    text = dump(document, data.draw(st.booleans()), data.draw(st.booleans()))
    check_load(data.draw(damaged_bytes(text)))


@fuzz_settings(150)
@given(
    st.one_of(
        st.binary(max_size=512),
        st.text(max_size=200).map(str.encode),
        NASTY_VALUES.map(lambda value: yaml.safe_dump(value).encode()),
    )
)
@example(b"\xff\xfe\x00garbage").via("regression: binary file escaped as UnicodeDecodeError")
@example(b"device_id: cam-01\n\x00").via("regression: control character gave a raw yaml ReaderError")
@example(b"!!timestamp 2020-13-45x: 1\n").via("regression: PyYAML raised AttributeError on a bad timestamp")
@example(b"a: &x [*x]\n").via("regression: recursive alias gave RecursionError")
@example(b"[" * 5000).via("regression: deep nesting gave RecursionError after seconds in PyYAML's scanner")
@example(b"{a: " * 3000).via("regression: deep nesting gave RecursionError")
@example(b"device_id: !!int abc\n").via("regression: bad tagged int gave ValueError")
@example(b"profile: 2020-13-45\n").via("regression: impossible timestamp gave ValueError")
def test_arbitrary_documents(data: bytes) -> None:
    check_load(data)


@fuzz_settings(150)
@given(st.lists(st.sampled_from([*YAML_SHARDS, "a", "b", "\n", " ", "1", "x: ", "device_id: "]), max_size=30))
@example(
    [
        "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    ]
).via("regression: billion laughs: line bookkeeping walked every alias (10 s, exponential)")
def test_yaml_syntax_soup(shards: list[str]) -> None:
    check_load("".join(shards).encode("utf-8", "surrogatepass"))


PATH_FIELDS = [("model",), ("outbox", "path"), ("trusted_keys", 0), ("mqtt", "tls", "ca_file")]


@fuzz_settings(60)
@given(
    st.sampled_from(PATH_FIELDS),
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(
            ["~nosuchuser/x", "~", "a\x00b", "\ud800", "\udcff", "a" * 5000, "/" * 3, "..", "~root/x"]
        ),
    ),
)
@example(("model",), "~nosuchuser/x").via("regression: RuntimeError from expanduser")
@example(("mqtt", "tls", "ca_file"), "a\x00b").via("regression: ValueError (NUL) from stat")
@example(("model",), "\ud800").via("regression: UnicodeEncodeError from a lone surrogate")
def test_path_fields(field: tuple[Any, ...], value: str) -> None:
    """Paths are resolved against the config file: any text gives an absolute path or names the field."""
    document: Any = copy.deepcopy(VALID)
    target = document
    for part in field[:-1]:
        target = target[part]
    target[field[-1]] = value
    result = check_load(yaml.safe_dump(document, allow_unicode=False).encode())
    if isinstance(result, str):
        dotted = ".".join(str(part) for part in field)
        assert dotted in result, result


@fuzz_settings(100)
@given(
    st.sampled_from(
        [
            "device_id",
            "model",
            "mqtt.port",
            "mqtt.qos",
            "mqtt.topic_prefix",
            "mqtt.keepalive",
            "outbox.max_bytes",
            "metrics.port",
            "threads",
            "frame_queue",
            "flush_timeout_s",
            "backend",
            "profile",
            "mqtt.protocol",
            "sources.0.fps",
            "sources.1.window",
        ]
    ),
    NASTY_VALUES,
)
def test_a_wrong_value_is_named_by_its_field(field: str, value: Any) -> None:
    result = check_load(yaml.safe_dump(with_field(VALID, field, value)).encode())
    if isinstance(result, str):
        # the field is named by its key path in the file (sources.0.fps), not by pydantic's location
        top = field.split(".")[0]
        assert re.match(rf"^:\d+: {top}[.:]", result), result


@fuzz_settings(30, costly=True)
@given(st.data())
def test_check_config_command_prints_one_line(data: st.DataObject) -> None:
    """`edge-infer check-config --no-package FILE`: exit 0 with an `ok:` line, or exit 2 with one error
    line (after one `error:`/`warning:` line per finding of what it checks without starting)."""
    document = data.draw(st.one_of(st.just(VALID), mutated(VALID, max_mutations=2).map(lambda pair: pair[0])))
    raw = data.draw(damaged_bytes(dump(document, False, True)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.yaml"
        path.write_bytes(raw)
        out, err = io.StringIO(), io.StringIO()
        with no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check-config", "--no-package", str(path)])
    if code == 0:
        assert out.getvalue().startswith(f"ok: {path}:") and out.getvalue().count("\n") == 1
    else:
        assert code == 2, (code, err.getvalue())
        *findings, last = err.getvalue().splitlines()
        assert last.startswith(f"edge-infer check-config: error: {path}:"), (findings, last)
        assert all(line.startswith((f"error: {path}: ", f"warning: {path}: ")) for line in findings), findings
