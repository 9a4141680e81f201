"""Benchmarking: the public timing helpers and ``pyfastnn bench``.

- :func:`time_interleaved` times several callables side by side (interleaved rounds, medians);
- :func:`train_step` wraps one classifier training step as a callable to time;
- :func:`saved_for_backward_bytes` measures what autograd keeps for backward;
- :func:`cuda_kernels` lists the CUDA kernels a callable runs, with their device time (where a
  GPU timing goes), and :func:`format_kernels` prints that list;
- :func:`write_results` saves a benchmark's figures as JSON (the benchmark scripts' ``--json``), at
  the end of a :func:`json_output` block, which :func:`run_benchmark` opens around a command's body;
- ``pyfastnn bench`` (:func:`main`, also ``python benchmarks/bench_fused_linear.py``) times
  fused_linear against PyTorch eager, torch.compile and the bare GEMMs, every variant of one case
  interleaved in the same process, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .command import command_parser, describe_error, output_file_argument, positive_int, run_command
from .extension import PACKAGE, in_source_folder
from .files import atomic_write, is_standard_output, json_bytes, output_file, restore_output_folder
from .functional import fused_linear
from ._ops import canonical_activation
from .info import info
from .nn import activation_module

__all__ = ["BENCH_ACTIVATIONS", "time_interleaved", "train_step", "saved_for_backward_bytes", "cuda_kernels",
           "format_kernels", "source_revision", "results_record", "write_results", "json_output", "run_benchmark", "run",
           "main"]

FULL_SHAPES = ((1, 784, 256), (64, 784, 256), (256, 784, 256), (1024, 784, 256), (64, 256, 128),
               (4096, 1024, 1024))
QUICK_SHAPES = ((1, 784, 256), (64, 784, 256), (64, 256, 128), (1024, 784, 256))
#: The activations `pyfastnn bench` times (a cheap, a costly and a saturating one), not pyfastnn.ACTIVATIONS.
BENCH_ACTIVATIONS = ("relu", "gelu", "sigmoid")


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 7,
                     target_s: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each function, measured side by side.

    Each function is warmed up and calibrated to about ``target_s`` seconds per round; then every
    round times each function in turn, so machine noise (another process, frequency changes) hits
    all of them alike, and each reports the median of its ``rounds`` rounds. Compare the results as
    ratios taken in one call.

    Example:
        >>> import torch, pyfastnn
        >>> from pyfastnn.benchmark import time_interleaved
        >>> x, w = torch.randn(64, 32), torch.randn(16, 32)
        >>> times = time_interleaved({"fused": lambda: pyfastnn.fused_linear(x, w),
        ...                           "eager": lambda: torch.relu(x @ w.t())}, rounds=3, target_s=0.002)
        >>> sorted(times), all(t > 0 for t in times.values())
        (['eager', 'fused'], True)
    """
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be >= 1, got {rounds}")
    if not 0 < target_s < math.inf:
        raise ValueError(f"time_interleaved: target_s must be a finite number of seconds > 0, got {target_s}")
    iters = {}
    for name, fn in fns.items():  # warm up and calibrate each to ~target_s per round
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < target_s / 4 or n < 3:
            fn()
            n += 1
        per_call = (time.perf_counter() - start) / n
        iters[name] = max(1, int(target_s / per_call))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / iters[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> Callable[[], None]:
    """One classifier training step as a callable: zero_grad, forward, cross-entropy, backward, step.

    Example:
        >>> from pyfastnn.benchmark import train_step
        >>> import torch, pyfastnn
        >>> model = pyfastnn.FusedMLP([4, 8, 3])
        >>> step = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(5, 4),
        ...                   torch.tensor([0, 1, 2, 0, 1]))
        >>> step()  # one optimizer step on the batch
    """
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def saved_for_backward_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward of ``model(x)``, beyond the parameters and
    the input (references to those cost nothing); each storage counted once.

    Example:
        >>> from pyfastnn.benchmark import saved_for_backward_bytes
        >>> import torch, pyfastnn
        >>> model = pyfastnn.FusedLinear(4, 3, activation="relu")  # keeps only its output (float32)
        >>> saved_for_backward_bytes(model, torch.randn(2, 4, requires_grad=True))
        24
    """
    total = 0
    # By storage: a view (w.t(), a slice at an offset, a chunk) keeps its whole storage alive.
    free = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in free:
            free.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def cuda_kernels(fn: Callable[[], object], iters: int = 5) -> List[dict]:
    """The CUDA kernels one call of ``fn`` runs (after one warm-up call), from ``torch.profiler``:
    ``{"kernel": name, "launches": per call, "us": device microseconds per call}``, longest first.
    Their sum is the GPU's busy time, which a wall-clock timing of ``fn`` can only exceed.

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     x = torch.randn(256, 256, device="cuda")
        ...     kernels = cuda_kernels(lambda: x @ x)
        ...     assert kernels[0]["launches"] == 1 and kernels[0]["us"] > 0
    """
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise RuntimeError("pyfastnn: cuda_kernels needs a CUDA GPU")
    if iters < 1:
        raise ValueError(f"pyfastnn: iters must be at least 1, got {iters}")
    fn()
    torch.cuda.synchronize()
    # CPU activity too: the kernels are reported as device events of the CPU ops that launched them.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: Dict[str, List[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    kernels = [{"kernel": name, "launches": count / iters, "us": us / iters} for name, (count, us) in totals.items()]
    return sorted(kernels, key=lambda row: -row["us"])


def format_kernels(title: str, kernels: Sequence[dict], width: int = 140) -> str:
    """``title``, the kernels' total time and launch count, then one line per kernel.

    Example:
        >>> from pyfastnn.benchmark import format_kernels
        >>> print(format_kernels("matmul", [{"kernel": "gemm_kernel", "launches": 1.0, "us": 12.5}]))
        matmul: 12.5 us of kernels, 1 launches
                12.5 us    1x  gemm_kernel
    """
    total = sum(row["us"] for row in kernels)
    launches = sum(row["launches"] for row in kernels)
    lines = [f"{title}: {total:.1f} us of kernels, {launches:g} launches"]
    lines += [f"    {row['us']:8.1f} us {row['launches']:4g}x  {row['kernel'][:width]}" for row in kernels]
    return "\n".join(lines)


def _variants(m: int, k: int, n: int, activation: str, backward: bool, with_compile: bool):
    if with_compile:
        torch._dynamo.reset()  # each case compiles afresh instead of hitting the recompile limit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * max(k, 1) ** -0.5
    b = torch.randn(n, generator=g)
    grad = torch.randn(m, n, generator=g)
    act = activation_module(activation).forward  # eager's torch.nn activation, without Module.__call__

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    def fused(x, w, b):
        return fused_linear(x, w, b, activation)

    if not backward:
        wt = w.t()
        fns = {
            "fused": lambda: fused(x, w, b),
            "eager": lambda: eager(x, w, b),
            "gemm": lambda: torch.mm(x, wt),
        }
        if with_compile:
            compiled = torch.compile(eager, dynamic=False)
            fns["compile"] = lambda: compiled(x, w, b)
        return {name: (lambda f=f: _no_grad(f)) for name, f in fns.items()}

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))

    def forward_and_gradients(fn):
        def run():
            out = fn(xs, ws, bs)
            return torch.autograd.grad(out, (xs, ws, bs), grad)
        return run

    wt = w.t()
    fns = {
        "fused": forward_and_gradients(fused),
        "eager": forward_and_gradients(eager),
        # The floor: the three GEMMs of forward + backward and nothing else.
        "gemm": lambda: (torch.mm(x, wt), torch.mm(grad, w), torch.mm(grad.t(), x)),
    }
    if with_compile:
        fns["compile"] = forward_and_gradients(torch.compile(eager, dynamic=False))
    return fns


def source_revision(package: Path = PACKAGE) -> Optional[Dict[str, object]]:
    """The git commit of the source tree ``package`` is imported from, and whether the sources differ
    from it (``modified``: a tracked file changed, or a new file in ``csrc`` or the package): what a
    figure measured, where the version number stays the same from commit to commit. None for an
    installed copy, a copy inside another repository, or where git cannot tell.

    Example:
        >>> from pathlib import Path
        >>> from pyfastnn.benchmark import source_revision
        >>> source_revision(Path("/site-packages/pyfastnn")) is None
        True
    """
    if not in_source_folder(package):
        return None

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(package.parent), *arguments],
                              capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent.resolve():
            return None  # a copy unpacked inside another repository: its commit says nothing of this
        commit = git("rev-parse", "HEAD")
        # tracked files changed, or new files where the build and the package read them
        modified = bool(git("status", "--porcelain", "--untracked-files=no")
                        or git("status", "--porcelain", "--untracked-files=normal", "--", "csrc", package.name))
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit yet
        return None
    return {"commit": commit, "modified": modified}


def results_record(args: argparse.Namespace, build: Mapping[str, object], **content: object) -> Dict[str, object]:
    """What a benchmark's ``--json`` file holds: when it ran (UTC), its settings (the parsed options
    but ``--json`` and ``--debug``), the build's :func:`pyfastnn.info`, the source's
    :func:`source_revision` and ``content`` (the figures).

    Example:
        >>> import argparse
        >>> from pyfastnn.benchmark import results_record
        >>> record = results_record(argparse.Namespace(quick=True, json="-"), {"pyfastnn": "0.1.0"}, results=[])
        >>> sorted(record), record["settings"]
        (['date', 'info', 'results', 'settings', 'source'], {'quick': True})
    """
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "debug")}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"date": date, "settings": settings, "info": dict(build), "source": source_revision(), **content}


def write_results(path: str, record: Mapping[str, object]) -> None:
    """Writes ``record`` (the build's :func:`pyfastnn.info` and the figures) to ``path`` as indented
    JSON, atomically: an existing file is replaced only by a complete one. A figure that is NaN or
    infinite is written as ``null`` (JSON has no such numbers; strict readers refuse Python's ``NaN``).

    Example:
        >>> from pyfastnn.benchmark import write_results
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "bench.json")
        >>> write_results(path, {"results": [{"case": "relu", "us": 12.5}]})  # doctest: +ELLIPSIS
        wrote ...bench.json
        >>> json.load(open(path))["results"][0]["us"]
        12.5
    """
    restore_output_folder(path)  # made when the run began, it may have been removed meanwhile
    try:
        with atomic_write(path) as f:
            f.write(json_bytes(record))
    except BrokenPipeError:  # `--json - | head -3`: the reader stopped, as with any other output
        return
    print(f"wrote {path}")


@contextlib.contextmanager
def json_output(path: Optional[str], parser: Optional[argparse.ArgumentParser] = None) -> Iterator[None]:
    """The block of a benchmark that ends writing its JSON to ``path`` (``--json``; None: no JSON):
    the file is checked first (with ``parser``, a bad one is the parser's usage error), what the
    block prints goes to standard error where the JSON goes to standard output (``--json -``), so
    that a pipe (``--json - | jq``) receives the JSON alone, and folders made for the file are
    removed again if the block fails.

    Example:
        >>> import contextlib, io
        >>> from pyfastnn.benchmark import json_output
        >>> with contextlib.redirect_stderr(io.StringIO()) as err, json_output("/dev/stdout"):
        ...     print("table")
        >>> err.getvalue()
        'table\\n'
    """
    with contextlib.ExitStack() as stack:
        if path:
            try:
                stack.enter_context(output_file(path))
            except OSError as error:
                if parser is None:
                    raise
                parser.error(describe_error(error))
        if path and is_standard_output(path):
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        yield


def run_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Runs a benchmark command's ``body`` as :func:`pyfastnn.command.run_command` does, inside
    :func:`json_output` for its ``--json`` (``args.json``): a path that cannot be written is the
    parser's usage error (exit status 2) before anything is timed.

    Example:
        >>> import contextlib, io
        >>> from pyfastnn.benchmark import run_benchmark
        >>> from pyfastnn.command import command_parser
        >>> parser = command_parser("bench-example")
        >>> _ = parser.add_argument("--json")
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = run_benchmark(parser, parser.parse_args(["--json", "/dev/stdout"]), lambda: print("table") or 0)
        >>> status, err.getvalue()
        (0, 'table\\n')
    """
    def guarded() -> int:
        with json_output(args.json, parser):
            return body()

    return run_command(parser, args, guarded)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run(shapes: Sequence = FULL_SHAPES, activations: Sequence[str] = BENCH_ACTIVATIONS,
        threads: Sequence[int] = (1, 2), with_compile: bool = True, rounds: int = 7,
        target_s: float = 0.02, log: Callable[[str], object] = print) -> List[dict]:
    """Times fused_linear against eager PyTorch, the bare GEMMs (and torch.compile) for every shape x
    activation x thread count, forward and forward+backward; logs a table, returns one dict per row.
    With ``with_compile``, torch.compile's caches are reset for each case (``torch._dynamo.reset()``:
    each compiles afresh), which also drops what other code in the process had compiled."""
    activations = [canonical_activation(a) for a in activations]  # an unknown name fails here, before timing
    results = []
    previous_threads = torch.get_num_threads()
    header = (f"{'shape':>16} {'act':>10} {'thr':>3} {'pass':>8} {'fused us':>9} {'eager us':>9} "
              f"{'compile us':>10} {'gemm us':>8} {'eager/fused':>11} {'fused/gemm':>10}")
    log(header)
    log("-" * len(header))
    try:
        for t in threads:
            torch.set_num_threads(t)
            for m, k, n in shapes:
                for activation in activations:
                    for backward in (False, True):
                        fns = _variants(m, k, n, activation, backward, with_compile)
                        times = time_interleaved(fns, rounds, target_s)
                        row = {
                            "shape": [m, k, n], "activation": activation, "threads": t,
                            "pass": "fwd+bwd" if backward else "fwd",
                            **{f"{name}_us": s * 1e6 for name, s in times.items()},
                            "speedup_vs_eager": times["eager"] / times["fused"],
                            "fused_over_gemm": times["fused"] / times["gemm"],
                        }
                        if "compile" in times:
                            row["speedup_vs_compile"] = times["compile"] / times["fused"]
                        results.append(row)
                        compile_text = f"{row['compile_us']:10.1f}" if "compile_us" in row else f"{'-':>10}"
                        log(f"{f'{m}x{k}->{n}':>16} {activation:>10} {t:>3} {row['pass']:>8} "
                            f"{row['fused_us']:9.1f} {row['eager_us']:9.1f} {compile_text} "
                            f"{row['gemm_us']:8.1f} {row['speedup_vs_eager']:10.2f}x "
                            f"{row['fused_over_gemm']:9.2f}x")
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """A --threads value: 1 up to the CPUs this process may use (more only oversubscribes them, and
    torch aborts on counts in the tens of thousands)."""
    count = positive_int(text)
    available = _available_cpus()
    if count > available:
        raise argparse.ArgumentTypeError(f"must be at most {available} (the CPUs available), got {count}")
    return count


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = command_parser(
        "pyfastnn bench",
        description=(
            "Times fused_linear against eager PyTorch, torch.compile and the bare GEMMs, forward and "
            "forward+backward, side by side (medians)."),
        examples=("pyfastnn bench --quick", "pyfastnn bench --threads 1 2 --json bench.json"))
    parser.add_argument("--quick", action="store_true",
                        help="4 shapes, relu/gelu, 2 threads, no torch.compile (well under 30 s)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--threads", type=thread_count, nargs="+", help="thread counts (default: 1 2, with --quick 2; never more than the CPUs available)")
    parser.add_argument("--json", metavar="PATH", type=output_file_argument,
                        help="write the results as JSON here (- for standard output, the table then on stderr)")
    args = parser.parse_args(argv)
    return run_benchmark(parser, args, lambda: _bench(args))


def _bench(args) -> int:
    # By default 2 threads (the lesson's machine), and 1 in the full run; no more than the CPUs available.
    default_threads = sorted({1, min(2, _available_cpus())}) if not args.quick else [min(2, _available_cpus())]
    if args.quick:
        kwargs = dict(shapes=QUICK_SHAPES, activations=("relu", "gelu"), threads=args.threads or default_threads,
                      with_compile=False, rounds=5, target_s=0.01)
    else:
        kwargs = dict(threads=args.threads or default_threads, with_compile=not args.no_compile)
    build = info()
    print(f"pyfastnn {build['pyfastnn']} | torch {build['torch']} | CPU kernels {build['cpu_isa']} | "
          f"float32, times are medians of interleaved rounds")
    results = run(**kwargs)
    if args.json:
        write_results(args.json, results_record(args, build, results=results))
    return 0
