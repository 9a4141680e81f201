"""CUDA: fused_linear vs eager act(F.linear) vs torch._addmm_activation (cuBLASLt epilogue, relu and
gelu) vs torch.compile, forward and forward+backward, fp32/bf16/fp16 (needs a GPU).

    python benchmarks/bench_cuda.py [--quick] [--json PATH]

Timed with torch.utils.benchmark (CUDA-synchronised), medians; ratios > 1 mean pyfastnn is faster.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import pyfastnn

SHAPES = ((64, 784, 256), (1024, 784, 256), (4096, 1024, 1024), (16384, 4096, 4096))
QUICK_SHAPES = ((64, 784, 256), (4096, 1024, 1024))
ACTS = {"relu": torch.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu}


def _median_us(fn) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e6


def run(shapes, dtypes, activations, with_compile=True):
    rows = []
    for m, k, n in shapes:
        for dtype in dtypes:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
            b = torch.randn(n, device="cuda", dtype=dtype)
            grad = torch.randn(m, n, device="cuda", dtype=dtype)
            for name in activations:
                act = ACTS[name]
                variants = {
                    "fused": lambda x, w, b: pyfastnn.fused_linear(x, w, b, name),
                    "eager": lambda x, w, b: act(F.linear(x, w, b)),
                }
                if name in ("relu", "gelu"):
                    variants["addmm_activation"] = lambda x, w, b: torch._addmm_activation(
                        b, x, w.t(), use_gelu=(name == "gelu"))
                if with_compile:
                    variants["compile"] = torch.compile(lambda x, w, b: act(F.linear(x, w, b)), dynamic=False)
                for backward in (False, True):
                    times = {}
                    for label, fn in variants.items():
                        if backward:
                            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
                            call = lambda fn=fn, xs=xs, ws=ws, bs=bs: torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), grad)
                        else:
                            call = lambda fn=fn: fn(x, w, b)
                        with torch.set_grad_enabled(backward):
                            times[label] = _median_us(call)
                    row = {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "activation": name,
                           "pass": "fwd+bwd" if backward else "fwd", **{f"{k_}_us": v for k_, v in times.items()},
                           **{f"speedup_vs_{k_}": v / times["fused"] for k_, v in times.items() if k_ != "fused"}}
                    rows.append(row)
                    print(f"{m}x{k}->{n} {row['dtype']:>8} {name:>7} {row['pass']:>7} "
                          + " ".join(f"{k_}={v:9.1f}us" for k_, v in times.items())
                          + "  " + " ".join(f"{k_[11:]}/fused={v:.2f}x" for k_, v in row.items() if k_.startswith("speedup")),
                          flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(pyfastnn.info(), torch.cuda.get_device_name())
    rows = run(QUICK_SHAPES if args.quick else SHAPES,
               (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16, torch.float16),
               ("relu", "gelu", "sigmoid") if args.quick else tuple(ACTS), with_compile=not args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": pyfastnn.info(), "device": torch.cuda.get_device_name(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
