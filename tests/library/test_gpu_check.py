"""scripts/gpu_check.sh, the one-run GPU check, kept in step with the tree it checks. It runs only where
a GPU is, so here every file and test selection it names is checked to exist, and its exits that need
no GPU are run with a stand-in Python: a refused mode, a failed build, a machine without a GPU."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def run_script(out: Path, *args: str, python: Optional[Path] = None, **env: str) -> subprocess.CompletedProcess:
    # One step at a time unless a test asks otherwise: on a machine whose GPU is shared, the script
    # would otherwise run its checks side by side (test_the_checks_run_side_by_side_...).
    env = {**os.environ, "GPU_CHECK_SIDE_BY_SIDE": "0", **env, **({"PYTHON": str(python)} if python else {})}
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=120, env=env)


def mnist_stand_in(folder: Path) -> str:
    """A folder the script takes for MNIST (it looks for the test images; the stand-ins read nothing)."""
    (folder / "mnist").mkdir(exist_ok=True)
    (folder / "mnist" / "t10k-images-idx3-ubyte.gz").touch()
    return str(folder / "mnist")


def stand_in_python(folder: Path, body: str) -> Path:
    """An executable called in place of Python: `body` is shell code that sees the arguments in $*."""
    path = folder / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_every_file_it_names_exists():
    named = set(re.findall(r"\b((?:tests|scripts|benchmarks|pyfastnn)/[\w/.-]+\.(?:py|sh))", TEXT))
    assert len(named) >= 8, named
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


def _selected_tests(variable):
    """The ids of test_cuda.py's tests that gpu_check.sh's -k selection ``variable`` collects."""
    selection = re.search(rf"{variable}='([^']+)'", TEXT).group(1)
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/library/test_cuda.py", "--collect-only", "-q",
                             "-p", "no:cacheprovider", "-k", selection],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in result.stdout.splitlines() if "::" in line], result


def test_the_memcheck_selection_reaches_every_kernel_and_captures_no_graph():
    ids, result = _selected_tests("MEMCHECK_TESTS")
    # Vectorized and one-element passes, both GEMM paths, dropout forward and backward, the bias-sum
    # kernel (fallback path), the relu pass that writes the bit mask (with dropout, every dtype) and
    # the relu mask packer.
    assert {i.split("::")[1].split("[")[0] for i in ids} == {
        "test_misaligned_views_and_transposed_operands", "test_cuda_dropout_gradients_use_the_same_mask",
        "test_cuda_dropout_statistics_match_nn_dropout", "test_large_buffer_vectorized_and_one_element_paths",
        "test_relu_bit_mask_layout_and_fake"}, result.stdout
    assert any("fallback" in i for i in ids) and any("cublaslt" in i for i in ids)
    masks = [i for i in ids if "relu_bit_mask" in i]
    dtypes = ("float32", "float16", "bfloat16")
    assert all(any(f"torch.{dtype}-200-dropout0.25" in i for i in masks) for dtype in dtypes), masks
    assert any("-203-" in i for i in masks), masks
    # memcheck runs without the caching allocator, which graph capture needs.
    assert not [i for i in ids if "captur" in i or "graph" in i]


def test_the_racecheck_selection_reaches_the_shared_memory_kernel_in_float32_then_float16():
    ids, result = _selected_tests("RACECHECK_TESTS")
    # The bias sums (pyfastnn's one kernel with shared memory) run on the fallback path's backward and,
    # under frozen weights, for the hidden layers on the cuBLASLt path (the stack test's last part).
    assert any("fallback" in i for i in ids) and any("stack_on_both_paths[cublaslt" in i for i in ids), result.stdout
    # float32 on both paths; half precision on the fallback path only, after every float32 test
    # (pytest runs them in collection order), and no test that runs opcheck or the profiler.
    dtypes = [next(d for d in ("float32", "bfloat16", "float16") if d in i) for i in ids]
    assert set(dtypes) == {"float32", "float16"}, ids
    half = [i for i, d in zip(ids, dtypes) if d == "float16"]
    assert all("fallback" in i and "stack_on_both_paths" in i for i in half), half
    assert dtypes == sorted(dtypes, key=("float32", "float16").index), ids
    names = {i.split("::")[1].split("[")[0] for i in ids}
    test_source = (ROOT / "tests/library/test_cuda.py").read_text()
    for name in names:
        body = test_source.split(f"def {name}(")[1].split("\ndef ")[0]
        assert "opcheck" not in body and "cuda_kernels" not in body, name
    assert len(ids) <= 16, ids  # racecheck has 90 s


def test_an_unknown_mode_is_refused(tmp_path):
    result = run_script(tmp_path, "--quick")
    assert result.returncode == 2 and "unknown: --quick" in result.stderr


TOOLS_PRESENT = 'case "$*" in *verify_ninja_availability*|*"import pytest"*) exit 0 ;; esac\n'


def test_a_failed_build_stops_with_the_summary_and_status(tmp_path):
    result = run_script(tmp_path / "out", python=stand_in_python(tmp_path, TOOLS_PRESENT + "exit 1"))
    assert result.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("[gpu_check] build: rc=1"), summary
    assert re.fullmatch(r"\[gpu_check\] done in \d+ s, status 1; logs in .*", summary[-1]), summary


def test_the_output_folder_holds_the_summary_the_json_and_one_archive_of_the_logs(tmp_path):
    import tarfile

    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="bench_cuda")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.txt"], result.stdout
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert {"env.log", "build.log", "bench_cuda.log"} <= set(archive.getnames())
    summary = (out / "summary.txt").read_text()
    assert result.stdout.endswith("==================== summary.txt\n" + summary)  # printed whole at the end
    run_script(out, python=python, GPU_CHECK_ONLY="bench_cuda")  # a rerun keeps the first run's logs
    assert sorted(p.name for p in out.iterdir()) == ["logs-2.tar.gz", "logs.tar.gz", "summary.txt"]


def test_a_rerun_can_use_the_build_in_place_and_skips_steps_the_budget_cannot_hold(tmp_path):
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, f'echo "$*" >> {log}\n'
                             'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    # The budget leaves about 30 s: a step of up to 240 s (test_cuda) is not started, one of 60 s is.
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_SKIP_BUILD="1", GPU_CHECK_BUDGET_S="40",
                        GPU_CHECK_ONLY="test_cuda bench_cuda")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "build: skipped (GPU_CHECK_SKIP_BUILD: the CUDA build in place)" in summary and "pip install" not in \
        log.read_text()
    assert re.search(r"test_cuda: NOT RUN \(\d+ s of the 40 s budget left, for a step of up to 240 s\)", summary), summary
    assert "bench_cuda: rc=0" in summary and result.returncode == 1
    run_script(tmp_path / "out2", python=python, GPU_CHECK_SKIP_BUILD="0", GPU_CHECK_ONLY="bench_cuda")
    assert "pip install" in log.read_text()  # only 1 skips the build


def test_relative_data_folders_are_taken_from_where_it_was_called(tmp_path):
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, f'echo "MNIST=$PYFASTNN_MNIST $*" >> {log}\n'
                             'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    mnist_stand_in(tmp_path)
    result = subprocess.run(["bash", str(SCRIPT), "out"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHON": str(python), "PYFASTNN_MNIST": "mnist",
                                 "GPU_CHECK_ONLY": "test_cuda_train", "GPU_CHECK_SIDE_BY_SIDE": "0"})
    assert f"MNIST={tmp_path / 'mnist'} " in log.read_text() and "test_cuda_train: rc=0" in result.stdout


def test_mnist_is_looked_for_where_the_tests_read_it(tmp_path):
    # The tests' mnist_dir fixture reads the IDX files directly in $PYFASTNN_MNIST, so a folder the
    # lesson's loader would also take (torchvision's MNIST/raw layout) is noted, not handed to tests that
    # would fail under CI=1; the training tests that need no MNIST still run, with CI unset.
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, f'echo "CI=$CI $*" >> {log}\n'
                             'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    nested = tmp_path / "data" / "MNIST" / "raw"
    nested.mkdir(parents=True)
    (nested / "t10k-images-idx3-ubyte.gz").touch()
    result = run_script(tmp_path / "out", python=python, PYFASTNN_MNIST=str(tmp_path / "data"),
                        GPU_CHECK_ONLY="test_cuda_train")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "test_cuda_train: rc=0" in summary and result.returncode == 1, summary
    assert f"test_cuda_train_mnist: NOT RUN: no t10k-images-idx3-ubyte[.gz] in {tmp_path / 'data'} " in summary
    assert [line for line in log.read_text().splitlines() if "test_cuda_train.py" in line][0].startswith("CI= ")
    # The folder of the files themselves: the tests run under CI=1.
    result = run_script(tmp_path / "out2", python=python, PYFASTNN_MNIST=str(nested), GPU_CHECK_ONLY="test_cuda_train")
    assert result.returncode == 0 and "NOT RUN" not in (tmp_path / "out2" / "summary.txt").read_text()
    assert [line for line in log.read_text().splitlines() if "test_cuda_train.py" in line][-1].startswith("CI=1 ")


def test_without_a_gpu_it_fails_instead_of_skipping_every_test(tmp_path):
    # pip succeeds; the check that torch sees a GPU and pyfastnn has CUDA fails, as on a CPU machine.
    python = stand_in_python(tmp_path, 'case "$*" in *torch.cuda.is_available*) exit 1 ;; esac\nexit 0')
    result = run_script(tmp_path / "out", python=python)
    assert result.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "build: rc=0" in summary and "torch sees no GPU" in summary, summary
    assert "test_cuda" not in summary and summary.splitlines()[-1].startswith("[gpu_check] done in")


def test_without_ninja_it_stops_before_the_build(tmp_path):
    # torch would compile the sources one at a time, far past the budget: say so and stop at once.
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, f'echo "$*" >> {log}\ncase "$*" in *verify_ninja_availability*) exit 1 ;; esac\nexit 0')
    result = run_script(tmp_path / "out", python=python)
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("[gpu_check] build: NOT RUN: no ninja") and len(summary) == 2, summary
    assert result.returncode == 1 and "pip install" not in log.read_text()


def test_pytest_is_needed_only_by_the_steps_that_run_tests(tmp_path):
    python = stand_in_python(tmp_path, 'case "$*" in *"import pytest"*) exit 1 ;; esac\nexit 0')
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="bench_cuda fuzz_cuda")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "build: rc=0" in summary and "bench_cuda: rc=0" in summary and result.returncode == 0, summary
    result = run_script(tmp_path / "out2", python=python, GPU_CHECK_ONLY="test_cuda")
    summary = (tmp_path / "out2" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("[gpu_check] tests: NOT RUN: no pytest") and result.returncode == 1, summary


def test_missing_ninja_and_pytest_come_from_the_wheels_and_the_run_passes(tmp_path):
    # Both missing until the wheels are installed; every other step (stand-ins for Python and
    # compute-sanitizer) passes, so the run passes.
    log, installed = tmp_path / "calls.log", tmp_path / "installed"
    python = stand_in_python(tmp_path, f'echo "$*" >> {log}\ncase "$*" in\n'
                             f'  *"--no-index"*) touch {installed} ;;\n'
                             f'  *verify_ninja_availability*|*"import pytest"*) [ -f {installed} ] || exit 1 ;;\n'
                             f'esac\nexit 0')
    (tmp_path / "bin").mkdir()
    stand_in_python(tmp_path / "bin", "exit 0").rename(tmp_path / "bin" / "compute-sanitizer")
    (tmp_path / "wheels").mkdir()
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_WHEELS=str(tmp_path / "wheels"),
                        PYFASTNN_MNIST=mnist_stand_in(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("[gpu_check] tools: rc=0") and summary[1].startswith("[gpu_check] build: rc=0"), summary
    assert [line for line in log.read_text().splitlines() if "--no-index" in line][0].endswith("ninja pytest")
    steps = summary[1:-2]  # build, the tests, benchmarks, sanitizers, fuzzing: all passed
    assert all(": rc=0 in " in line for line in steps) and len(steps) == 10, summary
    assert summary[-2] == "[gpu_check] profile_cuda: skipped (a diagnosis: --full, or GPU_CHECK_ONLY=profile_cuda)"
    assert ", status 0;" in summary[-1] and result.returncode == 0, summary


def test_only_the_steps_asked_for_run_after_the_build(tmp_path):
    # A rerun that finishes what a run cut short left NOT RUN: the build, then only those steps.
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    (tmp_path / "bin").mkdir()
    stand_in_python(tmp_path / "bin", "exit 0").rename(tmp_path / "bin" / "compute-sanitizer")
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="memcheck fuzz_mlp_cuda",
                        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    def steps(outcome: str):
        return [line.split()[1].rstrip(":") for line in summary if outcome in line]

    ran, skipped = steps(": rc=0 in "), steps(": skipped (not in GPU_CHECK_ONLY)")
    assert ran == ["build", "memcheck", "fuzz_mlp_cuda"], summary
    assert skipped == ["test_cuda", "test_cuda_graph", "test_cuda_train", "bench_cuda", "bench_mnist_cuda",
                       "racecheck", "fuzz_cuda", "profile_cuda"], summary
    assert ", status 0;" in summary[-1] and result.returncode == 0, summary


def test_an_unknown_step_asked_for_is_refused(tmp_path):
    result = run_script(tmp_path / "out", GPU_CHECK_ONLY="memcheck fuzz")
    assert result.returncode == 2 and "GPU_CHECK_ONLY names no step fuzz" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_step_of_the_full_run_only_is_refused_without_full_and_blank_means_every_step(tmp_path):
    result = run_script(tmp_path / "out", GPU_CHECK_ONLY="test_cpu_on_cuda_build")
    assert result.returncode == 2 and "a step of --full only" in result.stderr
    # Blank is no selection: every step runs (stand-ins for Python and compute-sanitizer pass them all).
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*) exit 0 ;; esac\nexit 0')
    (tmp_path / "bin").mkdir()
    stand_in_python(tmp_path / "bin", "exit 0").rename(tmp_path / "bin" / "compute-sanitizer")
    result = run_script(tmp_path / "out2", python=python, GPU_CHECK_ONLY="   ", PYFASTNN_MNIST=mnist_stand_in(tmp_path),
                        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    summary = (tmp_path / "out2" / "summary.txt").read_text().splitlines()
    assert [line for line in summary[:-1] if ": rc=0 in " not in line] == [summary[-2]] and len(summary) == 12, summary
    assert summary[-2].startswith("[gpu_check] profile_cuda: skipped (a diagnosis"), summary
    assert result.returncode == 0


def test_the_default_run_fits_six_minutes_and_full_benchmarks_every_shape(tmp_path):
    # The default run is the quick check (bench_cuda --quick, a 360 s budget for everything: the steps
    # that only check side by side, then the timed ones alone); --full is the acceptance run (every
    # bench_cuda shape and dtype).
    assert re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-360\}"', TEXT)
    bench_arguments = {}
    for mode in ("", "--full"):
        log = tmp_path / f"calls{mode}.log"
        python = stand_in_python(tmp_path, f'echo "$*" >> {log}\nexit 0')
        run_script(tmp_path / f"out{mode}", *([mode] if mode else []), python=python, GPU_CHECK_ONLY="bench_cuda")
        calls = [line for line in log.read_text().splitlines() if "bench_cuda.py" in line]
        assert len(calls) == 1, calls
        bench_arguments[mode] = calls[0].split()
    assert "--quick" in bench_arguments[""] and "--quick" not in bench_arguments["--full"]
    order = re.findall(r'^\s*(?:CI= )?(?:step|together) "?(\w+)', TEXT, flags=re.M)
    checks = ("test_cuda", "test_cuda_graph", "memcheck", "racecheck", "fuzz_cuda", "fuzz_mlp_cuda")
    timed = ("test_cuda_train", "bench_cuda", "bench_mnist_cuda")
    assert max(order.index(name) for name in checks) < min(order.index(name) for name in timed), order
    assert order.index("racecheck") < order.index("fuzz_cuda")


def shared_gpu(folder: Path, mode: str = "Default") -> str:
    """A PATH with stand-ins for compute-sanitizer and nvidia-smi, which reports the GPU's compute mode."""
    (folder / "bin").mkdir(exist_ok=True)
    stand_in_python(folder / "bin", "exit 0").rename(folder / "bin" / "compute-sanitizer")
    nvidia_smi = stand_in_python(folder / "bin", f'case "$*" in *compute_mode*) echo {mode} ;; esac')
    nvidia_smi.rename(folder / "bin" / "nvidia-smi")
    return f"{folder / 'bin'}:{os.environ['PATH']}"


