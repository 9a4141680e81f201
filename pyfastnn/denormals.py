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
from typing import Iterator

from ._ops import native

__all__ = ["flush_denormals"]


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Within the block, CPU arithmetic flushes denormal floats (below 2**-126 in float32) to zero on
    the calling thread and on every thread of torch's intra-op pool; on exit every one of those
    threads returns to the calling thread's mode from before. Yields whether the CPU has the mode
    (False: nothing changed). ``enabled=False`` makes it a no-op block, for code that decides at run
    time. Threads added later by ``torch.set_num_threads`` start without the mode.

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
    if not enabled:
        yield False
        return
    before = native.flush_denormal_enabled()
    supported = native.set_flush_denormal_on_all_threads(True)
    try:
        yield supported
    finally:
        if supported:
            native.set_flush_denormal_on_all_threads(before)
