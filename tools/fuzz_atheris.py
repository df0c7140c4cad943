"""Coverage-guided fuzzing (atheris/libFuzzer) of the config, command-payload and manifest parsers.

    python tools/fuzz_atheris.py -atheris_runs=20000 [CORPUS_DIR ...] [libFuzzer flags]

The first input byte picks the target; the rest is the input: a daemon config file (through
`edge.config.load_config`, as `edge-infer check-config` reads it), an MQTT command payload
(`edge.publish.commands.parse_command`) or a package manifest (`edge.package.parse_manifest`). Anything
but a valid result or a one-line `EdgeError` naming the file/topic is a crash that libFuzzer reports
(with the input saved as crash-*). Without a corpus directory, a temporary one is seeded with valid
inputs so the fuzzer starts from the real formats. The hypothesis properties live in tests/fuzz/.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["edge", "yaml"]):
    import yaml  # noqa: F401  (imported here so that the YAML parser is instrumented too)

    from edge import yamlio  # noqa: F401  (load_config imports it lazily: instrument it now)
    from edge.config import load_config
    from edge.errors import EdgeError
    from edge.package import parse_manifest
    from edge.publish.commands import CommandRejected, dispatch, parse_command, rejection_reply

TOPIC = "edge/cam-01/cmd/"
WORKDIR = Path(tempfile.mkdtemp(prefix="edge-atheris-"))
CONFIG = WORKDIR / "edge.yaml"
MANIFEST = WORKDIR / "manifest.json"
SEEDS = {
    0: b"device_id: cam-01\nmodel: models/current\nsource: {type: sensor, uri: /dev/ttyUSB0, window: 64}\n"
    b"mqtt: {host: 127.0.0.1, port: 1883, protocol: 5, qos: 1}\noutbox: {path: outbox.db, max_bytes: 1048576}\n",
    1: b'stats\x00{"id": 7, "verbose": true}',
    2: json.dumps(
        {
            "schema": "edge.package/1",
            "name": "tiny",
            "version": "1",
            "created": "2026-01-01T00:00:00Z",
            "task": "classification",
            "artifacts": [
                {"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}
            ],
            "inputs": [{"name": "x", "shape": [1, 3]}],
            "outputs": [{"name": "y", "shape": [1, 2]}],
        }
    ).encode(),
}


def check_message(exc: EdgeError, must_name: str) -> None:
    message = str(exc)
    if not message or "\n" in message or must_name not in message:
        raise AssertionError(f"unclear error from {type(exc).__name__}: {message!r}")


def strict_json(raw: bytes) -> None:
    def refuse(name: str) -> None:
        raise AssertionError(f"reply is not JSON: holds {name}")

    json.loads(raw, parse_constant=refuse)


def fuzz_config(data: bytes) -> None:
    CONFIG.write_bytes(data)
    try:
        load_config(CONFIG, environ={})
    except EdgeError as exc:
        check_message(exc, str(CONFIG))


def fuzz_command(data: bytes) -> None:
    name, _, payload = data.partition(b"\x00")
    # the name is a topic level; keep it to characters that survive EdgeError's whitespace folding
    topic = TOPIC + (
        "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name.decode("latin-1")) or "x"
    )
    try:
        command = parse_command(topic, payload)
    except CommandRejected as exc:
        check_message(exc, topic)
        strict_json(rejection_reply(exc))
        return
    if command is not None:
        strict_json(dispatch(command, {command.name: lambda args: {"echo": args}}))


def fuzz_manifest(data: bytes) -> None:
    try:
        parse_manifest(data, MANIFEST)
    except EdgeError as exc:
        check_message(exc, str(MANIFEST))


TARGETS = (fuzz_config, fuzz_command, fuzz_manifest)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    argv = list(sys.argv)
    if not any(not arg.startswith("-") for arg in argv[1:]):  # no corpus given: seed a temporary one
        corpus = WORKDIR / "corpus"
        corpus.mkdir()
        for index, seed in SEEDS.items():
            (corpus / f"seed-{index}").write_bytes(bytes([index]) + seed)
        argv.append(str(corpus))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
