"""Benchmarking: the public timing helpers and ``pyfastnn bench``.

- :func:`time_interleaved` times several callables side by side (interleaved rounds, medians);
- :func:`train_step` wraps one classifier training step as a callable to time;
- :func:`saved_for_backward_bytes` measures what autograd keeps for backward;
- :func:`cuda_kernels` lists the CUDA kernels a callable runs, with their device time (where a
  GPU timing goes), and :func:`format_kernels` prints that list;
- :func:`write_results` saves a benchmark's figures as JSON (the benchmark scripts' ``--json``), at
  the end of a :func:`json_output` block, which :func:`run_benchmark` opens around a command's body;
- ``pyfastnn bench`` (:func:`main`, also ``python benchmarks/bench_fused_linear.py``) times
  fused_linear against PyTorch eager, torch.compile and the bare GEMMs on the CPU (:func:`run`),
  every variant of one case interleaved in the same process, so machine noise hits them alike;
- ``pyfastnn bench --device cuda`` (also ``python benchmarks/bench_cuda.py``) times it on the GPU
  against eager PyTorch, cuBLASLt's own epilogue and the bare GEMMs (:func:`run_cuda`), and
  ``--profile`` lists the kernels each variant runs (:func:`profile_cuda`).
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
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .command import command_parser, describe_error, output_file_argument, positive_float, positive_int, run_command
from .cuda_options import cuda_relu_epilogue
from .extension import PACKAGE, in_source_folder
from .files import atomic_write, is_standard_output, json_bytes, output_file, restore_output_folder
from .functional import fused_linear, fused_mlp
from ._ops import ACTIVATIONS, canonical_activation
from .info import info
from .nn import activation_module

__all__ = ["BENCH_ACTIVATIONS", "time_interleaved", "train_step", "saved_for_backward_bytes", "cuda_kernels",
           "format_kernels", "source_revision", "results_record", "write_results", "json_output", "run_benchmark", "run",
           "CUDA_SHAPES", "CUDA_QUICK_ACTIVATIONS", "CUDA_MLP", "run_cuda", "profile_cuda", "main"]

#: Why a CUDA benchmark cannot run here (no GPU visible, or a build of pyfastnn without CUDA).
CUDA_NEEDED = "needs a CUDA GPU and a CUDA build of pyfastnn (see pyfastnn info)"

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


def _fused_and_eager(activation: str) -> Tuple[Callable, Callable]:
    """``layer(x, w, b)`` by pyfastnn and by eager PyTorch (``act(F.linear(x, w, b))``)."""
    act = activation_module(activation).forward  # eager's torch.nn activation, without Module.__call__
    return (lambda x, w, b: fused_linear(x, w, b, activation)), (lambda x, w, b: act(F.linear(x, w, b)))


def _layer_call(layer: Callable, backward: bool, tensors: Sequence[torch.Tensor], grad: torch.Tensor,
                leaves: Sequence[torch.Tensor]) -> Callable[[], object]:
    """One timed call of ``layer(x, w, b)``: the forward under ``torch.no_grad()`` (inference) on
    ``tensors``, or with ``backward`` the forward on ``leaves`` (clones of them that require grad) and
    the gradients of all three for ``grad``."""
    if not backward:
        return lambda: _no_grad(lambda: layer(*tensors))
    return lambda: torch.autograd.grad(layer(*leaves), leaves, grad)


def _variants(m: int, k: int, n: int, activation: str, backward: bool, with_compile: bool):
    if with_compile:
        torch._dynamo.reset()  # each case compiles afresh instead of hitting the recompile limit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * max(k, 1) ** -0.5
    b = torch.randn(n, generator=g)
    grad = torch.randn(m, n, generator=g)
    leaves = tuple(t.clone().requires_grad_() for t in (x, w, b)) if backward else ()  # only backward reads them
    fused, eager = _fused_and_eager(activation)

    def timed(layer):
        return _layer_call(layer, backward, (x, w, b), grad, leaves)

    wt = w.t()
    fns = {"fused": timed(fused), "eager": timed(eager)}
    if backward:  # the floor: the three GEMMs of forward + backward and nothing else
        fns["gemm"] = lambda: (torch.mm(x, wt), torch.mm(grad, w), torch.mm(grad.t(), x))
    else:
        fns["gemm"] = lambda: _no_grad(lambda: torch.mm(x, wt))
    if with_compile:
        fns["compile"] = timed(torch.compile(eager, dynamic=False))
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


# CUDA: `pyfastnn bench --device cuda`. Timings are medians of CUDA-synchronised runs
# (torch.utils.benchmark), in microseconds; what each column means is in run_cuda's docstring.

#: The shapes (rows, in_features, out_features) `pyfastnn bench --device cuda` times; --quick the first.
CUDA_SHAPES = ((65536, 1024, 1024), (8192, 4096, 4096), (4096, 784, 256))
CUDA_QUICK_ACTIVATIONS = ("identity", "relu", "gelu_tanh", "gelu", "silu")
#: The MLP timed after the layers: rows, width, layers (relu hidden, identity output).
CUDA_MLP = (65536, 1024, 3)
_ADDMM_ACTIVATIONS = {"relu": False, "gelu_tanh": True}  # those torch._addmm_activation takes (use_gelu)


def _log_flushed(line: str) -> None:
    print(line, flush=True)  # each line out at once: a run stopped by a time limit keeps what it measured


def _cuda_median_us(fn: Callable[[], object], min_run_time: float) -> float:
    from torch.utils import benchmark

    fn()  # warm-up: cuBLASLt heuristics, caching allocator
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cuda_layer_calls(m: int, k: int, n: int, dtype: torch.dtype, activations: Sequence[str]):
    """One layer's tensors on the GPU and, per activation and pass (False: forward under no_grad,
    True: forward+backward of input, weight and bias), pyfastnn's and eager's call."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * max(k, 1) ** -0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    grad = torch.randn(m, n, device="cuda", dtype=dtype)
    leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
    calls = {}
    for name in activations:
        fused, eager = _fused_and_eager(name)
        calls[name] = {backward: {"pyfastnn": _layer_call(fused, backward, (x, w, b), grad, leaves),
                                  "eager": _layer_call(eager, backward, (x, w, b), grad, leaves)}
                       for backward in (False, True)}
    return (x, w, b, grad), calls


