"""Fused Linear+activation vs PyTorch eager, torch.compile and the bare GEMMs (CPU, float32).

    python benchmarks/bench_fused_linear.py [--quick] [--threads 1 2] [--json out.json]
"""

import sys

from pyfastnn.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
