"""Running the ``pyfastnn`` command in tests: in a subprocess (``python -m pyfastnn``) or in this
process, and the one error line every failure must end with."""

import subprocess
import sys


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """``python -m pyfastnn ARGS`` in a subprocess (text output captured)."""
    return subprocess.run([sys.executable, "-m", "pyfastnn", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def cli(capsys, *args):
    """Runs ``pyfastnn ARGS`` in this process: (exit status, stdout, stderr)."""
    from pyfastnn.cli import main

    try:
        status = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(err: str, prog: str) -> str:
    """The one error line, checked to be the last line and free of a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    return lines[-1]
