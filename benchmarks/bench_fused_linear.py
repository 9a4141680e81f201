"""Fused Linear+activation vs PyTorch eager, torch.compile and the bare GEMMs (CPU, float32).

    python benchmarks/bench_fused_linear.py [--quick] [--threads 1 2] [--json out.json]
"""

import sys

from pyfastnn.benchmark import main

if __name__ == "__main__":
    # Its usage and errors name this script, as the other benchmark scripts' do.
    sys.exit(main(prog="bench_fused_linear.py",
                  examples=("python benchmarks/bench_fused_linear.py --quick",
                            "python benchmarks/bench_fused_linear.py --threads 1 2 --json bench.json")))
