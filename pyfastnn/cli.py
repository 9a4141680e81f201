"""Command line: ``pyfastnn info | bench | train | demo`` (also ``python -m pyfastnn ...``)."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
from typing import Callable, NoReturn, Optional, Sequence

from ._version import __version__
from .command import (EXIT_FAILURE, EXIT_USAGE, command_parser, debug_requested, interrupted_status, run_command,
                      terminate_on_sigterm)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (torchrun, docker, SLURM) stops a command like Ctrl-C: files being written are cleaned up.
    status: Optional[int] = None
    try:  # Ctrl-C while a command's modules load, before its own handling starts
        with terminate_on_sigterm():
            status = _main(argv)
    except KeyboardInterrupt as e:
        if debug_requested(argv):
            raise
        if status is not None:  # a signal as the command ended (torchrun stopping the other ranks): its status stands
            return status
        print("pyfastnn: interrupted", file=sys.stderr)
        return interrupted_status(e)
    return status


def run() -> NoReturn:
    """The ``pyfastnn`` program (and ``python -m pyfastnn``): :func:`main` on ``sys.argv``, its status
    the exit status.

    Printed lines reach a pipe or log file as they are printed, with what the stream's encoding
    cannot show escaped (``\\u65e5``); output that cannot be written (a reader gone, as in
    ``| head -1``, or a full disk) stops the output, not the command. Once the
    command is done, Ctrl-C and SIGTERM are ignored (they would turn a finished command's status into
    130 / 143), and the process ends after the exit handlers, without the half second Python and
    torch take to tear their modules down; under a profiler, tracer or ``python -i`` it exits the
    usual way.
    """
    outputs = []
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:  # closed by the caller (2>&-): the progress bar and messages go nowhere
            stream = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        guarded = _OutputDroppedWhenItCannotBeWritten(stream)
        guarded.flush()  # what was printed before, through the same check
        if hasattr(stream, "reconfigure"):  # a path the terminal's encoding cannot show is escaped, not fatal
            stream.reconfigure(line_buffering=True, errors="backslashreplace")
        outputs.append(guarded)
        setattr(sys, name, guarded)
    try:
        status = main()
    except SystemExit as request:  # argparse's --help, --version and usage errors (integer codes) end here too
        status = 0 if request.code is None else request.code
    for late in (signal.SIGINT, signal.SIGTERM):  # the command is done; Python keeps SIG_IGN to the end
        signal.signal(late, signal.SIG_IGN)
    for output in outputs:
        output.flush()
    lost = next((output.error for output in outputs if output.error is not None
                 and not isinstance(output.error, BrokenPipeError)), None)
    if lost is not None and status == 0:  # a full disk under `> log`: the user did not get the output
        print(f"{_program(sys.argv[1:])}: error: the output could not be written ({lost.strerror or lost})",
              file=sys.__stderr__)
        status = EXIT_FAILURE
    if _watched():
        sys.exit(status)
    atexit._run_exitfuncs()  # coverage, weakref finalizers, users' hooks: all that teardown would run
    _flush_native_output()
    os._exit(status)


def _watched() -> bool:
    """Whether a profiler, tracer, debugger or coverage tool watches the process, or ``python -i``
    waits for it: they need the usual exit (``python -m cProfile -o FILE`` writes FILE after the
    program returns). From Python 3.12 such tools may register with ``sys.monitoring`` (PEP 669)
    instead of ``sys.setprofile``/``sys.settrace``, as cProfile does."""
    if sys.getprofile() is not None or sys.gettrace() is not None or sys.flags.inspect:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def _flush_native_output() -> None:
    """Flushes what native libraries printed through C's stdio (os._exit would drop it)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not POSIX)
        pass


class _OutputDroppedWhenItCannotBeWritten:
    """The program's stdout or stderr: once output cannot be written (the pipe's reader has gone,
    ``pyfastnn train ... | head -1``; a full disk), the rest of it is dropped and the command goes on
    to write its files and exit as usual, instead of stopping at its next line or progress-bar
    update. ``error`` keeps what stopped the output."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.error: Optional[OSError] = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self._stream.write(text)
            except OSError as error:
                self._drop_from_now_on(error)
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as error:
                self._drop_from_now_on(error)

    def _drop_from_now_on(self, error: OSError) -> None:
        self.error = error
        try:  # what is still buffered goes nowhere too, instead of failing again at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()
        except (OSError, ValueError):  # a stream without a file descriptor: dropped here alone
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


#: The subcommands and their one-line help.
_COMMANDS = {
    "info": "versions, compiled backends, CPU code path, threads (see info --help)",
    "bench": "fused_linear vs eager / torch.compile / bare GEMM, on the CPU or a GPU (see bench --help)",
    "train": "train the lesson's MNIST classifier (see train --help)",
    "demo": "the neural-network lesson end to end (see demo --help)",
}


def _program(argv: Sequence[str]) -> str:
    """The name a command's error lines start with: ``pyfastnn train``, or ``pyfastnn``."""
    return f"pyfastnn {argv[0]}" if argv and argv[0] in _COMMANDS else "pyfastnn"


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyfastnn", description="Fused Linear+activation kernels for PyTorch.")
    parser.add_argument("--version", action="version", version=f"pyfastnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in _COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmark import main as bench_main

        return bench_main(rest)
    if args.command in ("train", "demo"):
        lesson_main = _lesson_command(args.command, rest)
        return EXIT_FAILURE if lesson_main is None else lesson_main(rest)
    if args.command != "info":  # options but no command
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _info_main(rest)


def _info_main(argv: Sequence[str]) -> int:
    parser = command_parser("pyfastnn info", description="The versions, compiled backends, CPU code path and threads "
                                                         "of this pyfastnn build.",
                            examples=("pyfastnn info", "pyfastnn info --json"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    def show() -> int:
        from .info import info

        details = info()
        if args.json:
            print(json.dumps(details, indent=2))
        else:
            width = max(map(len, details))
            for key, value in details.items():
                print(f"{key:<{width}}  {value}")
        return 0

    return run_command(parser, args, show)


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