def test_the_checks_run_side_by_side_on_a_shared_gpu_and_the_timed_steps_alone(tmp_path):
    # Each check's stand-in takes 3 seconds (time enough for the script to launch the rest on a busy
    # machine), each timed step's 1 second: side by side, the ten checks (test_cuda in 4 shards) all start
    # before the first ends; each is reported in launch order once all have ended.
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*|*import*) exit 0 ;; esac\n'
                             f'echo "start $*" >> {log}; echo "threads=$OMP_NUM_THREADS $*" >> {log}.threads\n'
                             'case "$*" in *bench_*|*test_cuda_train*) sleep 1 ;; *) sleep 3 ;; esac\n'
                             f'echo "end $*" >> {log}')
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                            env={**environment, "PYTHON": str(python), "PYFASTNN_MNIST": mnist_stand_in(tmp_path),
                                 "PATH": shared_gpu(tmp_path), "GPU_CHECK_SIDE_BY_SIDE": "1"})
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    steps = [line.split()[1].rstrip(":") for line in summary if ": rc=0 in " in line]
    assert steps == ["build", "test_cuda.1", "test_cuda.2", "test_cuda.3", "test_cuda.4", "test_cuda_graph",
                     "memcheck", "racecheck", "fuzz_cuda", "fuzz_mlp_cuda", "test_cuda_train", "bench_cuda",
                     "bench_mnist_cuda"], summary
    assert "side by side: test_cuda in 4 processes" in summary[1] and result.returncode == 0, summary
    calls = log.read_text().splitlines()
    calls = calls[max(n for n, line in enumerate(calls) if "pip install" in line) + 1:]  # after the build
    shards = sorted(re.search(r"--shard=(\S+)", line).group(1) for line in calls if line.startswith("start")
                    and "test_cuda.py" in line and "-k" not in line)
    assert shards == ["0/4", "1/4", "2/4", "3/4"], calls
    # every check started before the first ended (the 4 shards, test_cuda_graph and the 2 fuzzers; the
    # sanitizers' stand-in runs no Python); the timed steps each after the one before had ended
    first_end = next(n for n, line in enumerate(calls) if line.startswith("end"))
    assert sum(line.startswith("start") for line in calls[:first_end]) == 7, calls
    timed = [n for n, line in enumerate(calls) if "test_cuda_train.py" in line or "bench_" in line]
    assert [calls[n].split()[0] for n in timed] == ["start", "end"] * 3, calls
    # side by side, each process takes its share of the CPUs as torch's threads; alone, torch's default
    threads = (tmp_path / "calls.log.threads").read_text().splitlines()
    share = max(1, len(os.sched_getaffinity(0)) // 9)  # (nproc's count) over 4 shards + 5 other checks
    assert all(line.startswith(f"threads={share} ") for line in threads if "test_cuda.py" in line), threads
    assert all(line.startswith("threads= ") for line in threads if "bench_" in line), threads


@pytest.mark.parametrize("setting", [{"mode": "Exclusive_Process"}, {"GPU_CHECK_SIDE_BY_SIDE": "0"}])
def test_one_step_at_a_time_where_the_gpu_is_not_shared_or_when_asked(tmp_path, setting):
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*|*import*) exit 0 ;; esac\n'
                             f'echo "start $*" >> {log}; echo "end $*" >> {log}')
    env = {"GPU_CHECK_SIDE_BY_SIDE": "1", **{key: value for key, value in setting.items() if key != "mode"}}
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="test_cuda memcheck",
                        PATH=shared_gpu(tmp_path, setting.get("mode", "Default")), **env)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "side by side" not in summary and "test_cuda: rc=0" in summary and result.returncode == 0, summary
    calls = log.read_text().splitlines()
    assert all(calls[n].startswith("start") and calls[n + 1].startswith("end") for n in range(0, len(calls), 2))
    assert not [line for line in calls if "--shard" in line], calls


