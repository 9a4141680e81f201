"""Command line: ``pyfastnn info | bench | train | demo`` (also ``python -m pyfastnn ...``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Callable, NoReturn, Optional, Sequence

from .command import EXIT_FAILURE, debug_requested, interrupted_status, terminate_on_sigterm


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (torchrun, docker, SLURM) stops a command like Ctrl-C: files being written are cleaned up.
    with terminate_on_sigterm():
        try:  # Ctrl-C while a command's modules load, before its own handling starts
            return _main(argv)
        except KeyboardInterrupt as e:
            if debug_requested(argv):
                raise
            print("pyfastnn: interrupted", file=sys.stderr)
            return interrupted_status(e)


def run() -> NoReturn:
    """The ``pyfastnn`` program (and ``python -m pyfastnn``): :func:`main` on ``sys.argv``, its status
    the exit status.

    Printed lines reach a pipe or log file as they are printed; a reader that goes away stops the
    output, not the command. Once the command is done the process ends at once: its files are
    written and closed, and the half second Python and torch would take to tear themselves down
    (in which a Ctrl-C or SIGTERM would end a finished command with 130 / 143) is skipped.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if hasattr(stream, "reconfigure"):  # a text stream (not None, as under pythonw)
            guarded = _OutputDroppedOnceItsReaderIsGone(stream)
            guarded.flush()  # what was printed before, through the pipe check
            stream.reconfigure(line_buffering=True)
            setattr(sys, name, guarded)
    status = main()
    for late in (signal.SIGINT, signal.SIGTERM):  # from now on the command is done
        signal.signal(late, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(status)


class _OutputDroppedOnceItsReaderIsGone:
    """The program's stdout or stderr: once the pipe's reader has gone (``pyfastnn train ... | head -1``),
    the rest of that output is dropped and the command goes on to write its files and exit as usual,
    instead of stopping with BrokenPipeError at its next line (or progress bar update)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_from_now_on()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_from_now_on()

    def _drop_from_now_on(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyfastnn", description="Fused Linear+activation kernels for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_parser = commands.add_parser("info", help="versions, compiled backends, CPU code path, threads")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info_parser.add_argument("--debug", action="store_true", help="show the full Python traceback on failure")
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
    if args.command in ("train", "demo"):
        lesson_main = _lesson_command(args.command, rest)
        return EXIT_FAILURE if lesson_main is None else lesson_main(rest)
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


def _lesson_command(command: str, argv: Sequence[str]) -> Optional[Callable[[Sequence[str]], int]]:
    """The ``main`` of a lesson command, imported only now: the library works without the lesson's
    extra dependencies. Without them, prints one line naming them and the command that installs
    them, and returns None."""
    try:
        if command == "train":
            from .lesson.train import main
        else:
            from .lesson.demo import main
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == __package__ or debug_requested(argv):
            raise  # a module of our own missing is a broken install, not a missing extra
        print(f"pyfastnn {command}: error: {error}", file=sys.stderr)
        return None
    return main


if __name__ == "__main__":
    run()
