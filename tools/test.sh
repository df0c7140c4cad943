#!/usr/bin/env bash
# The whole default test suite (slow conversions and benchmarks have their own commands, see README).
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
