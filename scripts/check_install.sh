#!/usr/bin/env bash
# The install commands users type, each in a fresh virtual environment that has the project venv's
# torch (its site-packages reached through a .pth file, as if torch were installed there):
#
#   scripts/check_install.sh           # both checks below (the wheel build compiles: minutes)
#   scripts/check_install.sh --quick   # the isolated-build check alone (seconds; CI runs this)
#
# 1. `pip install .` (pip's default isolated build, which cannot see the installed torch) fails
#    within seconds, saying to run `pip install --no-build-isolation .`.
# 2. `pip wheel --no-build-isolation .` builds a wheel that installs into a fresh venv with the same
#    torch, imports outside the source tree and runs an op on the kernels it reports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
WORK="${PYFASTNN_INSTALL_CHECK_DIR:-$ROOT/build/install-check}"
[ -x "$VENV/bin/python" ] || { echo "no virtual environment at $VENV: run scripts/setup_env.sh first" >&2; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK"
PIP_FLAGS=(-q --disable-pip-version-check)

fresh_venv() {
  "$VENV/bin/python" -m venv "$1"
  local base site
  base="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$base" > "$site/project-venv-packages.pth"
}

echo "[install] pip install . (isolated build) must stop at once with the command to run"
fresh_venv "$WORK/isolated"
begin=$(date +%s)
if "$WORK/isolated/bin/python" -m pip install "${PIP_FLAGS[@]}" "$ROOT" > "$WORK/isolated.log" 2>&1; then
  echo "[install] FAILED: an isolated build succeeded, so it compiled against a torch of its own" >&2
  exit 1
fi
seconds=$(( $(date +%s) - begin ))
grep -q "pip install --no-build-isolation \." "$WORK/isolated.log" \
  || { cat "$WORK/isolated.log"; echo "[install] FAILED: the error does not say what to run" >&2; exit 1; }
[ "$seconds" -le 120 ] || { echo "[install] FAILED: took $seconds s to fail" >&2; exit 1; }
echo "[install] failed after $seconds s with: $(grep -m1 'pyfastnn compiles' "$WORK/isolated.log")"
[ "${1:-}" = "--quick" ] && exit 0

echo "[install] pip wheel --no-build-isolation . and install it into a fresh venv"
MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip wheel "${PIP_FLAGS[@]}" --no-build-isolation --no-deps \
  -w "$WORK/dist" "$ROOT"
fresh_venv "$WORK/wheel"
"$WORK/wheel/bin/python" -m pip install "${PIP_FLAGS[@]}" "$WORK"/dist/pyfastnn-*.whl
cd "$WORK"  # not the source tree: import the installed wheel
"$WORK/wheel/bin/python" - <<'EOF'
import torch, pyfastnn
info = pyfastnn.info()
assert pyfastnn.__file__.startswith(__import__("sys").prefix), pyfastnn.__file__
assert info["torch_built_against"] == torch.__version__, info
y = pyfastnn.fused_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), activation="gelu")
print(f"[install] wheel imports from {pyfastnn.__file__}: torch {info['torch']}, kernels {info['cpu_isa']} "
      f"of {info['cpu_isas_compiled']}, output {tuple(y.shape)}")
EOF
