#!/usr/bin/env bash
# The one-command GPU check, for a machine with a GPU and a CUDA build of torch already installed
# (no network needed). Each step logs to <step>.log, packed at the end with the tests' XML reports into
# OUTDIR/logs.tar.gz, so that OUTDIR holds a few files to copy off the machine: that archive,
# summary.txt (also printed at the end) and the benchmarks' JSON files. summary.txt has one line per step
# (rc, seconds), under a failed step the lines of its log that say what failed (the failed tests,
# the sanitizer's reports, the first error lines), under a benchmark its printed figures and under a
# test step the figures its tests recorded (pytest's record_property), and the final status:
# summary.txt alone tells what to fix and what was measured. The steps, in order:
#   env                     nvidia-smi, torch, nvcc, CUDA_HOME, pytest, ninja, the lesson extra's
#                           packages, compute-sanitizer (env.log)
#   tools                   only where ninja or pytest is missing and GPU_CHECK_WHEELS names a folder
#                           of wheels: pip install --no-index from it. Without ninja torch would
#                           compile the sources one at a time (about a quarter of an hour), without
#                           pytest every test step would fail: either missing, the run stops here
#   build                   pip install -e . with PYFASTNN_CUDA=1 (TORCH_CUDA_ARCH_LIST, default 9.0)
#   (then stops at once unless torch sees a GPU and pyfastnn has its CUDA backend: every GPU test
#    would otherwise be skipped and pass)
# Side by side where the GPU is shared (nvidia-smi's compute mode Default), each reported, with its
# own time, when all have ended (else, or with GPU_CHECK_SIDE_BY_SIDE=0, all run one at a time, the
# sanitizers and fuzzers after the timed steps, so that a run cut short still says the most):
#   test_cuda               tests/library/test_cuda.py (cuBLASLt and fallback paths, dropout, CUDA graphs),
#                           side by side in GPU_CHECK_SHARDS processes (default 4), steps test_cuda.1 ...
#                           (GPU_CHECK_ONLY names them test_cuda)
#   test_cuda_graph         tests/library/test_cuda_graph.py (the captured step against the eager loop,
#                           dropout masks per replay; no lesson or MNIST needed) + its doctest
#   memcheck / racecheck    compute-sanitizer (where it can run on the device: a probe says so first)
#                           on pyfastnn's own kernels over selections of test_cuda.py. memcheck's
#                           reaches each kernel (vectorized and one-element passes, dropout, the
#                           shared-memory bias-sum kernel, the relu pass that writes the bit mask,
#                           with dropout, and the relu mask packer); racecheck's reaches the one
#                           kernel with shared memory, the bias sums, on both paths (float32, then
#                           float16)
#   fuzz_cuda / fuzz_mlp_cuda   scripts/fuzz_fused_linear.py --device cuda (FUZZ_CASES each; mismatches
#                           are logged as found, and the run stops in time to print its count; under
#                           --full every case must run)
# Then alone on the GPU, since their figures are timed:
#   lesson_extra            only where the lesson extra is missing and GPU_CHECK_WHEELS names a folder
#                           of wheels for it (a machine without network): pip install --no-index from it
#   test_cuda_train         tests/lesson/test_cuda_train.py (training on the GPU, the last partial
#                           batch's graph, resume, DDP, the demo and the 5-epoch run; those that read
#                           MNIST need it in $PYFASTNN_MNIST, else are skipped and noted as NOT RUN;
#                           all need the lesson extra)
#   bench_cuda              benchmarks/bench_cuda.py --quick (--full: every shape and dtype) --json OUTDIR/bench_cuda.json
#   bench_mnist_cuda        benchmarks/bench_mnist.py --device cuda --quick --json OUTDIR/bench_mnist_cuda.json
#   test_cpu_on_cuda_build  (--full only) the CPU suite on the same build
#   profile_cuda            (--full, or named in GPU_CHECK_ONLY) benchmarks/bench_cuda.py --profile --json
#                           OUTDIR/profile_cuda.json and (with the lesson extra) benchmarks/bench_mnist.py
#                           --device cuda --profile: the kernels each variant runs, with their device time
#                           (where the benchmarks' time goes); a diagnosis, kept out of the quick run
# Every step's time limit is cut to what is left of GPU_CHECK_BUDGET_S (default 360 s: the whole check,
# build included, in 6 minutes), so the script ends with its summary before an outer limit stops it
# (a SIGTERM or Ctrl-C still ends it with its summary); a step with under a third of its own limit
# left is not started but listed NOT RUN. --full: every bench_cuda shape and dtype,
# FUZZ_CASES 10000 (the acceptance run), the CPU suite, and a budget of 2700 s. GPU_CHECK_ONLY="memcheck
# racecheck ..." runs only those of the steps after the build (to finish what a run cut short left NOT
# RUN); the others are listed as
# skipped. GPU_CHECK_SKIP_BUILD=1 (for such a rerun on the same tree and machine) uses the CUDA build
# in place instead of building again. Exit status 0 only if every step asked for ran and passed.
#
#   PYFASTNN_MNIST=DIR [GPU_CHECK_WHEELS=DIR] [GPU_CHECK_ONLY="STEP ..."] [GPU_CHECK_BUDGET_S=S] \
#     [GPU_CHECK_SKIP_BUILD=1] [GPU_CHECK_SIDE_BY_SIDE=0] [GPU_CHECK_SHARDS=N] scripts/gpu_check.sh OUTDIR [--full]
#
# The wheels for an offline machine with Python 3.12, fetched where there is network:
#   pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     --only-binary=:all: numpy tqdm matplotlib ninja pytest -d DIR
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [--full]}"
MODE="${2:-}"
case "$MODE" in "" | --full) ;; *) echo "usage: scripts/gpu_check.sh OUTDIR [--full] (unknown: $MODE)" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # before cd "$ROOT"
PYTHON="$(command -v "$PYTHON" || echo "$PYTHON")"  # one interpreter throughout, whatever PATH gains below
if [ "$MODE" = "--full" ]; then
  FUZZ_CASES="${FUZZ_CASES:-10000}" BUDGET="${GPU_CHECK_BUDGET_S:-2700}" BENCH_CUDA_SIZE=() BENCH_CUDA_LIMIT=300
