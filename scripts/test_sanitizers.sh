#!/usr/bin/env bash
# Builds the C++ library and its test with AddressSanitizer + UndefinedBehaviorSanitizer and runs
# them (leak checking on): any report fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYFASTNN_VENV:-$ROOT/.venv}"
"$ROOT/scripts/setup_env.sh"
BUILD="${PYFASTNN_ASAN_BUILD:-$ROOT/build/cmake-asan}"
mkdir -p "$(dirname "$BUILD")"
TORCH_PREFIX="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPYFASTNN_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ctest --test-dir "$BUILD" --output-on-failure
