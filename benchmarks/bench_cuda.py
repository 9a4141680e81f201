"""CUDA: pyfastnn against eager PyTorch, cuBLASLt's own epilogue and the bare GEMMs (needs a GPU).

    python benchmarks/bench_cuda.py [--quick] [--json PATH]
    python benchmarks/bench_cuda.py --profile [--json PATH]

One process, side by side, medians of CUDA-synchronised timings (torch.utils.benchmark), in
microseconds. Columns, per shape x dtype x activation:

- ``pyfastnn``: ``fused_linear`` (forward under ``torch.no_grad()``: inference; forward+backward:
  ``torch.autograd.grad`` of input, weight and bias);
- ``relu_epi`` (relu rows): ``fused_linear`` inside ``pyfastnn.cuda_relu_epilogue()``, relu in
  cuBLASLt's epilogue (opt-in: NaN pre-activations may become 0); by default relu takes the bias
  epilogue and pyfastnn's own pass, which keeps NaN as torch does;
- ``eager``: ``act(F.linear(x, w, b))`` the same way;
- ``addmm_act``: ``torch._addmm_activation`` (cuBLASLt's relu / tanh-GELU epilogue), forward only
  (it has no backward), for relu and gelu_tanh;
- ``gemm``: the bare forward GEMM ``x @ w.t()``; ``3gemm``: the forward GEMM plus the two backward
  GEMMs (``g @ w``, ``g.t() @ x``), the floor of a layer's forward+backward.

Where pyfastnn runs its own element-wise pass (the activations cuBLASLt's epilogue does not take),
``pass`` is that kernel's bandwidth: its device time from ``torch.profiler`` (not a difference of
two timings), over the bytes it moves (forward: read the GEMM result, write the output; backward:
read the gradient and the saved tensor, write the pre-activation gradient), and that as a share of
a device-to-device copy's bandwidth in the same dtype (measured first).

Then ``fused_mlp`` 65536x1024->1024->1024->1024 (relu hidden, identity output, the input needs no
gradient) forward+backward against its 8 bare GEMMs (3 forward, 5 backward), without dropout and with
dropout 0.2 after each hidden layer (eager: ``F.dropout``; ``relu_epi`` does not apply there).

``--profile`` instead lists the kernels each variant launches per call (``torch.profiler``, device
time per kernel, longest first) for the first shape in bfloat16: where the time above goes.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import pyfastnn
from pyfastnn.benchmark import cuda_kernels, format_kernels, results_record, run_benchmark, write_results
from pyfastnn.command import command_parser, output_file_argument, positive_float

SHAPES = ((65536, 1024, 1024), (8192, 4096, 4096), (4096, 784, 256))
QUICK_SHAPES = ((65536, 1024, 1024),)
QUICK_ACTS = ("identity", "relu", "gelu_tanh", "gelu", "silu")
EPILOGUE_ACTS = {"relu": False, "gelu_tanh": True}  # torch._addmm_activation(use_gelu=...)


def _median_us(fn, min_run_time: float) -> float:
    fn()  # warm-up: cuBLASLt heuristics, caching allocator
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def _fmt(times: dict) -> str:
    return " ".join(f"{k}={v:8.1f}" for k, v in times.items())


def layer_calls(m: int, k: int, n: int, dtype, activations):
    """One layer's tensors on the GPU and, per activation and pass (False: forward under no_grad,
    True: forward+backward of input, weight and bias), pyfastnn's and eager's call."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    grad = torch.randn(m, n, device="cuda", dtype=dtype)
    params = tuple(t.clone().requires_grad_() for t in (x, w, b))
    calls = {}
    for name in activations:
        act = pyfastnn.activation_module(name).forward  # eager's torch.nn activation

        @torch.no_grad()
        def fused_fwd(name=name):
            return pyfastnn.fused_linear(x, w, b, name)

        @torch.no_grad()
        def eager_fwd(act=act):
            return act(F.linear(x, w, b))

        def fused_bwd(name=name):
            return torch.autograd.grad(pyfastnn.fused_linear(*params, name), params, grad)

        def eager_bwd(act=act):
            return torch.autograd.grad(act(F.linear(*params)), params, grad)

        calls[name] = {False: {"pyfastnn": fused_fwd, "eager": eager_fwd},
                       True: {"pyfastnn": fused_bwd, "eager": eager_bwd}}
    return (x, w, b, grad), calls