else
  FUZZ_CASES="${FUZZ_CASES:-1000}" BUDGET="${GPU_CHECK_BUDGET_S:-360}" BENCH_CUDA_SIZE=(--quick) BENCH_CUDA_LIMIT=60
fi
SHARDS="${GPU_CHECK_SHARDS:-4}"
for number in "$FUZZ_CASES" "$BUDGET" "$SHARDS"; do
  case "$number" in "" | *[!0-9]*) echo "scripts/gpu_check.sh: FUZZ_CASES, GPU_CHECK_BUDGET_S and GPU_CHECK_SHARDS must be whole numbers, got '$number'" >&2; exit 2 ;; esac
done
SHARDS=$((10#$SHARDS))
if [ "$SHARDS" -lt 1 ]; then echo "scripts/gpu_check.sh: GPU_CHECK_SHARDS must be at least 1, got '$GPU_CHECK_SHARDS'" >&2; exit 2; fi
CHECK_STEPS="test_cuda test_cuda_graph bench_cuda test_cuda_train bench_mnist_cuda memcheck racecheck fuzz_cuda
  fuzz_mlp_cuda test_cpu_on_cuda_build profile_cuda"
set -f  # the names are words, never file patterns
GPU_CHECK_ONLY="$(echo ${GPU_CHECK_ONLY:-})"  # words only: blank means every step
for name in $GPU_CHECK_ONLY; do
  if [ "$name" = test_cpu_on_cuda_build ] && [ "$MODE" != "--full" ]; then
    echo "scripts/gpu_check.sh: GPU_CHECK_ONLY names test_cpu_on_cuda_build, a step of --full only" >&2; exit 2
  fi
  case " $(echo $CHECK_STEPS) " in *" $name "*) ;; *)
    echo "scripts/gpu_check.sh: GPU_CHECK_ONLY names no step $name (steps: $(echo $CHECK_STEPS))" >&2; exit 2 ;;
  esac
