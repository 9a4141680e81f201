"""fused_linear vs eager by CPU time on one thread: a comparison that holds on a busy machine.

    python benchmarks/bench_cpu_time.py [--rounds 15]

Wall-clock medians (bench_fused_linear.py) need a quiet machine; on a shared, oversubscribed one a
preempted call counts the other processes' time. Here everything runs on the calling thread
(torch.set_num_threads(1)) and each figure is the *minimum* over rounds of the thread's CPU time per
call (time.thread_time), which other processes do not inflate. Use it to compare two builds run one
after the other; the eager/fused ratio is measured side by side in one process.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import pyfastnn
from pyfastnn.benchmark import BENCH_ACTIVATIONS
from pyfastnn.command import command_parser, positive_int, run_command

SHAPES = [(1, 784, 256), (4, 784, 256), (64, 784, 256), (64, 256, 128), (256, 784, 256)]


def cpu_time_per_call(fn, calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    parser = command_parser("bench_cpu_time.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=15,
                        help="rounds per figure, each the CPU time of a batch of calls; the minimum is kept "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    return run_command(parser, args, lambda: _run(args))


def _run(args) -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = pyfastnn.info()
    print(f"pyfastnn {info['pyfastnn']} | torch {info['torch']} | CPU kernels {info['cpu_isa']} | 1 thread, "
          f"min CPU us per call over {args.rounds} rounds")
    print(f"{'shape':>14} {'act':>8} {'pass':>8} {'fused':>9} {'eager':>9} {'eager/fused':>11}")
    for m, k, n in SHAPES:
        for act in BENCH_ACTIVATIONS:
            x = torch.randn(m, k, requires_grad=True)
            w = (torch.randn(n, k) / k**0.5).requires_grad_()
            b = torch.randn(n, requires_grad=True)
            eager_act = pyfastnn.activation_module(act).forward
            calls = max(1, 20000 // (m * k * n // 10000 + 1))

            def fused_fwd():
                with torch.no_grad():
                    pyfastnn.fused_linear(x, w, b, activation=act)

            def eager_fwd():
                with torch.no_grad():
                    eager_act(F.linear(x, w, b))

            def fused_step():
                pyfastnn.fused_linear(x, w, b, activation=act).sum().backward()

            def eager_step():
                eager_act(F.linear(x, w, b)).sum().backward()

            for name, fused, eager in (("fwd", fused_fwd, eager_fwd), ("fwd+bwd", fused_step, eager_step)):
                fused(), eager()  # warm up
                t_fused = cpu_time_per_call(fused, calls, args.rounds)
                t_eager = cpu_time_per_call(eager, calls, args.rounds)
                print(f"{m:>4}x{k}->{n:<4} {act:>8} {name:>8} {t_fused:9.1f} {t_eager:9.1f} {t_eager / t_fused:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
