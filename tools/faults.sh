#!/usr/bin/env bash
# The fault suite (issue 7), slow scenarios included: real mosquitto, the daemon as a real process, a
# counting subscriber. The table lands in $EDGE_CACHE/faults/report.md and is printed at the end.
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec python -m pytest -q tests/faults -m "slow or not slow" "$@"
