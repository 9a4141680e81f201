#!/usr/bin/env bash
# The test suite on a fresh machine: set up, build, run the Python tests, then build the C++
# library with CMake against the same libtorch and run its ctest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m pytest "$@"

"$ROOT/scripts/build_cpp.sh" "${PYFASTNN_CMAKE_BUILD:-$ROOT/build/cmake}"
