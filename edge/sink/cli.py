"""`edge-sink --config sink.yaml` (run) and `edge-sink gaps --config sink.yaml [--json]`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from edge.errors import EdgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-sink", description="Store a fleet's predictions in PostgreSQL or SQLite, losing none."
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "gaps"],
        default="run",
        help="run (default): subscribe and store; gaps: print the missing seq ranges and duplicates",
    )
    parser.add_argument("--config", type=Path, required=True, help="the sink's YAML config")
    parser.add_argument("--json", action="store_true", help="gaps: print JSON")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def _gaps(args: argparse.Namespace) -> int:
    from edge.sink.config import load_sink_config
    from edge.sink.storage import open_storage

    config = load_sink_config(args.config)
    storage = open_storage(config.database.url, config.schema_)
    try:
        storage.migrate()
        gaps = storage.refresh_gaps(config.gaps.grace_s)
        _, duplicates = storage.gaps()
    finally:
        storage.close()
    if args.json:
        print(json.dumps({"gaps": [g.as_dict() for g in gaps], "duplicates": duplicates}))
    else:
        missing = sum(g.to_seq - g.from_seq + 1 for g in gaps)
        print(f"{len(gaps)} gap(s), {missing} missing prediction(s), {duplicates} duplicate(s)")
        for g in gaps:
            print(f"  {g.device_id} boot {g.boot_id}: seq {g.from_seq}..{g.to_seq}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge.sink.config import load_sink_config
    from edge.sink.service import Sink

    config = load_sink_config(args.config)
    sink = Sink(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        sink.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sink.start()
    logging.getLogger("edge.sink").info(
        "edge-sink: %s -> %s (group %s, client id %s)",
        f"{config.mqtt.host}:{config.mqtt.port}/{config.mqtt.topic_prefix}",
        "sqlite" if config.database.is_sqlite else f"postgresql schema {config.schema_}",
        config.mqtt.group or "none: unshared",
        sink.client_id,
    )
    sink.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _gaps(args) if args.command == "gaps" else _run(args)
    except EdgeError as exc:
        print(f"edge-sink: {exc}", file=sys.stderr)
        return 2
