"""What every ``pyfastnn`` subcommand shares: its parser, and how a mistake or failure is reported.

A bad argument value ends as argparse does (usage, then ``prog: error: argument --name: problem``,
exit status 2); any other failure prints one ``prog: error: ...`` line and exits with status 1.
``--debug`` (or ``PYFASTNN_DEBUG=1`` in the environment) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["InvalidArgument", "check_number", "command_parser", "run_command", "describe_error", "DEBUG_ENV",
           "debug_requested",
           "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated",
           "terminate_on_sigterm", "interrupted_status",
           "positive_int", "positive_float", "path_argument", "output_file_argument"]

DEBUG_ENV = "PYFASTNN_DEBUG"
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as if the signal had ended the process


class Terminated(KeyboardInterrupt):
    """SIGTERM (what torchrun, docker and SLURM send to stop a job), raised in the main thread like
    Ctrl-C's KeyboardInterrupt, so that ``finally`` blocks run and no temporary file is left behind."""


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread; the previous
    handler is restored after. Only the command line installs it: a library keeps Python's default.
    Only over the default action: a SIGTERM the parent ignores, or a handler installed by the embedding
    program, stays in force. Python runs the handler between bytecodes, so a process blocked inside
    a long C++ call (a DDP collective waiting on a dead peer) stops when that call returns."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # signal handlers can only be set from the main thread
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_status(error: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


class InvalidArgument(ValueError):
    """A setting has a value it cannot take; ``name`` is the setting (``batch_size``), ``problem`` why.

    Example:
        >>> from pyfastnn.command import InvalidArgument
        >>> str(InvalidArgument("batch_size", "must be >= 1, got 0"))
        'batch_size must be >= 1, got 0'
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem

    @property
    def option(self) -> str:
        """The command-line spelling of the setting: ``--batch-size``."""
        return "--" + self.name.replace("_", "-")


def check_number(name: str, value: object, minimum: Optional[float] = None, maximum: Optional[float] = None, *,
                 integer: bool = False, include_minimum: bool = True, include_maximum: bool = True) -> None:
    """Raises :class:`InvalidArgument` unless ``value`` is a finite number in the given range.

    Example:
        >>> from pyfastnn.command import check_number
        >>> check_number("lr", 1e-3, 0, include_minimum=False)
        >>> check_number("lr", float("nan"), 0, include_minimum=False)
        Traceback (most recent call last):
        ...
        pyfastnn.command.InvalidArgument: lr must be a finite number, got nan
        >>> check_number("epochs", 2.5, 0, integer=True)
        Traceback (most recent call last):
        ...
        pyfastnn.command.InvalidArgument: epochs must be an integer, got 2.5
        >>> check_number("lr", 10 ** 400, 0)  # beyond any float, which lr is used as
        Traceback (most recent call last):
        ...
        pyfastnn.command.InvalidArgument: lr must be a finite number, got an integer of 1329 bits
    """
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidArgument(name, f"must be an integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    else:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond any float, which the setting is used as
            raise InvalidArgument(name, f"must be a finite number, got an integer of {abs(int(value)).bit_length()} "
                                        f"bits") from None
        if not finite:
            raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (value == minimum and not include_minimum)):
        raise InvalidArgument(name, f"must be {'>=' if include_minimum else '>'} {minimum}, got {value!r}")
    if maximum is not None and (value > maximum or (value == maximum and not include_maximum)):
        raise InvalidArgument(name, f"must be {'<=' if include_maximum else '<'} {maximum}, got {value!r}")


def positive_int(text: str) -> int:
    """An integer >= 1 on the command line (a count, a size).

    Example:
        >>> from pyfastnn.command import positive_int
        >>> positive_int("64")
        64
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be >= 1, got 0
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 on the command line (a duration, a rate).

    Example:
        >>> from pyfastnn.command import positive_float
        >>> positive_float("0.2")
        0.2
        >>> positive_float("inf")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number > 0, got 'inf'
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_float.__name__ = "number > 0"


def path_argument(text: str) -> str:
    """A file or folder on the command line: ``~`` expanded as a shell would (also in ``--out=~/x``,
    which the shell leaves alone); an empty string refused.

    Example:
        >>> from pyfastnn.command import path_argument
        >>> import os
        >>> path_argument("~/runs") == os.path.join(os.path.expanduser("~"), "runs")
        True
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return os.path.expanduser(text)


path_argument.__name__ = "path"


def output_file_argument(text: str) -> str:
    """A file a command writes (``--json``): a :func:`path_argument`, or ``-`` for standard output.

    Example:
        >>> from pyfastnn.command import output_file_argument
        >>> output_file_argument("-")
        '/dev/stdout'
    """
    return "/dev/stdout" if text == "-" else path_argument(text)


output_file_argument.__name__ = "path"


_EXAMPLES_HEADING = "examples:"


class _HelpWithExamples(argparse.HelpFormatter):
    """argparse's help, the description wrapped to the terminal as usual, the examples' command lines
    as written (wrapped, a command line would no longer be one to copy)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(_EXAMPLES_HEADING):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def command_parser(prog: str, description: Optional[str] = None,
                   examples: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for a subcommand, with the shared ``--debug`` flag; ``examples``: command
    lines shown under ``--help``, as typed."""
    epilog = _EXAMPLES_HEADING + "".join(f"\n  {line}" for line in examples) if examples else None
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=_HelpWithExamples)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full Python traceback on failure (also {DEBUG_ENV}=1)")
    return parser


def debug_requested(argv: Sequence[str] = (), *, flag: bool = False) -> bool:
    """Whether the user asked for full tracebacks: ``--debug`` among ``argv`` (or ``flag``, the parsed
    option), or ``PYFASTNN_DEBUG`` set to anything but ``0`` in the environment.

    Example:
        >>> from pyfastnn.command import debug_requested
        >>> debug_requested(["train", "--debug"]), debug_requested(["train"], flag=True)
        (True, True)
    """
    return flag or "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe_error(error: BaseException) -> str:
    """One line for the user: the message alone for the errors users cause, the type name added otherwise.

    Example:
        >>> from pyfastnn.command import describe_error
        >>> describe_error(FileNotFoundError(2, "No such file or directory", "runs/x.pt"))
        'runs/x.pt: No such file or directory'
        >>> describe_error(KeyError("epoch"))
        "KeyError: 'epoch'"
    """
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error)
    if isinstance(error, (OSError, ValueError)) and message:  # files, data and values the user chose
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Runs ``body()`` for ``parser``'s parsed ``args``, turning its exceptions into the exit statuses above.

    Example:
        >>> from pyfastnn.command import command_parser, run_command
        >>> parser = command_parser("demo-command")
        >>> def body():
        ...     raise FileNotFoundError(2, "No such file or directory", "data/x.gz")
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = run_command(parser, parser.parse_args([]), body)
        >>> status, err.getvalue()
        (1, 'demo-command: error: data/x.gz: No such file or directory\\n')
    """
    debug = debug_requested(flag=bool(getattr(args, "debug", False)))
    try:
        return body()
    except InvalidArgument as e:
        if debug:
            raise
        parser.error(f"argument {e.option}: {e.problem}")  # usage and exit status 2, like argparse's own checks
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return interrupted_status(e)
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
        if debug:
            raise
        hint = "" if isinstance(e, (OSError, ValueError)) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{parser.prog}: error: {describe_error(e)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    raise AssertionError("unreachable: parser.error exits")
