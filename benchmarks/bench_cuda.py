"""CUDA: pyfastnn against eager PyTorch, cuBLASLt's own epilogue and the bare GEMMs (needs a GPU).

    python benchmarks/bench_cuda.py [--quick] [--min-run-time S] [--json PATH]
    python benchmarks/bench_cuda.py --profile [--json PATH]

The same as ``pyfastnn bench --device cuda``: what each column means is in
``help(pyfastnn.benchmark.run_cuda)``; ``--profile`` lists the kernels each variant launches per
call, with their device time (``pyfastnn.benchmark.profile_cuda``).
"""

import sys

from pyfastnn.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--device", "cuda", *sys.argv[1:]]))