done
set +f
wanted() {  # wanted STEP...: whether GPU_CHECK_ONLY (if set) asks for any of them
  [ -z "${GPU_CHECK_ONLY:-}" ] && return 0
  local name; for name in "$@"; do case " $GPU_CHECK_ONLY " in *" $name "*) return 0 ;; esac; done
  return 1
}
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # folders named from where it was called
[ -z "${PYFASTNN_MNIST:-}" ] || export PYFASTNN_MNIST="$(absolute "$PYFASTNN_MNIST")"
[ -z "${GPU_CHECK_WHEELS:-}" ] || GPU_CHECK_WHEELS="$(absolute "$GPU_CHECK_WHEELS")"
cd "$ROOT"
export PYFASTNN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CI=1  # tests that need MNIST fail instead of skipping when it is missing
export PIP_BREAK_SYSTEM_PACKAGES=1  # a system Python (PEP 668) would refuse the installs; no effect in a venv
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
# -v: every test's name is in the log as it finishes, so a step stopped by its time limit still
# says which tests passed and failed.
# xunit1: the junit XML keeps the figures tests record (record_property) without a warning per test.
PYTEST=("$PYTHON" -m pytest -v -p no:cacheprovider --maxfail=30 -o faulthandler_timeout=120 -o junit_family=xunit1 -rfE)
status=0
: > "$OUT/summary.txt"

note() {  # note NAME TEXT: a summary line for a step that did not run
  echo "[gpu_check] $1: $2" | tee -a "$OUT/summary.txt"
  status=1
}

digest() {  # digest LOG: what a failed step's log says failed, indented under its summary line
  local failed
  # pytest's short summary (-rfE); a step stopped by its time limit has none, but -v named each test
  failed="$(grep -aE '^(FAILED|ERROR) ' "$1" | head -n 20)"
  [ -n "$failed" ] || failed="$(grep -aE '::.+ (FAILED|ERROR)( +\[ *[0-9]+%\])?$' "$1" | head -n 20)"
  {
    echo "$failed"
    grep -am 3 -E 'Assertion .* failed|left the CUDA context broken' "$1"  # a device-side assert
    grep -aE '^========= +[^ =]' "$1" | grep -vE 'COMPUTE-SANITIZER|^========= +(ERROR|RACECHECK|LEAK) SUMMARY' \
      | head -n 30                                                     # compute-sanitizer's reports
    grep -am 5 -E '^E  |Error|error:|Traceback' "$1"                   # the first error lines
  } | tr -d '\000\r' | grep -v '^$' | awk '!seen[$0]++' | head -n 40 | cut -c1-300 | sed 's/^/    /'
}

figures() {  # figures NAME: a benchmark's printed figures, or the properties a test step's tests recorded
  local lines
  if [ "${1#bench_}" != "$1" ]; then  # (a failure's traceback is the digest's)
    lines="$(tr -d '\000\r' < "$OUT/$1.log" | grep -vE 'Warning|warnings\.warn|^ |^wrote |^$|^Traceback|Error')"
  elif [ "${1#fuzz_}" != "$1" ]; then  # its count: how many cases ran (a --seconds stop says so)
    lines="$(grep -a ' cases on ' "$OUT/$1.log" | tail -n 1)"
  elif [ -f "$OUT/$1.xml" ]; then
    lines="$(grep -ao '<property name="[^"]*" value="[^"]*"' "$OUT/$1.xml" \
      | sed -E 's/<property name="([^"]*)" value="([^"]*)"/\1 = \2/; s/&quot;/"/g; s/&lt;/</g; s/&gt;/>/g; s/&amp;/\&/g')"
  fi
  [ -n "${lines:-}" ] || return 0
  echo "$lines" | head -n 120 | cut -c1-300 | sed 's/^/    /'
  local count; count="$(echo "$lines" | wc -l)"
  [ "$count" -le 120 ] || echo "    ... $((count - 120)) more lines in $1.log"
}

finish() {  # the summary's last line, the whole summary printed, the logs packed, then the exit status
  trap - TERM INT
  echo "[gpu_check] done in $SECONDS s, status $status; logs in $OUT" >> "$OUT/summary.txt"
  echo "==================== summary.txt"
  cat "$OUT/summary.txt"
  local logs; logs="$(cd "$OUT" && ls -- *.log *.xml 2>/dev/null)"
  # shellcheck disable=SC2086 # file names of steps: words
  local archive=logs.tar.gz n=1
  while [ -e "$OUT/$archive" ]; do n=$((n + 1)); archive="logs-$n.tar.gz"; done  # a rerun's beside the first's
  [ -z "$logs" ] || (cd "$OUT" && tar -czf "$archive" $logs && rm -f $logs)
  exit $status
}
# The steps launched and not yet reported (LAUNCHED, in launch order), their start times and limits;
# of those still running, the pid (STEP_PIDS); of those ended, the rc and end time.
declare -A STEP_PIDS=() STEP_STARTS=() STEP_LIMITS=() STEP_RCS=() STEP_ENDS=()
LAUNCHED=()
# A signal stops the steps running, then reports every step launched (those that had ended with
# their own results), so that the summary keeps what was found.
trap 'trap "" TERM INT
      for pid in "${STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
      report_launched; echo "[gpu_check] stopped by a signal" >> "$OUT/summary.txt"; status=1; finish' TERM INT

