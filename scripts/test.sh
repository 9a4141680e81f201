#!/usr/bin/env bash
# The test suite on a fresh machine: set up, build, run the Python tests, then build the C++
# library with CMake against the same libtorch and run its ctest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# One pytest worker per CPU (pytest-xdist): most tests are small and bound by Python or by the
# subprocesses they start, so a 2-CPU machine runs the suite in about 3/4 of the time of one
# process. PYFASTNN_TEST_WORKERS=0 runs it in this process; a -n of the caller's own wins.
"$VENV/bin/python" -m pytest -n "${PYFASTNN_TEST_WORKERS:-auto}" "$@"

"$ROOT/scripts/build_cpp.sh" "${PYFASTNN_CMAKE_BUILD:-$ROOT/build/cmake}"