def _cuda_mlp_calls(rows: int, width: int, layers: int, dtype: torch.dtype, dropout: float = 0.0):
    """The relu stack's tensors and its forward+backward (weights and biases) by pyfastnn and eager,
    with ``dropout`` after each hidden layer (training mode)."""
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    weights = [(torch.randn(width, width, device="cuda", dtype=dtype) * width ** -0.5).requires_grad_()
               for _ in range(layers)]
    biases = [torch.randn(width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(layers)]
    grad = torch.randn(rows, width, device="cuda", dtype=dtype)
    params = (*weights, *biases)

    def fused():
        out = fused_mlp(x, weights, biases, "relu", "identity", dropout=dropout, training=True)
        return torch.autograd.grad(out, params, grad)

    def eager():
        h = x
        for layer in range(layers):
            h = F.linear(h, weights[layer], biases[layer])
            if layer + 1 < layers:
                h = F.dropout(torch.relu(h), dropout, training=True) if dropout else torch.relu(h)
        return torch.autograd.grad(h, params, grad)

    return (x, [t.detach() for t in weights], grad), {"pyfastnn": fused, "eager": eager}


def _pass_bandwidth(fn: Callable[[], object], backward: bool, bytes_moved: int) -> Optional[float]:
    """GB/s of pyfastnn's own element-wise kernels in one call of fn, from their device time: the
    backward pass's (its name says so) or, for a forward-only call, every pyfastnn kernel. None
    where there is no such kernel (the activation rode in cuBLASLt's epilogue)."""
    us = sum(kernel["us"] for kernel in cuda_kernels(fn, iters=3)
             if "pyfastnn" in kernel["kernel"] and (not backward or "backward" in kernel["kernel"]))
    return bytes_moved / us / 1e3 if us > 0 else None


def _cuda_copy_rows(dtypes: Sequence[torch.dtype], min_run_time: float, log: Callable[[str], object],
                    elements: int = 65536 * 1024) -> List[dict]:
    rows = []
    for dtype in dtypes:
        src = torch.randn(elements, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        us = _cuda_median_us(lambda: dst.copy_(src), min_run_time)
        gbps = 2 * elements * src.element_size() / us / 1e3
        rows.append({"copy_elements": elements, "dtype": _dtype_name(dtype), "copy_us": us, "copy_GBps": gbps})
        log(f"device-to-device copy {elements} x {rows[-1]['dtype']}: {us:.1f} us, {gbps:.0f} GB/s")
    return rows


def _cuda_layer_rows(shapes: Sequence, dtypes: Sequence[torch.dtype], activations: Sequence[str],
                     min_run_time: float, copy_gbps: Mapping[torch.dtype, float],
                     log: Callable[[str], object]) -> List[dict]:
    rows = []
    for m, k, n in shapes:
        for dtype in dtypes:
            (x, w, b, grad), calls = _cuda_layer_calls(m, k, n, dtype, activations)
            with torch.no_grad():
                gemm_us = _cuda_median_us(lambda: x @ w.t(), min_run_time)
                floor_us = _cuda_median_us(lambda: (x @ w.t(), grad @ w, grad.t() @ x), min_run_time)
            for name in activations:
                for backward in (False, True):
                    fused, eager = calls[name][backward]["pyfastnn"], calls[name][backward]["eager"]
                    times = {"pyfastnn": _cuda_median_us(fused, min_run_time)}
                    if name == "relu":
                        with cuda_relu_epilogue():
                            times["relu_epi"] = _cuda_median_us(fused, min_run_time)
                    times["eager"] = _cuda_median_us(eager, min_run_time)
                    if backward:
                        times["3gemm"] = floor_us
                    else:
                        if name in _ADDMM_ACTIVATIONS:
                            use_gelu = _ADDMM_ACTIVATIONS[name]
                            with torch.no_grad():
                                times["addmm_act"] = _cuda_median_us(
                                    lambda: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu), min_run_time)
                        times["gemm"] = gemm_us
                    floor = times["3gemm" if backward else "gemm"]
                    row = {"shape": [m, k, n], "dtype": _dtype_name(dtype), "activation": name,
                           "pass": "fwd+bwd" if backward else "fwd", **{f"{key}_us": v for key, v in times.items()},
                           "pyfastnn_vs_eager": times["eager"] / times["pyfastnn"],
                           "pyfastnn_over_floor": times["pyfastnn"] / floor}
                    if name != "identity":
                        gbps = _pass_bandwidth(fused, backward, (3 if backward else 2) * m * n * x.element_size())
                        if gbps is not None:
                            row["pass_GBps"] = gbps
                            row["pass_share_of_copy"] = gbps / copy_gbps[dtype]
                    rows.append(row)
                    timed = " ".join(f"{key}={value:8.1f}" for key, value in times.items())
                    log(f"{m}x{k}->{n} {row['dtype']:>8} {name:>10} {row['pass']:>7} {timed}  "
                        f"eager/pyfastnn={row['pyfastnn_vs_eager']:.2f}x "
                        f"pyfastnn/floor={row['pyfastnn_over_floor']:.2f}x"
                        + (f" pass={row['pass_GBps']:.0f} GB/s ({row['pass_share_of_copy']:.0%} of copy)"
                           if "pass_GBps" in row else ""))
    return rows


def _bare_mlp_gemms(x: torch.Tensor, weights: Sequence[torch.Tensor], grad: torch.Tensor) -> None:
    """The stack's GEMMs with nothing around them: 3 forward, then per layer a weight GEMM and (above
    the first) a data GEMM."""
    h = [x]
    for w in weights:
        h.append(h[-1] @ w.t())
    g = grad
    for layer in reversed(range(len(weights))):
        g.t() @ h[layer]
        if layer > 0:
            g = g @ weights[layer]


def _cuda_mlp_rows(dtypes: Sequence[torch.dtype], min_run_time: float, mlp: Tuple[int, int, int],
                   log: Callable[[str], object]) -> List[dict]:
    rows_, width, layers = mlp
    rows = []
    for dtype in dtypes:
        gemm_us = None  # the same GEMMs with or without dropout: timed once per dtype
        for dropout in (0.0, 0.2):
            (x, w, grad), calls = _cuda_mlp_calls(rows_, width, layers, dtype, dropout)
            fused_us = _cuda_median_us(calls["pyfastnn"], min_run_time)
            epilogue_us = None
            if not dropout:  # with dropout after it, relu never takes cuBLASLt's epilogue
                with cuda_relu_epilogue():
                    epilogue_us = _cuda_median_us(calls["pyfastnn"], min_run_time)
            eager_us = _cuda_median_us(calls["eager"], min_run_time)
            if gemm_us is None:
                with torch.no_grad():
                    gemm_us = _cuda_median_us(lambda: _bare_mlp_gemms(x, w, grad), min_run_time)
            row = {"mlp": f"{rows_}x{width}" + f"->{width}" * layers, "dtype": _dtype_name(dtype),
                   "dropout": dropout, "pyfastnn_us": fused_us, "relu_epi_us": epilogue_us, "eager_us": eager_us,
                   "bare_gemms_us": gemm_us, "pyfastnn_vs_eager": eager_us / fused_us,
                   "pyfastnn_over_gemms": fused_us / gemm_us,
                   "relu_epi_over_gemms": epilogue_us / gemm_us if epilogue_us else None}
            rows.append(row)
            epilogue = f"relu_epi={epilogue_us:8.1f}" if epilogue_us else f"relu_epi={'-':>8}"
            epilogue_ratio = f" relu_epi/gemms={row['relu_epi_over_gemms']:.2f}x" if epilogue_us else ""
            log(f"fused_mlp {row['mlp']} {row['dtype']:>8} dropout={dropout:.1f} fwd+bwd pyfastnn={fused_us:8.1f} "
                f"{epilogue} eager={eager_us:8.1f} {3 * layers - 1}gemm={gemm_us:8.1f}  "
                f"eager/pyfastnn={row['pyfastnn_vs_eager']:.2f}x pyfastnn/gemms={row['pyfastnn_over_gemms']:.2f}x"
                f"{epilogue_ratio}")
    return rows


def run_cuda(shapes: Sequence = CUDA_SHAPES, dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16,
                                                                                torch.float32),
             activations: Sequence[str] = ACTIVATIONS, mlp: Optional[Tuple[int, int, int]] = CUDA_MLP,
             min_run_time: float = 0.2, log: Callable[[str], object] = _log_flushed) -> Dict[str, List[dict]]:
    """Times pyfastnn on the current GPU against eager PyTorch, cuBLASLt's own epilogue and the bare
    GEMMs, side by side in this process; logs a table and returns its rows (``copy``, ``layers``,
    ``fused_mlp``). Microseconds, medians of CUDA-synchronised timings. Per shape x dtype x
    activation, forward (under ``torch.no_grad()``: inference) and forward+backward (gradients of
    input, weight and bias):

    - ``pyfastnn``: ``fused_linear``; ``relu_epi`` (relu): the same inside
      :func:`pyfastnn.cuda_relu_epilogue` (relu in cuBLASLt's epilogue, opt-in: NaN
      pre-activations may become 0); ``eager``: ``act(F.linear(x, w, b))``;
    - ``addmm_act`` (relu, gelu_tanh; forward only: it has no backward): ``torch._addmm_activation``,
      cuBLASLt's relu / tanh-GELU epilogue as torch calls it;
    - ``gemm``: the bare forward GEMM; ``3gemm``: it and the two backward GEMMs, the floor of a
      layer's forward+backward;
    - ``pass_GBps`` where pyfastnn runs its own element-wise pass: that kernel's bandwidth, from its
      device time (``torch.profiler``) over the bytes it moves, and ``pass_share_of_copy``: that
      over a device-to-device copy's bandwidth in the dtype (the ``copy`` rows, measured first).

    Then, unless ``mlp`` is None, ``fused_mlp`` of ``mlp = (rows, width, layers)`` (relu hidden,
    identity output, the input needing no gradient) forward+backward without and with dropout 0.2
    after each hidden layer, against eager and the stack's bare GEMMs (``3 * layers - 1``).

    Example:
        >>> import torch, pyfastnn
        >>> from pyfastnn.benchmark import run_cuda
        >>> if pyfastnn.info()["cuda_available"]:  # one small layer in bfloat16, relu only
        ...     table = []
        ...     rows = run_cuda(shapes=((4096, 1024, 1024),), dtypes=(torch.bfloat16,), activations=("relu",),
        ...                     mlp=None, min_run_time=0.05, log=table.append)
        ...     assert [row["pass"] for row in rows["layers"]] == ["fwd", "fwd+bwd"] and len(table) == 3
    """
    activations = [canonical_activation(a) for a in activations]  # an unknown name fails here, before timing
    if not 0 < min_run_time < math.inf:
        raise ValueError(f"pyfastnn: run_cuda's min_run_time must be a finite number of seconds > 0, "
                         f"got {min_run_time}")
    if not info()["cuda_available"]:
        raise RuntimeError(f"pyfastnn: run_cuda {CUDA_NEEDED}")
    copy = _cuda_copy_rows(dtypes, min_run_time, log)
    copy_gbps = {dtype: row["copy_GBps"] for dtype, row in zip(dtypes, copy)}
    results = {"copy": copy, "layers": _cuda_layer_rows(shapes, dtypes, activations, min_run_time, copy_gbps, log)}
    if mlp is not None:
        results["fused_mlp"] = _cuda_mlp_rows(dtypes, min_run_time, mlp, log)
    return results