launch() {  # launch NAME LIMIT_S COMMAND...: starts a step in the background within the budget left
  local name="$1" limit="$2"; shift 2
  case " $(echo $CHECK_STEPS) " in *" ${name%%.*} "*)  # (a shard, test_cuda.2, is its step's)
    if ! wanted "${name%%.*}"; then echo "[gpu_check] $name: skipped (not in GPU_CHECK_ONLY)" | tee -a "$OUT/summary.txt"; return 0; fi ;;
  esac
  local left=$((BUDGET - SECONDS - 10))  # 10 s: timeout's grace before it kills
  if [ "$left" -lt 20 ] || [ $((left * 3)) -lt "$limit" ]; then  # cut to a fraction, it would time out
    note "$name" "NOT RUN (${left} s of the $BUDGET s budget left, for a step of up to $limit s)"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "[gpu_check] $name (limit $limit s)"
  rm -f "$OUT/$name.xml"  # pytest writes it only at the end: a step stopped before must not show an older one
  STEP_STARTS[$name]=$SECONDS STEP_LIMITS[$name]=$limit
  # In the background and waited for, so that a signal reaches the trap (which stops the step) at once.
  GPU_CHECK_STEP_LIMIT="$limit" timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
  STEP_PIDS[$name]=$!
  LAUNCHED+=("$name")
}

reap() {  # reap NAME: waits for a launched step to end; notes its rc and end time
  local name="$1"
  wait "${STEP_PIDS[$name]}"
  STEP_RCS[$name]=$? STEP_ENDS[$name]=$SECONDS
  unset "STEP_PIDS[$name]"
}

report() {  # report NAME: an ended step's summary lines (rc, time, what failed, its figures); returns its rc
  local name="$1"
  local rc="${STEP_RCS[$name]}" limit="${STEP_LIMITS[$name]}"
  local line="$name: rc=$rc in $((STEP_ENDS[$name] - STEP_STARTS[$name])) s"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then line="$line (timed out after $limit s)"; fi
  echo "[gpu_check] $line" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    digest "$OUT/$name.log" >> "$OUT/summary.txt"
    status=1
  fi
  figures "$name" >> "$OUT/summary.txt"
  return "$rc"
}

report_launched() {  # waits for every launched step, then reports each in the order they were launched
  local name rc=0
  while [ "${#STEP_PIDS[@]}" -gt 0 ]; do  # each reaped once ended (looked at twice a second), for its own time
    for name in "${!STEP_PIDS[@]}"; do kill -0 "${STEP_PIDS[$name]}" 2>/dev/null || reap "$name"; done
    [ "${#STEP_PIDS[@]}" -eq 0 ] || sleep 0.5
  done
  for name in "${LAUNCHED[@]}"; do report "$name" || rc=1; done
  LAUNCHED=()
  return $rc
}

step() {  # step NAME LIMIT_S COMMAND...: runs a step alone within the budget left, logs, records rc and time
  launch "$@" || return $?
  [ -z "${STEP_PIDS[$1]:-}" ] || { reap "$1"; report_launched; }
}