def mlp_calls(rows: int, width: int, layers: int, dtype, dropout: float = 0.0):
    """The relu stack's tensors and its forward+backward (weights and biases) by pyfastnn and eager,
    with ``dropout`` after each hidden layer (training mode)."""
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    weights = [(torch.randn(width, width, device="cuda", dtype=dtype) * width ** -0.5).requires_grad_()
               for _ in range(layers)]
    biases = [torch.randn(width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(layers)]
    grad = torch.randn(rows, width, device="cuda", dtype=dtype)
    params = (*weights, *biases)

    def fused():
        out = pyfastnn.fused_mlp(x, weights, biases, "relu", "identity", dropout=dropout, training=True)
        return torch.autograd.grad(out, params, grad)

    def eager():
        h = x
        for layer in range(layers):
            h = F.linear(h, weights[layer], biases[layer])
            if layer + 1 < layers:
                h = F.dropout(torch.relu(h), dropout, training=True) if dropout else torch.relu(h)
        return torch.autograd.grad(h, params, grad)

    return (x, [t.detach() for t in weights], grad), {"pyfastnn": fused, "eager": eager}


def pass_bandwidth(fn, backward: bool, bytes_moved: int):
    """GB/s of pyfastnn's own element-wise kernels in one call of fn, from their device time: the
    backward pass's (its name says so) or, for a forward-only call, every pyfastnn kernel. None
    where there is no such kernel (the activation rode in cuBLASLt's epilogue)."""
    us = sum(kernel["us"] for kernel in cuda_kernels(fn, iters=3)
             if "pyfastnn" in kernel["kernel"] and (not backward or "backward" in kernel["kernel"]))
    return bytes_moved / us / 1e3 if us > 0 else None


def layer_rows(shapes, dtypes, activations, min_run_time, copy_gbps):
    rows = []
    for m, k, n in shapes:
        for dtype in dtypes:
            (x, w, b, grad), calls = layer_calls(m, k, n, dtype, activations)
            with torch.no_grad():
                gemm_us = _median_us(lambda: x @ w.t(), min_run_time)
                floor_us = _median_us(lambda: (x @ w.t(), grad @ w, grad.t() @ x), min_run_time)
            for name in activations:
                for backward in (False, True):
                    fused, eager = calls[name][backward]["pyfastnn"], calls[name][backward]["eager"]
                    times = {"pyfastnn": _median_us(fused, min_run_time)}
                    if name == "relu":
                        with pyfastnn.cuda_relu_epilogue():
                            times["relu_epi"] = _median_us(fused, min_run_time)
                    times["eager"] = _median_us(eager, min_run_time)
                    if backward:
                        times["3gemm"] = floor_us
                    else:
                        if name in EPILOGUE_ACTS:
                            use_gelu = EPILOGUE_ACTS[name]
                            with torch.no_grad():
                                times["addmm_act"] = _median_us(
                                    lambda: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu), min_run_time)
                        times["gemm"] = gemm_us
                    floor = times["3gemm" if backward else "gemm"]
                    row = {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "activation": name,
                           "pass": "fwd+bwd" if backward else "fwd", **{f"{key}_us": v for key, v in times.items()},
                           "pyfastnn_vs_eager": times["eager"] / times["pyfastnn"],
                           "pyfastnn_over_floor": times["pyfastnn"] / floor}
                    if name != "identity":
                        gbps = pass_bandwidth(fused, backward, (3 if backward else 2) * m * n * x.element_size())
                        if gbps is not None:
                            row["pass_GBps"] = gbps
                            row["pass_share_of_copy"] = gbps / copy_gbps[dtype]
                    rows.append(row)
                    print(f"{m}x{k}->{n} {row['dtype']:>8} {name:>10} {row['pass']:>7} {_fmt(times)}  "
                          f"eager/pyfastnn={row['pyfastnn_vs_eager']:.2f}x pyfastnn/floor={row['pyfastnn_over_floor']:.2f}x"
                          + (f" pass={row['pass_GBps']:.0f} GB/s ({row['pass_share_of_copy']:.0%} of copy)"
                             if "pass_GBps" in row else ""), flush=True)
    return rows


