#!/usr/bin/env bash
# The README's main command: a local broker, the example model on a clip of real photos, predictions
# printed as a subscriber receives them. The first run converts EfficientNet-Lite0 (a few minutes, cached).
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec edge-infer demo "$@"