{
  nvidia-smi
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$PYTHON" -c "import runpy; m = runpy.run_path('pyfastnn/extras.py')['missing_lesson_requirements'](); print('lesson extra missing:', m or 'nothing')"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" || echo "no triton: torch.compile tests fail"
  "$SANITIZER" --version | tail -n 1
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 2
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "$PYTHON" -m pytest --version || echo "no pytest"
  "$PYTHON" -m ninja --version 2>/dev/null || ninja --version || echo "no ninja"
  echo "PYFASTNN_MNIST=${PYFASTNN_MNIST:-unset}"
  # either forces TF32 under torch's flags: float32 tests and the fuzzer would then see TF32 rounding
  echo "NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-unset} TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=${TORCH_ALLOW_TF32_CUBLAS_OVERRIDE:-unset}"
} > "$OUT/env.log" 2>&1
# torch runs `ninja` from PATH: the environment's scripts folder (where its wheel puts it) may not be on it
SCRIPTS_DIR="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"
[ -n "$SCRIPTS_DIR" ] && PATH="$PATH:$SCRIPTS_DIR"
have_ninja() { "$PYTHON" -c "import torch.utils.cpp_extension as c; c.verify_ninja_availability()" 2>/dev/null; }
have_pytest() { "$PYTHON" -c "import pytest" 2>/dev/null; }
need_pytest() { wanted test_cuda test_cuda_graph test_cuda_train memcheck racecheck test_cpu_on_cuda_build; }
TOOLS_MISSING="$(have_ninja || echo ninja) $( (! need_pytest || have_pytest) || echo pytest)"
if [ -n "$(echo $TOOLS_MISSING)" ] && [ -d "${GPU_CHECK_WHEELS:-}" ]; then
  # shellcheck disable=SC2086 # one package name per word
  step tools 60 "$PYTHON" -m pip install --no-index --find-links "$GPU_CHECK_WHEELS" $TOOLS_MISSING
fi
if ! have_ninja; then
  note build "NOT RUN: no ninja, so torch would compile the sources one at a time (about a quarter of an hour); pip install ninja, or give its wheel in GPU_CHECK_WHEELS"
  finish
fi
if need_pytest && ! have_pytest; then
  note tests "NOT RUN: no pytest; pip install pytest, or give its wheels in GPU_CHECK_WHEELS"
  finish
fi
cuda_build_in_place() { "$PYTHON" -c "import sys, pyfastnn; sys.exit(not pyfastnn.info()['backends']['cuda'])" 2>/dev/null; }
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ] && cuda_build_in_place; then
  echo "[gpu_check] build: skipped (GPU_CHECK_SKIP_BUILD: the CUDA build in place)" | tee -a "$OUT/summary.txt"
else
  step build 240 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || finish
fi
if ! "$PYTHON" -c "import pyfastnn; print(pyfastnn.info())" >> "$OUT/env.log" 2>&1; then
  note cuda "pyfastnn does not import: $(tail -n 1 "$OUT/env.log" | cut -c1-300)"
  finish
fi
if ! "$PYTHON" -c "import sys, torch, pyfastnn; sys.exit(not (torch.cuda.is_available() and pyfastnn.info()['backends']['cuda']))"; then
  note cuda "torch sees no GPU or pyfastnn was built without CUDA (env.log): every GPU test would be skipped"
  finish
fi

# Sanitizers check pyfastnn's kernels only (kernel names hold "pyfastnn"; cuBLAS's and ATen's are
# torch's business and their Hopper kernels give racecheck false positives). memcheck runs without
# the caching allocator, which would otherwise hide out-of-bounds accesses inside its blocks; that
# rules out graph capture, so neither selection captures a graph.
MEMCHECK_TESTS='(misaligned and relu and float32) or (gradients_use_the_same_mask and float32 and relu) or (statistics and 999) or (large_buffer and 65537) or (relu_bit_mask and 200 and dropout0.25 and cublaslt) or (relu_bit_mask and torch.float16 and 203 and dropout0.0)'
# racecheck looks only at shared memory, which of pyfastnn's kernels only the bias sums use (the
# fallback path's backward, and a hidden layer's bias gradient under frozen weights on the cuBLASLt
# path), in every dtype. In the first H200 run it reported one hazard, not located, and 13 of its
# 16 tests failed: as many as came, in collection order, from the first half-precision test on
# (a forward with opcheck). This selection reaches the bias sums in float32 on both paths first,
# then in float16 on the fallback path (no opcheck, no profiler anywhere; pytest runs them in file
# order, so no float32 test may come after a float16 one), so that a hazard of that dtype shows
# with its report instead of hiding the float32 results. Dropout changes only what the sums read
# from global memory, not their shared memory, so no dropout test is needed here.
RACECHECK_TESTS='(misaligned and relu and float32) or (stack_on_both_paths and not relu_epilogue and (float32 or (torch.float16 and fallback and identity)))'
# Whether the sanitizers run: decided (and compute-sanitizer probed) before any step is launched.
SANITIZERS=no
if ! wanted memcheck racecheck; then
  SANITIZERS=skipped
elif [ ! -x "$SANITIZER" ]; then
  note sanitizers "NOT RUN: compute-sanitizer not found ($SANITIZER)"
