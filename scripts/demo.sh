#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, print what was built, run the quick benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYFASTNN_VENV:-$ROOT/.venv}"
"$ROOT/scripts/setup_env.sh"
"$VENV/bin/pyfastnn" info
"$VENV/bin/pyfastnn" bench --quick
