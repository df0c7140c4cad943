"""`edge-infer`: each subcommand lives in its own module, imported only when it runs (gunicorn-style).

A subcommand module exposes `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge import __version__
from edge.errors import EdgeError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("edge.daemon", "run the inference daemon from a config file"),
    "check-config": ("edge.config", "validate a config file and exit"),
    "doctor": ("edge.doctor", "detected profile, backends, providers, and a package self-check"),
    "bench": ("edge.bench", "latency/throughput/RSS of a package on this device"),
    "demo": ("edge.demo", "run the bundled model on a bundled clip against a local broker"),
    "keygen": ("edge.keygen", "create an ed25519 key pair for signing model packages"),
    "forget": (
        "edge.forget",
        "remove what this device left retained on the broker (Home Assistant entities)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-infer", description="Edge inference runtime.")
    parser.add_argument("--version", action="version", version=f"edge-infer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # No -h here: `edge-infer demo --help` must reach the subcommand's own parser, which knows its options.
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        sub_parser.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first, then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known._module)
    sub_parser = argparse.ArgumentParser(
        prog=f"edge-infer {known.command}", description=SUBCOMMANDS[known.command][1]
    )
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[argv.index(known.command) + 1 :])
    args.verbose = args.verbose or known.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.main(args) or 0)
    except EdgeError as exc:
        print(f"edge-infer {known.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
