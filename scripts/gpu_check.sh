#!/usr/bin/env bash
# The one-command GPU check, for a machine with a GPU and a CUDA build of torch already installed
# (no network needed): builds pyfastnn in place with CUDA, runs the CUDA tests (plus the CPU suite
# on the same build), compute-sanitizer memcheck over a short selection when the tool exists, and
# the CUDA benchmark. Logs and JSON go to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [--quick]
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [--quick]}"
QUICK="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT"
export PYFASTNN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
step() {  # step NAME COMMAND...: runs, logs to OUT/NAME.log, remembers failure
  local name="$1"; shift
  echo "[gpu_check] $name"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 3 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
{ nvidia-smi; "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/env.log" 2>&1
step build "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
step test_cuda "$PYTHON" -m pytest tests/test_cuda.py -q -x --junitxml="$OUT/test_cuda.xml"
if [ -z "$QUICK" ]; then
  step test_cpu_on_cuda_build "$PYTHON" -m pytest tests -q -x --ignore=tests/test_cuda.py -k "not opcheck and not train"
fi
if command -v compute-sanitizer > /dev/null 2>&1; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -m pytest tests/test_cuda.py -q -x \
    -k "odd- or nd- or wide_tail" -p no:cacheprovider
fi
step bench_cuda "$PYTHON" benchmarks/bench_cuda.py ${QUICK:+--quick} --json "$OUT/bench_cuda.json"
echo "[gpu_check] done, status $status; logs in $OUT"
exit $status
