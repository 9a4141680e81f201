"""Where the time of a tiny fused_linear training step goes (2x8 -> 4, float32, medians).

    python benchmarks/bench_overhead.py

At this size the GEMMs cost next to nothing, so each line is per-call overhead: the raw ops through
the dispatcher, the op through its C++ autograd kernel, a whole autograd.grad step, and for scale
the same step in eager PyTorch and a trivial autograd.grad call.
"""

import sys

import torch
import torch.nn.functional as F

import pyfastnn
from pyfastnn.benchmark import time_interleaved
from pyfastnn.command import command_parser, run_command


def main() -> None:
    ops = torch.ops.pyfastnn
    relu = pyfastnn.ACTIVATIONS.index("relu")
    x, w, b = (torch.randn(s, requires_grad=True) for s in ((2, 8), (4, 8), (4,)))
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    grad = torch.randn(2, 4)
    out = ops.fused_linear(xd, wd, bd, relu, 0.0)
    s = torch.randn(4, requires_grad=True)
    ones = torch.ones(4)
    cases = {
        "fused_linear op, no autograd": lambda: ops.fused_linear.default(xd, wd, bd, relu, 0.0),
        "fused_linear_backward op": lambda: ops.fused_linear_backward.default(grad, xd, wd, out, relu, 0.0, [True, True, True]),
        "pyfastnn.fused_linear, graph recorded": lambda: pyfastnn.fused_linear(x, w, b, "relu"),
        "fused step: forward + autograd.grad": lambda: torch.autograd.grad(pyfastnn.fused_linear(x, w, b, "relu"), (x, w, b), grad),
        "eager step: relu(F.linear) + autograd.grad": lambda: torch.autograd.grad(torch.relu(F.linear(x, w, b)), (x, w, b), grad),
        "trivial autograd.grad (s * 2)": lambda: torch.autograd.grad(s * 2, (s,), ones),
    }
    for name, seconds in time_interleaved(cases, rounds=9, target_s=0.02).items():
        print(f"{name:>44}: {seconds * 1e6:7.1f} us")


if __name__ == "__main__":
    parser = command_parser("bench_overhead.py", description=__doc__.splitlines()[0])  # --help; no options
    sys.exit(run_command(parser, parser.parse_args(), lambda: main() or 0))
