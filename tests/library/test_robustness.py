"""Resources, graph reuse, threads and determinism: the op behaves like a well-made PyTorch op."""

import gc
import threading

import pytest
import torch

import pyfastnn
from pyfastnn.testing import reference


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _step(x, w, b, activation="gelu"):
    out = pyfastnn.fused_linear(x, w, b, activation)
    return (out,) + torch.autograd.grad(out, (x, w, b), torch.ones_like(out))


def _leaves(seed=0, shape=(16, 32, 24)):
    g = torch.Generator().manual_seed(seed)
    m, k, n = shape
    return [torch.randn(s, generator=g).requires_grad_() for s in ((m, k), (n, k), (n,))]


def test_10000_calls_leave_memory_flat():
    x, w, b = _leaves()
    for _ in range(500):  # warm the allocator and caches
        _step(x, w, b)
    gc.collect()
    tensors_before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    rss_before = _rss_bytes()
    for _ in range(10000):
        _step(x, w, b)
    gc.collect()
    growth = _rss_bytes() - rss_before
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10,000 forward+backward calls"
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) <= tensors_before


def test_second_forward_before_backward():
    x, w, b = _leaves()
    y1, y2 = pyfastnn.fused_linear(x, w, b, "silu"), pyfastnn.fused_linear(x, w, b, "silu")
    (y1 * 2 + y2).sum().backward()
    rx, rw, rb = (t.detach().clone().requires_grad_() for t in (x, w, b))
    r1, r2 = reference(rx, rw, rb, "silu"), reference(rx, rw, rb, "silu")
    (r1 * 2 + r2).sum().backward()
    for ours, ref in ((x, rx), (w, rw), (b, rb)):
        torch.testing.assert_close(ours.grad, ref.grad)


def test_backward_twice_needs_retain_graph_like_pytorch():
    x, w, b = _leaves()
    out = pyfastnn.fused_linear(x, w, b, "tanh")
    grad = torch.randn_like(out)
    out.backward(grad, retain_graph=True)
    first = w.grad.clone()
    out.backward(grad)
    torch.testing.assert_close(w.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(grad)


def test_concurrent_python_threads_match_sequential_results():
    inputs = [_leaves(seed) for seed in range(4)]
    expected = [_step(*leaves) for leaves in inputs]
    results = [None] * 4
    errors = []

    def work(i):
        try:
            for _ in range(50):
                results[i] = _step(*inputs[i])
        except Exception as e:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_deterministic_run_to_run(threads, torch_threads):
    torch_threads(threads)
    runs = [_step(*_leaves(7, (300, 129, 70)), activation=act) for act in ("relu", "gelu") for _ in range(2)]
    for first, second in ((runs[0], runs[1]), (runs[2], runs[3])):
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_bias_gradient_independent_of_thread_count(torch_threads):
    grads = []
    for threads in (1, 2):
        torch_threads(threads)
        grads.append(_step(*_leaves(3, (2000, 8, 40)), activation="sigmoid")[3])
    assert torch.equal(grads[0], grads[1])


def test_moderately_large_output_with_ragged_tails():
    """67M output elements over 65,537 rows of 1,025 columns (a SIMD tail on every row).

    Offsets inside the kernels are int64 (row * cols + column), so outputs beyond 2^31 elements
    index the same way; this case is the size the test machines can afford to check for real.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65537, 3, generator=g)
    w = torch.randn(1025, 3, generator=g)
    b = torch.randn(1025, generator=g, requires_grad=True)
    out = pyfastnn.fused_linear(x, w, b, "relu")
    expected = torch.relu(torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(out, expected)
    (grad_b,) = torch.autograd.grad(out, b, torch.ones_like(out))
    torch.testing.assert_close(grad_b, (expected > 0).sum(0).float(), rtol=1e-6, atol=0)