elif [ $((BUDGET - SECONDS)) -lt 120 ]; then  # the probe's minute and one sanitizer step at least
  note sanitizers "NOT RUN (under 120 s of the $BUDGET s budget left)"
elif ! timeout 60 "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 1 "$PYTHON" -c \
    "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" > "$OUT/sanitizer_probe.log" 2>&1; then
  note sanitizers "NOT RUN: compute-sanitizer cannot run on this device (sanitizer_probe.log)"
else
  SANITIZERS=yes
fi

# 45 s per thousand cases (at least 45 s); the fuzzer stops 15 s before, to print its count. Not in
# --full, the acceptance run: there every case must run, and a step stopped by its limit fails.
FUZZ_LIMIT=$(( FUZZ_CASES * 45 / 1000 > 45 ? FUZZ_CASES * 45 / 1000 : 45 ))
fuzz() {  # the step's limit, as the budget left it (GPU_CHECK_STEP_LIMIT), less 15 s for the count
  local stop=(--seconds $((GPU_CHECK_STEP_LIMIT - 15)))
  [ "$MODE" != "--full" ] || stop=()
  "$PYTHON" scripts/fuzz_fused_linear.py --device cuda --cases "$FUZZ_CASES" "${stop[@]}" "$@"
}
export -f fuzz; export PYTHON FUZZ_CASES MODE

# The steps that only check (tests, sanitizers, fuzzing) run side by side on the one GPU where it is
# shared (compute mode Default, which nvidia-smi reports), test_cuda.py's ~1,100 small tests in
# GPU_CHECK_SHARDS pytest processes (default 4; tests/conftest.py's --shard) beside the others: they
# are bound by Python and launches, not by the GPU. Side by side, each step's limit is doubled (they
# share the CPUs and the GPU; the shards' limit bounds the phase anyway) and each process has its
# share of the CPUs as torch's thread count. The steps whose figures are timed (the training test's
# 5-epoch run, the benchmarks) then run alone. Elsewhere, or with GPU_CHECK_SIDE_BY_SIDE=0, every
# step runs alone, in an order that lets a run cut short say the most: the tests, the timed steps,
# then the sanitizers and the fuzzers.
if [ "${GPU_CHECK_SIDE_BY_SIDE:-1}" = 1 ] &&
    [ "$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -n 1)" = Default ]; then
  SIDE_BY_SIDE=1
  THREADS_EACH=$(( $(nproc) / (SHARDS + 5) > 1 ? $(nproc) / (SHARDS + 5) : 1 ))  # the shards + 5 other checks
  together() { local name="$1" limit="$2"; shift 2; OMP_NUM_THREADS="$THREADS_EACH" launch "$name" $((limit * 2)) "$@"; }
  echo "[gpu_check] side by side: test_cuda in $SHARDS processes, test_cuda_graph, the sanitizers and the fuzzers" \
    | tee -a "$OUT/summary.txt"
else
  SIDE_BY_SIDE=0 SHARDS=1
  together() { step "$@"; }
fi

checks() {  # the sanitizers and the fuzzers
  if [ "$SANITIZERS" = skipped ]; then
    step memcheck 0 true; step racecheck 0 true  # listed as skipped
  elif [ "$SANITIZERS" = yes ]; then
    together memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --kernel-name kns=pyfastnn \
      --report-api-errors no --error-exitcode 1 "${PYTEST[@]}" tests/library/test_cuda.py -k "$MEMCHECK_TESTS"
    together racecheck 90 "$SANITIZER" --tool racecheck --kernel-name kns=pyfastnn --report-api-errors no \
      --error-exitcode 1 "${PYTEST[@]}" tests/library/test_cuda.py -k "$RACECHECK_TESTS"
  fi
  together fuzz_cuda "$FUZZ_LIMIT" bash -c fuzz
  together fuzz_mlp_cuda "$FUZZ_LIMIT" bash -c 'fuzz --mlp'
}

if [ "$SHARDS" = 1 ]; then
  together test_cuda 240 "${PYTEST[@]}" tests/library/test_cuda.py --junitxml="$OUT/test_cuda.xml"
else
  for shard in $(seq 1 "$SHARDS"); do
    OMP_NUM_THREADS="$THREADS_EACH" launch "test_cuda.$shard" 240 "${PYTEST[@]}" tests/library/test_cuda.py \
      --shard="$((shard - 1))/$SHARDS" --junitxml="$OUT/test_cuda.$shard.xml"
  done