def profile_cuda(shape: Tuple[int, int, int] = CUDA_SHAPES[0], dtype: torch.dtype = torch.bfloat16,
                 layers: int = 3, log: Callable[[str], object] = _log_flushed) -> List[dict]:
    """The CUDA kernels (:func:`cuda_kernels`) of pyfastnn and eager for one layer of ``shape``
    (identity, relu, gelu_tanh and gelu; forward, and forward+backward) and the relu ``fused_mlp``
    stack of ``layers`` layers of its width (without and with dropout): where the time of
    :func:`run_cuda`'s rows goes. Logs each kernel table and returns one row per case and variant.

    Example:
        >>> import torch, pyfastnn
        >>> from pyfastnn.benchmark import profile_cuda
        >>> if pyfastnn.info()["cuda_available"]:  # one small layer in float32
        ...     rows = profile_cuda(shape=(256, 128, 64), dtype=torch.float32, log=lambda table: None)
        ...     assert {row["variant"] for row in rows} == {"pyfastnn", "eager"}
    """
    if not info()["cuda_available"]:
        raise RuntimeError(f"pyfastnn: profile_cuda {CUDA_NEEDED}")
    m, k, n = shape
    names = ("identity", "relu", "gelu_tanh", "gelu")
    _, calls = _cuda_layer_calls(m, k, n, dtype, names)
    cases = [(f"{name} {'fwd+bwd' if backward else 'fwd'}", calls[name][backward])
             for name in names for backward in (False, True) if not (backward and name == "identity")]
    for dropout in (0.0, 0.2):
        _, stack = _cuda_mlp_calls(m, k, layers, dtype, dropout)
        cases.append((f"fused_mlp {m}x{k}" + f"->{k}" * layers + f" relu dropout={dropout:.1f} fwd+bwd", stack))
    rows = []
    for case, variants in cases:
        for variant, fn in variants.items():
            kernels = cuda_kernels(fn)
            rows.append({"shape": [m, k, n], "dtype": _dtype_name(dtype), "case": case, "variant": variant,
                         "kernel_us": sum(row["us"] for row in kernels), "kernels": kernels})
            log(format_kernels(f"{m}x{k}->{n} {rows[-1]['dtype']} {case}, {variant}", kernels))
    return rows


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


