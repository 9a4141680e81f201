#!/usr/bin/env bash
# Configures, builds and runs (ctest) the C++ library and its tests with CMake against the torch of
# $PYFASTNN_VENV (default .venv): scripts/build_cpp.sh BUILD_DIR [CMake options...]. The configure
# log goes to BUILD_DIR.configure.log (printed if configuring fails); ctest inherits the caller's
# environment (sanitizer options, for instance). PYFASTNN_CMAKE_PROJECT=samples/cpp builds it through
# that project instead, as a user's project adds it (its program then runs as one more ctest test).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${PYFASTNN_VENV:-$ROOT/.venv}" && pwd)"  # absolute: CMake runs ninja from its own folders
BUILD="$1"
shift
mkdir -p "$(dirname "$BUILD")"
TORCH_PREFIX="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# setup_env.sh puts pip's CMake in the environment where the machine's is missing or too old.
BIN="$([ -x "$VENV/bin/cmake" ] && echo "$VENV/bin/" || true)"
"${BIN}cmake" -S "$ROOT/${PYFASTNN_CMAKE_PROJECT:-.}" -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  "$@" > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
grep "^-- pyfastnn" "$BUILD.configure.log" || true
"${BIN}cmake" --build "$BUILD" -j "${MAX_JOBS:-2}"
"${BIN}ctest" --test-dir "$BUILD" --output-on-failure
