#!/usr/bin/env bash
# The test suite on a fresh machine: set up, build, run the Python tests, then build the C++
# library with CMake against the same libtorch and run its ctest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# One pytest worker per CPU (pytest-xdist): most tests are small and bound by Python or by the
# subprocesses they start, so two workers on a 2-CPU machine take 70 % of one process's time.
# PYFASTNN_TEST_WORKERS=0 runs the suite in this process; a -n of the caller's own wins.
"$VENV/bin/python" -m pytest -n "${PYFASTNN_TEST_WORKERS:-auto}" "$@"

"$ROOT/scripts/build_cpp.sh" "${PYFASTNN_CMAKE_BUILD:-$ROOT/build/cmake}"