def test_side_by_side_each_step_reports_its_own_time_and_rc(tmp_path):
    # Reported in launch order once all have ended, each with the time it took and its own status.
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*|*import*) exit 0 ;; esac\n'
                             'case "$*" in *--shard=0/2*) sleep 4; exit 1 ;; *--shard=1/2*) exit 0 ;; esac\nexit 0')
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="test_cuda", GPU_CHECK_SHARDS="2",
                        PATH=shared_gpu(tmp_path), GPU_CHECK_SIDE_BY_SIDE="1")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    first, second = (re.search(rf"test_cuda\.{n}: rc=(\d+) in (\d+) s", summary).groups() for n in (1, 2))
    # (bash's SECONDS counts the clock's whole seconds: a step of a few milliseconds may span one)
    assert first[0] == "1" and int(first[1]) >= 4 and second[0] == "0" and int(second[1]) <= 1, summary
    assert summary.index("test_cuda.1: rc=1") < summary.index("test_cuda.2: rc=0") and result.returncode == 1


def test_a_signal_stops_every_step_running_side_by_side_and_keeps_what_had_ended(tmp_path):
    pids = tmp_path / "pids"
    python = stand_in_python(tmp_path, 'case "$*" in *verify_ninja_availability*|*import*) exit 0 ;; esac\n'
                             'case "$*" in *--shard=0/4*) echo "FAILED test_cuda.py::test_x" ; exit 1 ;; esac\n'
                             f'case "$*" in *test_cuda*) echo $$ >> {pids}; exec sleep 60 ;; esac')
    process = subprocess.Popen(["bash", str(SCRIPT), str(tmp_path / "out")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHON": str(python), "PATH": shared_gpu(tmp_path),
                                    "GPU_CHECK_ONLY": "test_cuda test_cuda_graph", "GPU_CHECK_SIDE_BY_SIDE": "1"})
    try:
        deadline = time.monotonic() + 30
        while (not pids.exists() or len(pids.read_text().split()) < 4) and time.monotonic() < deadline:
            time.sleep(0.1)  # three shards and test_cuda_graph are running; the first shard failed
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[-2] == "[gpu_check] stopped by a signal" and process.returncode == 1, summary
    assert re.search(r"^\[gpu_check\] test_cuda\.1: rc=1 in [01] s$", "\n".join(summary), flags=re.M), summary
    assert "    FAILED test_cuda.py::test_x" in summary, summary
    assert len([line for line in summary if re.match(r"\[gpu_check\] test_cuda(\.\d|_graph): rc=", line)]) == 5
    deadline = time.monotonic() + 10
    while [pid for pid in pids.read_text().split() if Path(f"/proc/{pid}").exists()] and time.monotonic() < deadline:
        time.sleep(0.1)  # the stand-ins' sleeps end (timeout passes the signal on)
    assert [pid for pid in pids.read_text().split() if Path(f"/proc/{pid}").exists()] == []


