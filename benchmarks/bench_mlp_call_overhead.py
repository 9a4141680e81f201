"""Per-call Python cost of FusedMLP.forward, which reads its layers (parameters, activation,
dropout, hooks) on every call: the module's forward vs the bare op with prebuilt arguments, batch 1,
eval, interleaved rounds, medians.

    python benchmarks/bench_mlp_call_overhead.py
"""
import sys

import torch

import pyfastnn
from pyfastnn.benchmark import time_interleaved
from pyfastnn.command import command_parser, run_command


def main(rounds: int = 30) -> None:
    torch.manual_seed(0)
    mlp = pyfastnn.FusedMLP([784, 256, 128, 10], dropout=0.2).eval()
    x = torch.randn(1, 784)
    weights, biases = [layer.weight for layer in mlp], [layer.bias for layer in mlp]
    codes = [pyfastnn.ACTIVATIONS.index(layer.activation) for layer in mlp]
    dropout = [layer.dropout for layer in mlp]
    op = torch.ops.pyfastnn.fused_mlp.default
    cases = {"bare op": lambda: op(x, weights, biases, codes, 0.01, dropout, False),
             "FusedMLP.forward": lambda: mlp.forward(x)}
    torch.testing.assert_close(cases["bare op"](), cases["FusedMLP.forward"]())
    with torch.no_grad():
        times = time_interleaved(cases, rounds=rounds)
    bare, forward = (times[name] * 1e6 for name in cases)
    print(f"784-256-128-10, batch 1, eval, median of {rounds} interleaved rounds: bare op {bare:.1f} us, "
          f"FusedMLP.forward {forward:.1f} us ({forward - bare:+.1f} us per call)")


if __name__ == "__main__":
    parser = command_parser("bench_mlp_call_overhead.py", description=__doc__.split("\n\n")[0])  # --help; no options
    sys.exit(run_command(parser, parser.parse_args(), lambda: main() or 0))