def copy_bandwidth_rows(dtypes, min_run_time, elements=65536 * 1024):
    rows = []
    for dtype in dtypes:
        src = torch.randn(elements, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        us = _median_us(lambda: dst.copy_(src), min_run_time)
        gbps = 2 * elements * src.element_size() / us / 1e3
        rows.append({"copy_elements": elements, "dtype": str(dtype).replace("torch.", ""), "copy_us": us,
                     "copy_GBps": gbps})
        print(f"device-to-device copy {elements} x {rows[-1]['dtype']}: {us:.1f} us, {gbps:.0f} GB/s", flush=True)
    return rows


def bare_mlp_gemms(x, weights, grad):
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


def mlp_rows(dtypes, min_run_time, rows_=65536, width=1024, layers=3):
    rows = []
    for dtype in dtypes:
        gemm_us = None  # the same 8 GEMMs with or without dropout: timed once per dtype
        for dropout in (0.0, 0.2):
            (x, w, grad), calls = mlp_calls(rows_, width, layers, dtype, dropout)
            fused_us = _median_us(calls["pyfastnn"], min_run_time)
            epilogue_us = None
            if not dropout:  # with dropout after it, relu never takes cuBLASLt's epilogue
                with pyfastnn.cuda_relu_epilogue():
                    epilogue_us = _median_us(calls["pyfastnn"], min_run_time)
            eager_us = _median_us(calls["eager"], min_run_time)
            if gemm_us is None:
                with torch.no_grad():
                    gemm_us = _median_us(lambda: bare_mlp_gemms(x, w, grad), min_run_time)
            row = {"mlp": f"{rows_}x{width}" + f"->{width}" * layers, "dtype": str(dtype).replace("torch.", ""),
                   "dropout": dropout, "pyfastnn_us": fused_us, "relu_epi_us": epilogue_us, "eager_us": eager_us,
                   "bare_gemms_us": gemm_us, "pyfastnn_vs_eager": eager_us / fused_us,
                   "pyfastnn_over_gemms": fused_us / gemm_us,
                   "relu_epi_over_gemms": epilogue_us / gemm_us if epilogue_us else None}
            rows.append(row)
            epilogue = (f"relu_epi={epilogue_us:8.1f}" if epilogue_us else f"relu_epi={'-':>8}")
            epilogue_ratio = (f" relu_epi/gemms={row['relu_epi_over_gemms']:.2f}x" if epilogue_us else "")
            print(f"fused_mlp {row['mlp']} {row['dtype']:>8} dropout={dropout:.1f} fwd+bwd pyfastnn={fused_us:8.1f} "
                  f"{epilogue} eager={eager_us:8.1f} 8gemm={gemm_us:8.1f}  "
                  f"eager/pyfastnn={row['pyfastnn_vs_eager']:.2f}x pyfastnn/gemms={row['pyfastnn_over_gemms']:.2f}x"
                  f"{epilogue_ratio}", flush=True)
    return rows


def profile_rows(shape=QUICK_SHAPES[0], dtype=torch.bfloat16, layers=3) -> list[dict]:
    """Kernel tables of pyfastnn and eager, forward (inference) and forward+backward, and the MLP."""
    m, k, n = shape
    names = ("identity", "relu", "gelu_tanh", "gelu")
    _, calls = layer_calls(m, k, n, dtype, names)
    cases = [(f"{name} {'fwd+bwd' if backward else 'fwd'}", calls[name][backward])
             for name in names for backward in (False, True) if not (backward and name == "identity")]
    for dropout in (0.0, 0.2):
        _, stack = mlp_calls(m, k, layers, dtype, dropout)
        cases.append((f"fused_mlp {m}x{k}" + f"->{k}" * layers + f" relu dropout={dropout:.1f} fwd+bwd", stack))
    rows = []
    for case, variants in cases:
        for variant, fn in variants.items():
            kernels = cuda_kernels(fn)
            rows.append({"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "case": case,
                         "variant": variant, "kernel_us": sum(row["us"] for row in kernels), "kernels": kernels})
            print(format_kernels(f"{m}x{k}->{n} {rows[-1]['dtype']} {case}, {variant}", kernels), flush=True)
    return rows


def main(argv=None) -> int:
    parser = command_parser("bench_cuda.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bfloat16, the first shape, five activations")
    parser.add_argument("--json", metavar="PATH", type=output_file_argument,
                        help="write the results as JSON here (- for standard output, the tables then on stderr)")
    parser.add_argument("--min-run-time", type=positive_float, default=0.2, help="seconds per measurement")
    parser.add_argument("--profile", action="store_true",
                        help="list the kernels of each variant instead of timing it (first shape, bfloat16)")
    args = parser.parse_args(argv)
    return run_benchmark(parser, args, lambda: _run(args, parser))


def _run(args, parser) -> int:
    if not pyfastnn.info()["cuda_available"]:
        parser.error("needs a CUDA GPU and a CUDA build of pyfastnn (see pyfastnn info)")
    print(pyfastnn.info(), torch.__version__, torch.cuda.get_device_name(), flush=True)
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16, torch.float32)
    if args.profile:
        results = {"profile": profile_rows()}
    else:
        copy = copy_bandwidth_rows(dtypes, args.min_run_time)
        copy_gbps = {dtype: row["copy_GBps"] for dtype, row in zip(dtypes, copy)}
        results = {
            "copy": copy,
            "layers": layer_rows(QUICK_SHAPES if args.quick else SHAPES, dtypes,
                                 QUICK_ACTS if args.quick else pyfastnn.ACTIVATIONS, args.min_run_time, copy_gbps),
            "fused_mlp": mlp_rows(dtypes, args.min_run_time),
        }
    if args.json:
        write_results(args.json, results_record(
            args, pyfastnn.info(), torch=torch.__version__, device=torch.cuda.get_device_name(),
            fp32_precision=getattr(torch.backends.cuda.matmul, "fp32_precision", None), **results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