#: The command lines ``pyfastnn bench --help`` shows.
BENCH_EXAMPLES = ("pyfastnn bench --quick", "pyfastnn bench --threads 1 2 --json bench.json",
                  "pyfastnn bench --device cuda --quick", "pyfastnn bench --device cuda --profile")


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "pyfastnn bench",
         examples: Sequence[str] = BENCH_EXAMPLES) -> int:
    """``pyfastnn bench``, or a benchmark script's command line: ``prog`` is the name its usage and
    errors give (the script's file name), ``examples`` the command lines its help shows."""
    parser = command_parser(
        prog,
        description=(
            "Times fused_linear against eager PyTorch, the bare GEMMs and torch.compile (CPU) or cuBLASLt's "
            "own epilogue (CUDA), forward and forward+backward, side by side (medians)."),
        examples=examples)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): float32 on torch's CPU threads; cuda: bfloat16, float16 and float32 on "
                             "the current GPU, then a fused_mlp stack (columns: help(pyfastnn.benchmark.run_cuda))")
    parser.add_argument("--quick", action="store_true",
                        help="cpu: 4 shapes, relu/gelu, 2 threads, no torch.compile (well under 30 s); "
                             "cuda: bfloat16, the first shape, five activations")
    parser.add_argument("--no-compile", action="store_true", help="(cpu) skip the torch.compile column")
    parser.add_argument("--threads", type=thread_count, nargs="+",
                        help="(cpu) thread counts (default: 1 2, with --quick 2; never more than the CPUs available)")
    parser.add_argument("--min-run-time", type=positive_float, metavar="SECONDS",
                        help="(cuda) seconds per measurement (default 0.2)")
    parser.add_argument("--profile", action="store_true",
                        help="(cuda) list the kernels of each variant, with their device time, instead of timing it "
                             "(the first shape, bfloat16)")
    parser.add_argument("--json", metavar="PATH", type=output_file_argument,
                        help="write the results as JSON here (- for standard output, the table then on stderr)")
    args = parser.parse_args(argv)
    # An option of the other device's benchmark is refused, not ignored.
    cpu_only = {"--threads": args.threads is not None, "--no-compile": args.no_compile}
    cuda_only = {"--min-run-time": args.min_run_time is not None, "--profile": args.profile}
    other = cpu_only if args.device == "cuda" else cuda_only
    refused = [option for option, given in other.items() if given]
    if refused:
        parser.error(f"{refused[0]} does not apply to --device {args.device}")
    timing_only = [option for option, given in (("--quick", args.quick), ("--min-run-time", args.min_run_time))
                   if given]
    if args.profile and timing_only:
        parser.error(f"{timing_only[0]} does not apply to --profile (the kernels of the first shape, in bfloat16)")
    if args.device == "cuda":
        if not info()["cuda_available"]:
            parser.error(f"--device cuda {CUDA_NEEDED}")
        if args.min_run_time is None:
            args.min_run_time = 0.2  # (the JSON's settings then say what ran)
        return run_benchmark(parser, args, lambda: _bench_cuda(args))
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


def _bench_cuda(args) -> int:
    build = info()
    device = torch.cuda.get_device_name()
    _log_flushed(f"pyfastnn {build['pyfastnn']} | torch {build['torch']} | {device} | "
                 f"times are medians of CUDA-synchronised runs, in microseconds")
    if args.profile:
        results = {"profile": profile_cuda()}
    else:
        results = run_cuda(**(dict(shapes=CUDA_SHAPES[:1], dtypes=(torch.bfloat16,), activations=CUDA_QUICK_ACTIVATIONS)
                              if args.quick else {}), min_run_time=args.min_run_time)
    if args.json:
        write_results(args.json, results_record(
            args, build, torch=torch.__version__, device=device,
            fp32_precision=getattr(torch.backends.cuda.matmul, "fp32_precision", None), **results))
    return 0
