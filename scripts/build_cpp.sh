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
# A CUDA build of torch (what PyPI serves on Linux) has a CMake package that asks for the CUDA toolkit,
# even for this CPU-only library: point it at the toolkit torch itself would use (CUDA_HOME, the nvcc
# on PATH, /usr/local/cuda), else at /usr/local/cuda where torch's guess is no toolkit (an nvcc
# wrapper on PATH), a toolkit being what setup.py's cuda_toolkit_problem accepts; nvrtc from the
# torch wheel where the toolkit has none.
CUDA_ARGS=()
read -r TORCH_VERSION TORCH_HAS_CUDA TORCH_CUDA_HOME < <("$VENV/bin/python" -c '
import importlib.util, sys, torch
home = ""
if torch.version.cuda:
    from torch.utils.cpp_extension import CUDA_HOME
    spec = importlib.util.spec_from_file_location("pyfastnn_setup", sys.argv[1])
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # its helpers only: setup() runs as __main__
    home = next((d for d in (CUDA_HOME, "/usr/local/cuda") if setup.cuda_toolkit_problem(d) is None), "")
print(torch.__version__, int(bool(torch.version.cuda)), home)' "$ROOT/setup.py" 2> /dev/null)
if [ "${TORCH_HAS_CUDA:-0}" = 1 ]; then
  if [ -z "${TORCH_CUDA_HOME:-}" ]; then
    echo "scripts/build_cpp.sh: torch $TORCH_VERSION is a CUDA build, and its CMake package needs the CUDA" \
         "toolkit (nvcc), which torch does not find: install it or set CUDA_HOME," \
         "or build against a CPU build of torch (PYFASTNN_TORCH=torch==${TORCH_VERSION%%+*}+cpu" \
         "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)" >&2
    exit 1
  fi
  CUDA_ARGS=(-DCUDA_TOOLKIT_ROOT_DIR="$TORCH_CUDA_HOME" -DCUDAToolkit_ROOT="$TORCH_CUDA_HOME")
  if ! ls "$TORCH_CUDA_HOME"/lib64/libnvrtc.so* > /dev/null 2>&1; then
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    NVRTC="$(find "$SITE/nvidia" -name 'libnvrtc.so*' 2> /dev/null | sort | head -1)" || true
    [ -z "$NVRTC" ] || CUDA_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
  fi
fi
# setup_env.sh puts pip's CMake in the environment where the machine's is missing or too old.
BIN="$([ -x "$VENV/bin/cmake" ] && echo "$VENV/bin/" || true)"
# ninja: the environment's (pip's, which CMake would not find on PATH), else the machine's
NINJA="$([ -x "$VENV/bin/ninja" ] && echo "$VENV/bin/ninja" || command -v ninja || echo "$VENV/bin/ninja")"
"${BIN}cmake" -S "$ROOT/${PYFASTNN_CMAKE_PROJECT:-.}" -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_MAKE_PROGRAM="$NINJA" \
  ${CUDA_ARGS[@]+"${CUDA_ARGS[@]}"} "$@" > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
grep "^-- pyfastnn" "$BUILD.configure.log" || true
"${BIN}cmake" --build "$BUILD" -j "${MAX_JOBS:-2}"
"${BIN}ctest" --test-dir "$BUILD" --output-on-failure
