"""Per-call Python cost of FusedMLP.forward, which reads its layers (parameters, activation,
dropout, hooks) on every call: the module's forward vs the bare op with prebuilt arguments, batch 1,
eval, interleaved rounds, medians; and, for scale, a Sequential that fuse() fuses in part (a Flatten
before the MLP, a Softmax after: a FusedMLP and six placeholders) beside that Sequential in eager
PyTorch.

    python benchmarks/bench_mlp_call_overhead.py
"""
import sys

import torch
from torch import nn

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
    eager = nn.Sequential(nn.Flatten(), *mlp.to_sequential(), nn.Softmax(-1)).eval()
    partly_fused = pyfastnn.fuse(eager)
    image = x.reshape(1, 1, 28, 28)
    cases = {"bare op": lambda: op(x, weights, biases, codes, 0.01, dropout, False),
             "FusedMLP.forward": lambda: mlp.forward(x),
             "partly fused Sequential": lambda: partly_fused(image), "eager Sequential": lambda: eager(image)}
    torch.testing.assert_close(cases["bare op"](), cases["FusedMLP.forward"]())
    torch.testing.assert_close(cases["partly fused Sequential"](), cases["eager Sequential"]())
    with torch.no_grad():
        times = time_interleaved(cases, rounds=rounds)
    bare, forward, partly, plain = (times[name] * 1e6 for name in cases)
    print(f"784-256-128-10, batch 1, eval, median of {rounds} interleaved rounds: bare op {bare:.1f} us, "
          f"FusedMLP.forward {forward:.1f} us ({forward - bare:+.1f} us per call); with a Flatten and a Softmax "
          f"around it, fused in part {partly:.1f} us, eager {plain:.1f} us")


if __name__ == "__main__":
    parser = command_parser("bench_mlp_call_overhead.py", description=__doc__.split("\n\n")[0])  # --help; no options
    sys.exit(run_command(parser, parser.parse_args(), lambda: main() or 0))
