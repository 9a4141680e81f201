#!/usr/bin/env bash
# The main job on a fresh machine: set up and build, print what was built, then run the lesson demo
# (perceptron, XOR nets, activation plot, quick benchmark and, with MNIST present, a short MNIST run).
# MNIST is read from $PYFASTNN_MNIST, else ../shared/data/mnist beside the project; nothing is downloaded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
"$ROOT/scripts/setup_env.sh"
"$VENV/bin/pyfastnn" info
MNIST="${PYFASTNN_MNIST:-$ROOT/../shared/data/mnist}"
DATA=()
# Set, $PYFASTNN_MNIST is read by the demo itself, which refuses a wrong folder naming the variable.
if [ -z "${PYFASTNN_MNIST:-}" ]; then
  if [ -d "$MNIST" ]; then DATA=(--data "$MNIST"); else echo "[demo] no MNIST at $MNIST: the MNIST part is skipped"; fi
fi
"$VENV/bin/pyfastnn" demo "${DATA[@]}" --out "${PYFASTNN_DEMO_OUT:-$ROOT/demo_output}"
