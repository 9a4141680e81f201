"""pyfastnn.flush_denormals: every intra-op thread flushes inside the block, and returns after it.

A float32 product of 1e-30 and 1e-10 (1e-40) is denormal: kept as such normally, zero when the thread
computing it flushes. A tensor large enough that torch splits the product over its threads shows
whether each of them was reached; with more threads than cores the pool has threads that never ran
the calling code.
"""

import types
import warnings

import pytest
import torch

import pyfastnn
import pyfastnn.denormals

DENORMAL_PRODUCT = (1e-30, 1e-10)


def denormal_products(n: int = 1 << 22) -> torch.Tensor:
    """n products that are denormal unless flushed, computed by all of torch's threads."""
    a, b = DENORMAL_PRODUCT
    return torch.full((n,), a) * b


def every_thread_flushes() -> bool:
    return int((denormal_products() != 0).sum()) == 0


def no_thread_flushes() -> bool:
    return bool((denormal_products() > 0).all())


def calling_thread_flushes() -> bool:
    return bool((denormal_products(1) == 0).all())  # one element: computed on this thread


@pytest.fixture(autouse=True)
def flush_mode():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)


@pytest.fixture
def openmp_pool():
    loops = pyfastnn.info()["cpu_parallel_loops"]
    if loops != "openmp":  # tests/library/test_build.py checks that the build is OpenMP where it can be
        pytest.skip(f"reaching every pool thread needs loops on torch's OpenMP threads; this build's are {loops!r}")


@pytest.mark.parametrize("n_threads", [1, 4])
def test_every_thread_flushes_inside_and_none_after(n_threads, openmp_pool, torch_threads):
    torch_threads(n_threads)
    assert no_thread_flushes()  # the mode is off to begin with
    with pyfastnn.flush_denormals() as flushing:
        assert flushing is True
        assert every_thread_flushes() and calling_thread_flushes()
    assert no_thread_flushes() and not calling_thread_flushes()


def test_disabled_block_changes_nothing():
    with pyfastnn.flush_denormals(enabled=False) as flushing:
        assert flushing is False and no_thread_flushes()


def test_nested_blocks_keep_flushing_until_the_outer_one_ends(openmp_pool, torch_threads):
    torch_threads(4)
    with pyfastnn.flush_denormals():
        with pyfastnn.flush_denormals():
            pass
        assert every_thread_flushes()
    assert no_thread_flushes()


def test_a_pool_shrunk_inside_the_block_does_not_keep_flushing_threads(openmp_pool, torch_threads):
    # libgomp keeps the threads a smaller team leaves idle; a later, larger team reuses them.
    torch_threads(4)
    with pyfastnn.flush_denormals():
        torch_threads(1)
    torch_threads(4)
    assert no_thread_flushes()


def test_the_calling_threads_previous_mode_is_restored_on_every_thread(openmp_pool, torch_threads):
    torch_threads(4)
    torch.set_flush_denormal(True)
    try:
        with pyfastnn.flush_denormals():
            pass
        assert every_thread_flushes()  # it was on before the block: the whole pool keeps it
    finally:
        torch.set_flush_denormal(False)
        with pyfastnn.flush_denormals():  # leaving it returns every thread to the calling thread's "off"
            pass
    assert no_thread_flushes()


def test_an_exception_in_the_block_still_restores_the_mode(openmp_pool):
    with pytest.raises(RuntimeError, match="inside"):
        with pyfastnn.flush_denormals():
            raise RuntimeError("inside")
    assert no_thread_flushes() and not calling_thread_flushes()


def test_a_build_whose_loops_miss_torchs_threads_says_so(monkeypatch, torch_threads):
    real = pyfastnn.denormals.native
    serial = types.SimpleNamespace(  # as a build whose parallel_for runs every index on the caller
        flush_denormal_enabled=real.flush_denormal_enabled, parallel_loops="serial",
        set_flush_denormal_on_threads=lambda on, min_threads: int(torch.set_flush_denormal(on)))
    monkeypatch.setattr(pyfastnn.denormals, "native", serial)
    torch_threads(2)
    with pytest.warns(RuntimeWarning, match="only 1 of torch's 2 threads"):
        with pyfastnn.flush_denormals() as flushing:
            assert flushing is False and calling_thread_flushes()
    assert not calling_thread_flushes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning raised where the block begins
        with pytest.raises(RuntimeWarning):
            with pyfastnn.flush_denormals():
                pass
    assert not calling_thread_flushes()


def test_a_thread_started_inside_the_block_keeps_its_inherited_mode(torch_threads):
    # New threads inherit the floating-point environment (as documented): flushing, and it stays.
    from concurrent.futures import ThreadPoolExecutor

    torch_threads(1)  # each check computes on the thread that runs it
    with ThreadPoolExecutor(1) as inside, ThreadPoolExecutor(1) as outside:
        with pyfastnn.flush_denormals():
            inside.submit(lambda: None).result()  # its worker thread starts inside the block
        outside.submit(lambda: None).result()  # ... and this one after it
        assert inside.submit(calling_thread_flushes).result()
        assert not outside.submit(calling_thread_flushes).result() and not calling_thread_flushes()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_a_dropped_out_output_at_the_smallest_normal_float_keeps_its_side_while_flushing(activation, torch_threads):
    """relu and leaky_relu read only the sign of a hidden layer's saved output. Scaled back by (1 - p)
    after dropout, a kept output just above float32's smallest normal could round down to a denormal,
    which a flushing CPU reads as 0: the other side of the kink (no gradient, or the slope's)."""
    from pyfastnn.testing import reference_mlp

    p = 0.5381887415507687  # fl(1 / (1 - p)) * fl(1 - p) < 1
    code = pyfastnn.ACTIVATIONS.index(activation)
    x, w1 = torch.zeros(64, 1), torch.zeros(16, 1)
    b1 = torch.full((16,), torch.finfo(torch.float32).tiny)  # every pre-activation: the smallest normal
    w2 = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    ops = torch.ops.pyfastnn
    torch_threads(1)  # every pass on this thread, which flushes
    with pyfastnn.flush_denormals():
        assert calling_thread_flushes()
        out, hidden, preacts, masks = ops.fused_mlp_forward(x, [w1, w2], [b1, None], [code, 0], 0.01, [p, 0.0], True)
        grad = torch.ones_like(out)
        _, _, grad_biases = ops.fused_mlp_backward(grad, x, [w1, w2], out, hidden, preacts, masks, [code, 0], 0.01,
                                                   [p, 0.0], [False, False, False, True, False])
    assert 0 < int(masks[0].sum()) < masks[0].numel()
    b1 = b1.clone().requires_grad_()
    expected = reference_mlp(x, [w1, w2], [b1, None], [activation, "identity"], 0.01, keep_masks=list(masks),
                             dropout=[p, 0.0])
    (expected_grad,) = torch.autograd.grad(expected, [b1], grad)
    torch.testing.assert_close(grad_biases[0], expected_grad)
