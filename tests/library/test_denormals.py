"""pyfastnn.flush_denormals: every intra-op thread flushes inside the block, and returns after it.

A float32 product of 1e-30 and 1e-10 (1e-40) is denormal: kept as such normally, zero when the thread
computing it flushes. A tensor large enough that torch splits the product over its threads shows
whether each of them was reached; with more threads than cores the pool has threads that never ran
the calling code.
"""

import contextlib

import pytest
import torch

import pyfastnn

DENORMAL_PRODUCT = (1e-30, 1e-10)


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def denormal_products(n: int = 1 << 22) -> torch.Tensor:
    """n products that are denormal unless flushed, computed by all of torch's threads."""
    a, b = DENORMAL_PRODUCT
    return torch.full((n,), a) * b


def calling_thread_flushes() -> bool:
    return bool((denormal_products(1) == 0).all())  # one element: computed on this thread


@pytest.mark.parametrize("n_threads", [1, 4])
def test_every_thread_flushes_inside_and_none_after(n_threads):
    with threads(n_threads):
        assert bool((denormal_products() > 0).all())  # the mode is off to begin with
        with pyfastnn.flush_denormals() as flushing:
            if not flushing:
                pytest.skip("this CPU has no flush-to-zero mode")
            inside = denormal_products()
            assert calling_thread_flushes()
        assert int((inside != 0).sum()) == 0  # not one thread kept a denormal
        assert bool((denormal_products() > 0).all())
        assert not calling_thread_flushes()


def test_disabled_block_changes_nothing():
    with pyfastnn.flush_denormals(enabled=False) as flushing:
        assert flushing is False and bool((denormal_products() > 0).all())


def test_the_calling_threads_previous_mode_is_restored():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        with pyfastnn.flush_denormals():
            pass
        assert calling_thread_flushes()  # it was on before the block
    finally:
        torch.set_flush_denormal(False)
        with pyfastnn.flush_denormals():  # leaving it returns every thread to the calling thread's "off"
            pass
    assert bool((denormal_products() > 0).all())


def test_an_exception_in_the_block_still_restores_the_mode():
    with pytest.raises(RuntimeError, match="inside"):
        with pyfastnn.flush_denormals():
            raise RuntimeError("inside")
    assert not calling_thread_flushes() and bool((denormal_products() > 0).all())

