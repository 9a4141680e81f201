#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with PyTorch and builds pyfastnn into it.
#
#   scripts/setup_env.sh            # .venv, CPU build of torch 2.13.0
#   PYFASTNN_VENV=/path/to/venv PYFASTNN_TORCH="torch==2.14.1" scripts/setup_env.sh
#
# The extension is built with --no-build-isolation so it compiles against the torch in this
# environment (an isolated build would download a separate multi-GB torch just to compile).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
TORCH_SPEC="${PYFASTNN_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
VENV="$(cd "$VENV" && pwd)"  # one spelling of the folder (the build's settings record it)
echo "[setup] installing $TORCH_SPEC and the build tools"
TOOLS=(setuptools wheel ninja)
# The C++ tests (scripts/build_cpp.sh) need CMake 3.19+: pip's cmake where the machine has none as recent.
SYSTEM_CMAKE="$(cmake --version 2>/dev/null | head -n 1 | awk '{print $3}')" || true
if [ -z "$SYSTEM_CMAKE" ] || [ "$(printf '%s\n3.19\n' "$SYSTEM_CMAKE" | sort -V | head -n 1)" != "3.19" ]; then
  TOOLS+=("cmake>=3.19")
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" "${TOOLS[@]}"
# torch's own guess of the CUDA toolkit can be wrong; name the usual location when CUDA is wanted.
if [ "${PYFASTNN_CUDA:-}" != "0" ] && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# The lesson's and the tests' dependencies come from setup.py's extras (pip install "pyfastnn[lesson]"
# is what a library user adds for `pyfastnn train` / `demo`).
cd "$ROOT"  # import this tree's build, whatever folder the caller is in
# A re-run keeps the extension when it is installed in this environment, loads under its torch, was
# built with the same settings, and no build input changed since (pip would otherwise rebuild it
# from scratch every time).
SETTINGS="venv=$VENV torch=$TORCH_SPEC cuda=${PYFASTNN_CUDA:-} archs=${TORCH_CUDA_ARCH_LIST:-} cuda_home=${CUDA_HOME:-} debug_info=${PYFASTNN_DEBUG_INFO:-}"
STAMP="$ROOT/build/setup_env.settings"
up_to_date() {
  local built
  built="$(ls pyfastnn/_C.*.so 2>/dev/null | head -n 1)"
  [ -n "$built" ] && [ -x "$VENV/bin/pyfastnn" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$SETTINGS" ] &&
    [ -z "$(find csrc cmake setup.py CMakeLists.txt -newer "$built" -print -quit)" ] &&
    "$VENV/bin/python" - "${PYFASTNN_CUDA:-}" 2>/dev/null <<'PY'
import importlib.util, sys, pyfastnn, pyfastnn.extras
want, cuda = sys.argv[1], pyfastnn.info()["backends"]["cuda"]
extras_missing = pyfastnn.extras.missing_lesson_requirements() or [
    name for name in ("pytest", "xdist", "hypothesis", "expecttest", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
sys.exit(bool(extras_missing) or (want == "1" and not cuda) or (want == "0" and cuda))
PY
}
if up_to_date; then
  echo "[setup] pyfastnn's extension is up to date with csrc/ and this torch: not rebuilt (touch setup.py to force)"
else
  echo "[setup] building pyfastnn (C++ extension${PYFASTNN_CUDA:+, PYFASTNN_CUDA=$PYFASTNN_CUDA}) with the lesson and test extras"
  MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation -e "$ROOT[lesson,test]"
  mkdir -p "$ROOT/build" && echo "$SETTINGS" > "$STAMP"
fi
"$VENV/bin/python" -c "import pyfastnn; print('[setup] pyfastnn', pyfastnn.__version__, 'ready:', pyfastnn.info()['cpu_isa'], 'kernels')"