def test_the_shards_run_every_test_once():
    # tests/conftest.py's --shard K/N, as the script gives it to test_cuda.py's processes (here on this file).
    def collected(*arguments):
        result = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "--collect-only", "-q",
                                 "-p", "no:cacheprovider", *arguments], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        return [line for line in result.stdout.splitlines() if "::" in line], result

    everything, _ = collected()
    shards = [collected(f"--shard={k}/3")[0] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(everything) and all(shards) and len(everything) > 3, shards
    _, refused = collected("--shard=3/3")
    assert refused.returncode != 0 and "--shard must be K/N with whole numbers 0 <= K < N, got '3/3'" in refused.stderr


@pytest.mark.parametrize("shards", ["0", "00", "two", "-1"])
def test_a_shard_count_that_is_not_a_whole_number_above_0_is_refused_before_the_build(tmp_path, shards):
    result = run_script(tmp_path / "out", GPU_CHECK_SHARDS=shards)
    assert result.returncode == 2 and "GPU_CHECK_SHARDS must be" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_step_leaves_what_failed_in_the_summary(tmp_path):
    # summary.txt alone must say what to fix: the failed tests and the sanitizer's reports, not only rc=1.
    python = stand_in_python(tmp_path, 'case "$*" in\n'
                             '  *test_cuda.py*) echo "tests/library/test_cuda.py::test_a PASSED"\n'
                             '    echo "FAILED tests/library/test_cuda.py::test_b[relu] - AssertionError: 1 != 2"; exit 1 ;;\n'
                             'esac\nexit 0')
    (tmp_path / "bin").mkdir()
    stand_in_python(tmp_path / "bin", 'case "$*" in *racecheck*)\n'
                    '  echo "========= COMPUTE-SANITIZER"\n'
                    '  echo "========= Error: Race reported between Write access at kernel_x+0x10"\n'
                    '  echo "=========     and Read access at kernel_x+0x20 [16 hazards]"\n'
                    '  echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"; exit 1 ;;\n'
                    'esac\nexit 0').rename(tmp_path / "bin" / "compute-sanitizer")
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="test_cuda racecheck",
                        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 1, summary
    test_cuda = summary.split("[gpu_check] test_cuda: rc=1")[1].split("[gpu_check]")[0]
    assert "    FAILED tests/library/test_cuda.py::test_b[relu] - AssertionError: 1 != 2" in test_cuda, summary
    assert "PASSED" not in test_cuda, summary
    racecheck = summary.split("[gpu_check] racecheck: rc=1")[1].split("[gpu_check]")[0]
    assert "Race reported between Write access at kernel_x+0x10" in racecheck, summary
    assert "and Read access at kernel_x+0x20" in racecheck and "SUMMARY" not in racecheck, summary
    assert "[gpu_check] memcheck: rc=0" not in summary and "test_cuda_graph: skipped" in summary, summary


def test_a_step_stopped_by_its_time_limit_or_a_device_assert_still_names_its_failures(tmp_path):
    # No short summary when the time limit stops pytest: the -v lines name the tests that failed.
    python = stand_in_python(tmp_path, 'case "$*" in\n'
                             '  *test_cuda.py*) echo "tests/library/test_cuda.py::test_a[x] PASSED   [  1%]"\n'
                             '    echo "tests/library/test_cuda.py::test_b[cublaslt-(\'relu\', \'relu\')] FAILED   [  2%]"\n'
                             '    echo "IndexKernel.cu:111: operator(): block: [0,0,0] Assertion index < sizes[i] failed."\n'
                             '    exit 124 ;;\n'
                             'esac\nexit 0')
    result = run_script(tmp_path / "out", python=python, GPU_CHECK_ONLY="test_cuda")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 1, summary
    assert "    tests/library/test_cuda.py::test_b[cublaslt-('relu', 'relu')] FAILED" in summary, summary
    assert "Assertion index < sizes[i] failed." in summary and "PASSED" not in summary, summary


def test_the_profile_runs_last_in_the_full_run_only(tmp_path):
    log = tmp_path / "calls.log"
    python = stand_in_python(tmp_path, f'echo "$*" >> {log}\nexit 0')
    (tmp_path / "bin").mkdir()
    stand_in_python(tmp_path / "bin", "exit 0").rename(tmp_path / "bin" / "compute-sanitizer")
    result = run_script(tmp_path / "out", "--full", python=python, PYFASTNN_MNIST=mnist_stand_in(tmp_path),
                        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[-2].startswith("[gpu_check] profile_cuda: rc=0"), summary
    assert summary[-3].startswith("[gpu_check] test_cpu_on_cuda_build: rc=0") and result.returncode == 0, summary
    calls = log.read_text()
    assert "bench_cuda.py --profile --json" in calls and "bench_mnist.py --device cuda --profile --json" in calls


def test_the_summary_keeps_the_benchmarks_figures_and_the_tests_recorded_ones(tmp_path):
    # The benchmark's printed lines (not its warnings) and the figures a test recorded in the junit
    # XML land under their steps: summary.txt alone says what was measured.
    body = r'''case "$*" in
  *bench_cuda.py*) echo "65536x1024->1024 bfloat16 relu fwd pyfastnn=   287.3"
    echo "/x.py:1: UserWarning: something"; echo "  warnings.warn(x)" ;;
  *test_cuda_train.py*) for a in "$@"; do case "$a" in --junitxml=*)
    echo '<testsuites><testcase><properties><property name="five_epochs_cuda_train_seconds" value="1.234" /></properties></testcase></testsuites>' > "${a#--junitxml=}" ;;
  esac; done ;;
esac
exit 0'''
    result = run_script(tmp_path / "out", python=stand_in_python(tmp_path, body), PYFASTNN_MNIST=mnist_stand_in(tmp_path),
                        GPU_CHECK_ONLY="bench_cuda test_cuda_train")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.returncode == 0, summary
    bench = summary.split("[gpu_check] bench_cuda: rc=0")[1].split("[gpu_check]")[0]
    assert bench.splitlines()[1:] == ["    65536x1024->1024 bfloat16 relu fwd pyfastnn=   287.3"], summary
    train = summary.split("[gpu_check] test_cuda_train: rc=0")[1].split("[gpu_check]")[0]
    assert train.splitlines()[1:] == ["    five_epochs_cuda_train_seconds = 1.234"], summary
