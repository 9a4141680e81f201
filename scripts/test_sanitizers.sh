#!/usr/bin/env bash
# Builds the C++ library and its test with AddressSanitizer + UndefinedBehaviorSanitizer and runs
# them (leak checking on): any report fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  "$ROOT/scripts/build_cpp.sh" "${PYFASTNN_ASAN_BUILD:-$ROOT/build/cmake-asan}" -DPYFASTNN_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
