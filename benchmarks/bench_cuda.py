"""CUDA: pyfastnn against eager PyTorch, cuBLASLt's own epilogue and the bare GEMMs (needs a GPU).

    python benchmarks/bench_cuda.py [--quick] [--min-run-time S] [--json PATH]
    python benchmarks/bench_cuda.py --profile [--json PATH]

The same as ``pyfastnn bench --device cuda``: what each column means is in
``help(pyfastnn.benchmark.run_cuda)``; ``--profile`` lists the kernels each variant launches per
call, with their device time (``pyfastnn.benchmark.profile_cuda``).
"""

import sys

from pyfastnn.benchmark import main


def _names_a_device(argument: str) -> bool:
    option = argument.split("=", 1)[0]
    return len(option) >= len("--dev") and "--device".startswith(option)  # argparse takes unique prefixes


if __name__ == "__main__":
    if any(_names_a_device(argument) for argument in sys.argv[1:]):
        print("bench_cuda.py: error: --device: this script benchmarks the GPU (the CPU's: pyfastnn bench)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["--device", "cuda", *sys.argv[1:]], prog="bench_cuda.py",
                  examples=("python benchmarks/bench_cuda.py --quick", "python benchmarks/bench_cuda.py --profile")))
