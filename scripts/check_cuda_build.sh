#!/usr/bin/env bash
# Keeps the CUDA backend compiling where there is no GPU: builds a copy of the tree against the CUDA
# build of torch (torch==2.14.1 here) with PYFASTNN_CUDA=1 for sm_90, imports it, and runs the test
# suite on it (the CPU paths; tests/library/test_cuda.py runs only where a GPU is visible); then the
# C++ library, its ctest suite and samples/cpp with CMake against that torch (C++20, as torch 2.14
# requires).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${PYFASTNN_CUDA_WORKDIR:-$ROOT/build/cuda-check}"
rm -rf "$WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$WORK/src"
# The copy has no ../shared beside it: point the MNIST tests at the one beside this checkout.
export PYFASTNN_MNIST="${PYFASTNN_MNIST:-$(cd "$ROOT/.." && pwd)/shared/data/mnist}"
export PYFASTNN_VENV="${PYFASTNN_CUDA_VENV:-$WORK/venv}"
export PYFASTNN_TORCH="${PYFASTNN_CUDA_TORCH:-torch==2.14.1}"
export PYFASTNN_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
cd "$WORK/src"
scripts/setup_env.sh
"$PYFASTNN_VENV/bin/python" -c "import pyfastnn; i = pyfastnn.info(); assert i['backends']['cuda'], i; print('[cuda] built for', i['cuda_archs'], 'with torch', i['torch'])"
# One pytest worker per CPU, as in scripts/test.sh.
"$PYFASTNN_VENV/bin/python" -m pytest tests -q -x -n "${PYFASTNN_TEST_WORKERS:-auto}" "$@"

# Through samples/cpp, as a user's project would add it: torch's CUDA targets must reach that project,
# and the C++20 torch 2.14 requires must reach its program (build_cpp.sh finds the toolkit).
PYFASTNN_CMAKE_PROJECT=samples/cpp scripts/build_cpp.sh "$WORK/cmake"