fi
together test_cuda_graph 60 "${PYTEST[@]}" tests/library/test_cuda_graph.py pyfastnn/cuda_graph.py \
  --junitxml="$OUT/test_cuda_graph.xml"
[ "$SIDE_BY_SIDE" = 0 ] || { checks; report_launched; }

# Alone on the GPU from here: the training tests (the 5-epoch run is timed), then the benchmarks.
lesson_missing() { "$PYTHON" -c "from pyfastnn.extras import missing_lesson_requirements as m; print(' '.join(m()))"; }
LESSON_MISSING="$(lesson_missing)"
# Where the tests read MNIST (tests/conftest.py's mnist_dir): the IDX files directly in that folder.
MNIST_FILES="${PYFASTNN_MNIST:-$ROOT/../shared/data/mnist}"
if [ -n "$LESSON_MISSING" ] && [ -d "${GPU_CHECK_WHEELS:-}" ] && wanted test_cuda_train bench_mnist_cuda; then
  # shellcheck disable=SC2086 # one package name per word
  step lesson_extra 60 "$PYTHON" -m pip install --no-index --find-links "$GPU_CHECK_WHEELS" $LESSON_MISSING
  LESSON_MISSING="$(lesson_missing)"
fi
if ! wanted test_cuda_train; then
  step test_cuda_train 0 true  # listed as skipped
elif [ -n "$LESSON_MISSING" ]; then
  note test_cuda_train "NOT RUN: the lesson extra lacks $LESSON_MISSING"
elif [ ! -e "$MNIST_FILES/t10k-images-idx3-ubyte.gz" ] && [ ! -e "$MNIST_FILES/t10k-images-idx3-ubyte" ]; then
  # cuda_graph_step's GPU tests need no MNIST: they run; the training tests skip (CI unset), noted.
  CI= step test_cuda_train 150 "${PYTEST[@]}" tests/lesson/test_cuda_train.py -k "not bench_mnist_cuda_quick" \
    --junitxml="$OUT/test_cuda_train.xml"
  note test_cuda_train_mnist \
    "NOT RUN: no t10k-images-idx3-ubyte[.gz] in $MNIST_FILES (set PYFASTNN_MNIST to the folder of the IDX files)"
else
  # (its bench_mnist test runs as the bench_mnist_cuda step below, with the figures kept)
  step test_cuda_train 150 "${PYTEST[@]}" tests/lesson/test_cuda_train.py -k "not bench_mnist_cuda_quick" \
    --junitxml="$OUT/test_cuda_train.xml"
fi
step bench_cuda "$BENCH_CUDA_LIMIT" "$PYTHON" benchmarks/bench_cuda.py ${BENCH_CUDA_SIZE[@]+"${BENCH_CUDA_SIZE[@]}"} --min-run-time 0.05 \
  --json "$OUT/bench_cuda.json"
if [ -z "$LESSON_MISSING" ] || ! wanted bench_mnist_cuda; then
  step bench_mnist_cuda 60 "$PYTHON" benchmarks/bench_mnist.py --device cuda --quick --json "$OUT/bench_mnist_cuda.json"
else
  note bench_mnist_cuda "NOT RUN: the lesson extra lacks $LESSON_MISSING"
fi

[ "$SIDE_BY_SIDE" = 1 ] || checks

if [ "$MODE" = "--full" ]; then
  step test_cpu_on_cuda_build 600 "${PYTEST[@]}" tests --ignore=tests/library/test_cuda.py \
    --ignore=tests/lesson/test_cuda_train.py
fi
if [ "$MODE" = "--full" ] || [ -n "${GPU_CHECK_ONLY:-}" ]; then
  # (the lesson's step needs the lesson extra: $3 lists what it lacks)
  step profile_cuda 60 bash -c '"$1" benchmarks/bench_cuda.py --profile --json "$2/profile_cuda.json" && { [ -n "$3" ] ||
    "$1" benchmarks/bench_mnist.py --device cuda --profile --json "$2/profile_mnist_cuda.json"; }' \
    profile_cuda "$PYTHON" "$OUT" "$LESSON_MISSING"
else
  echo "[gpu_check] profile_cuda: skipped (a diagnosis: --full, or GPU_CHECK_ONLY=profile_cuda)" | tee -a "$OUT/summary.txt"
fi
finish
