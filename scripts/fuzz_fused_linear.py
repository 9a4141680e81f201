"""Runs N random fused_linear cases (shapes with 0/1/primes/large K, N-D and strided inputs, every
activation x dtype, bias or not, every requires_grad mix) against PyTorch; prints the mismatches.
With --mlp: random fused_mlp stacks (1-4 layers, per-layer activations, biases and dropout, training
or not) against the float64 layer-by-layer reference with the same masks. --device cuda runs every
case on the GPU. Every device draws from the same four dtypes (pyfastnn.testing.DTYPES).

    python scripts/fuzz_fused_linear.py [--cases 10000] [--seed 0] [--mlp] [--device cuda] [--seconds S]

Each mismatch is printed as it is found; --seconds stops after that long, saying how many cases ran.
"""

import argparse
import sys
import time

import torch

import pyfastnn
from pyfastnn.command import positive_float, positive_int
from pyfastnn.testing import checked_cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=positive_int, default=10000, help="random cases to run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the cases' random seed (default: %(default)s)")
    parser.add_argument("--mlp", action="store_true", help="fuzz fused_mlp instead of fused_linear")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--seconds", type=positive_float, help="stop after this many seconds (default: run every case)")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not pyfastnn.info()["cuda_available"]:
        parser.error(f"--device {args.device} needs a CUDA GPU and a CUDA build of pyfastnn (see pyfastnn info)")
    start = time.perf_counter()
    ran = mismatches = 0
    for mismatch in checked_cases(args.cases, args.seed, mlp=args.mlp, device=args.device):
        ran += 1
        if mismatch is not None:
            mismatches += 1
            print("MISMATCH", mismatch, flush=True)
        if args.seconds is not None and time.perf_counter() - start > args.seconds:
            break
    stopped = f" (stopped after --seconds {args.seconds:g})" if ran < args.cases else ""
    print(f"{ran} cases on {args.device}, {mismatches} mismatches, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s{stopped}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
