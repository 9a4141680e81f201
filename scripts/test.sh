#!/usr/bin/env bash
# The test suite on a fresh machine: set up, build, run the Python tests, then build the C++
# library with CMake against the same libtorch and run its ctest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYFASTNN_VENV:-$ROOT/.venv}"
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m pytest "$@"

BUILD="${PYFASTNN_CMAKE_BUILD:-$ROOT/build/cmake}"
mkdir -p "$(dirname "$BUILD")"
TORCH_PREFIX="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
