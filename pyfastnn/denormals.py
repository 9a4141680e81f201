"""Flushing denormal floats on every CPU thread, for training loops on the CPU.

``torch.set_flush_denormal(True)`` changes the calling thread only; torch's intra-op threads, which
run most of a step's arithmetic, keep computing with denormals. They are not rare in training: Adam's
first moment of a unit whose gradient stays zero shrinks by beta1 every step and turns denormal after
about 800 steps, and each vector instruction that touches one then takes a slow microcode path.
:func:`flush_denormals` sets the mode on every thread (NOTE [Denormals on every thread] in
csrc/cpu/denormals.h).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

from ._ops import check_flag, native

__all__ = ["flush_denormals"]


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Within the block, CPU arithmetic flushes denormal floats (below 2**-126 in float32) to zero on
    the calling thread and on every thread of torch's intra-op pool; on exit those threads return to
    the calling thread's mode from before (flush-to-zero and denormals-are-zero together).

    Yields whether every thread of the pool flushes: False where the CPU has no such mode (nothing
    changed), or, with a warning, where this build's loops do not run one per thread of torch's pool
    (then only some threads flush; ``pyfastnn.info()["cpu_parallel_loops"]`` says how they run: every
    thread is reached with ``"openmp"``, at best some with ``"native"``, the caller alone with
    ``"serial"``). ``enabled=False``
    makes it a no-op block, for code that decides at run time. Other threads (other Python threads,
    torch's inter-op pool) keep their own mode, but a thread started inside the block inherits the
    flushing mode (new threads inherit the floating-point environment) and keeps it after the block;
    change ``torch.set_num_threads`` before the block,
    not inside it, since threads the pool had idle when the block began may join without the mode.

    Example:
        >>> import torch, pyfastnn
        >>> tiny = torch.full((4,), 1e-30)
        >>> with pyfastnn.flush_denormals() as flushing:
        ...     flushed = tiny * 1e-10  # 1e-40 is denormal in float32
        >>> bool((flushed == 0).all()) if flushing else True
        True
        >>> bool((tiny * 1e-10 > 0).all())  # outside the block denormals are kept again
        True
    """
    if not check_flag("flush_denormals", "enabled", enabled):
        yield False
        return
    threads = torch.get_num_threads()
    before = native.flush_denormal_enabled()
    reached = native.set_flush_denormal_on_threads(True, threads)
    if reached == 0:
        yield False
        return
    try:  # a warning turned into an error must restore the mode too
        if reached < threads:
            warnings.warn(f"flush_denormals: only {reached} of torch's {threads} threads flush denormals; this "
                          f"build runs its loops {native.parallel_loops!r}, not one per thread of torch's pool",
                          RuntimeWarning, stacklevel=3)
        yield reached >= threads
    finally:
        # The larger of the thread counts at entry and now: a pool shrunk inside the block keeps its
        # idle threads, which would otherwise join a later, larger team still flushing.
        native.set_flush_denormal_on_threads(before, max(threads, torch.get_num_threads()))
