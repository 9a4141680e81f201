#!/usr/bin/env bash
# The one-command GPU check, for a machine with a GPU and a CUDA build of torch already installed
# (no network needed). In order, each step logged to OUTDIR/<step>.log with its time:
#   build                   pip install -e . with PYFASTNN_CUDA=1 (TORCH_CUDA_ARCH_LIST, default 9.0)
#   test_cuda               tests/library/test_cuda.py (cuBLASLt and fallback paths, dropout, CUDA graphs)
#   test_cuda_train         tests/lesson/test_cuda_train.py + tests/library/test_cuda_graph.py (training on the GPU,
#                           cuda_graph_step, the 5-epoch run; MNIST from $PYFASTNN_MNIST)
#   test_cpu_on_cuda_build  the CPU suite on the same build
#   fuzz_cuda / fuzz_mlp_cuda   scripts/fuzz_fused_linear.py --device cuda (FUZZ_CASES each, default 1000;
#                           FUZZ_CASES=10000 for the full acceptance run)
#   memcheck / racecheck    compute-sanitizer over a small selection of tests/library/test_cuda.py that
#                           reaches every kernel (vectorized and one-element passes, dropout, the
#                           shared-memory bias-sum kernel via the fallback path)
#   bench_cuda              benchmarks/bench_cuda.py --json OUTDIR/bench_cuda.json
#   bench_mnist_cuda        benchmarks/bench_mnist.py --device cuda --json OUTDIR/bench_mnist_cuda.json
# Sized to finish in about 6 minutes on an H200 (build ~1 min); --quick skips the CPU suite and
# runs the quick benchmark. Exit status 0 only if every step passed.
#
#   scripts/gpu_check.sh OUTDIR [--quick]
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [--quick]}"
QUICK="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
FUZZ_CASES="${FUZZ_CASES:-1000}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYFASTNN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to OUT/NAME.log, remembers failure
  local name="$1" limit="$2"; shift 2
  echo "[gpu_check] $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - start)) s$([ $rc -eq 124 ] && echo " (timed out after $limit s)")"
  tail -n 3 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
{ nvidia-smi; "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/env.log" 2>&1
step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
"$PYTHON" -c "import pyfastnn; print(pyfastnn.info())" >> "$OUT/env.log" 2>&1
step test_cuda 240 "$PYTHON" -m pytest tests/library/test_cuda.py -q -x -p no:cacheprovider --junitxml="$OUT/test_cuda.xml"
step test_cuda_train 300 "$PYTHON" -m pytest tests/lesson/test_cuda_train.py tests/library/test_cuda_graph.py pyfastnn/cuda_graph.py \
  -q -x -p no:cacheprovider --junitxml="$OUT/test_cuda_train.xml"
if [ -z "$QUICK" ]; then
  step test_cpu_on_cuda_build 240 "$PYTHON" -m pytest tests -q -x -p no:cacheprovider --ignore=tests/library/test_cuda.py \
    -k "not opcheck and not train"
fi
step fuzz_cuda 120 "$PYTHON" scripts/fuzz_fused_linear.py --device cuda --cases "$FUZZ_CASES"
step fuzz_mlp_cuda 120 "$PYTHON" scripts/fuzz_fused_linear.py --device cuda --mlp --cases "$FUZZ_CASES"
# Sanitizer selection: odd and aligned shapes, both GEMM paths, dropout forward+backward, the
# bias-sum kernel (fallback path), a captured graph.
SANITIZE_TESTS='(misaligned and relu and float32) or (gradients_use_the_same_mask and float32 and relu) or (statistics and 999) or large_buffer or (captured and bfloat16)'
if command -v compute-sanitizer > /dev/null 2>&1; then
  for tool in memcheck racecheck; do
    step "$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" -m pytest tests/library/test_cuda.py -q -x -p no:cacheprovider -k "$SANITIZE_TESTS"
  done
else
  echo "[gpu_check] compute-sanitizer not found: memcheck and racecheck NOT run" | tee "$OUT/sanitizers.log"
  status=1
fi
step bench_cuda 300 "$PYTHON" benchmarks/bench_cuda.py ${QUICK:+--quick} --min-run-time 0.05 --json "$OUT/bench_cuda.json"
step bench_mnist_cuda 300 "$PYTHON" benchmarks/bench_mnist.py --device cuda ${QUICK:+--quick} \
  --json "$OUT/bench_mnist_cuda.json"
echo "[gpu_check] done, status $status; logs in $OUT"
exit $status
