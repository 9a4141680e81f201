"""Command line: ``pyfastnn info | bench | train | demo`` (also ``python -m pyfastnn ...``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pyfastnn", description="Fused Linear+activation kernels for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_parser = commands.add_parser("info", help="versions, compiled backends, CPU code path, threads")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands.add_parser("bench", help="fused_linear vs eager / torch.compile / bare GEMM (see bench --help)",
                        add_help=False)
    commands.add_parser("train", help="train the lesson's MNIST classifier (see train --help)", add_help=False)
    commands.add_parser("demo", help="the neural-network lesson end to end (see demo --help)", add_help=False)
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmark import main as bench_main

        return bench_main(rest)
    if args.command == "train":
        from .train import main as train_main

        return train_main(rest)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .info import info

    details = info()
    if args.json:
        print(json.dumps(details, indent=2))
    else:
        width = max(map(len, details))
        for key, value in details.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
