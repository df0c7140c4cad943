#!/usr/bin/env bash
# Static checks of the systemd unit, for CI (.ci/run) and before a release:
#   1. `systemd-analyze verify` (syntax, directives, ExecStart executable),
#   2. `systemd-analyze security --offline=yes` with an exposure threshold; the score is printed.
# systemd need not be PID 1: both run offline on the unit file.
#
# usage: tools/check_systemd.sh [--unit FILE] [--drop-in FILE]... [--threshold SCORE]
#   --drop-in: check the unit as extended by these drop-ins (systemd/drop-ins/*.conf)
#   exit 0: verify clean and exposure <= threshold (default 1.5); 1: a check failed; 2: usage/tooling.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$here/systemd/edge-infer.service"
threshold="1.5"
drop_ins=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --unit) unit="$2"; shift 2 ;;
        --threshold) threshold="$2"; shift 2 ;;
        --drop-in) drop_ins+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "check_systemd: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
analyze="$(command -v systemd-analyze || true)"
if [[ -z "$analyze" ]]; then
    echo "check_systemd: systemd-analyze not found (apt-get install systemd)" >&2
    exit 2
fi
[[ -f "$unit" ]] || { echo "check_systemd: $unit: no such unit file" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
name="$(basename "$unit")"
# The real ExecStart lives on the device (/usr/local/bin/edge-infer); verify checks that it is
# executable, so point it at a stub inside the temp dir and check everything else unchanged.
stub="$work/bin/edge-infer"
mkdir -p "$work/bin" "$work/units"
printf '#!/bin/sh\nexit 0\n' >"$stub"
chmod 0755 "$stub"
sed -E "s|^ExecStart=[^ ]+|ExecStart=$stub|" "$unit" >"$work/units/$name"
for drop_in in "${drop_ins[@]}"; do
    [[ -f "$drop_in" ]] || { echo "check_systemd: $drop_in: no such drop-in" >&2; exit 2; }
    mkdir -p "$work/units/$name.d"
    cp "$drop_in" "$work/units/$name.d/"
    echo "with drop-in: $drop_in"
done

status=0
echo "== systemd-analyze verify $name ($("$analyze" --version | head -1))"
if verify_out="$("$analyze" verify "$work/units/$name" 2>&1)" && [[ -z "$verify_out" ]]; then
    echo "verify: OK"
else
    echo "$verify_out"
    echo "verify: FAILED"
    status=1
fi

# systemd-analyze takes the threshold in tenths (0-100); the score it prints is 0.0-10.0.
tenths="$(awk -v t="$threshold" 'BEGIN { printf "%d", t * 10 + 0.5 }')"
echo "== systemd-analyze security --offline=yes --threshold=$tenths $name"
security_out="$("$analyze" security --offline=yes --threshold="$tenths" "$work/units/$name" 2>&1)" || status=1
echo "$security_out" | grep -E '^✗' || true
score="$(echo "$security_out" | sed -nE 's/.*Overall exposure level for [^:]+: ([0-9.]+).*/\1/p')"
if [[ -z "$score" ]]; then
    echo "$security_out"
    echo "check_systemd: could not read the exposure score" >&2
    exit 2
fi
echo "exposure score: $score (threshold $threshold)"
if awk -v s="$score" -v t="$threshold" 'BEGIN { exit !(s > t) }'; then
    echo "security: FAILED (exposure $score > $threshold)"
    status=1
else
    echo "security: OK"
fi
exit "$status"
