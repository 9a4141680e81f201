import os
from pathlib import Path

import pytest
import torch

_SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="K/N",
                     help="run only the collected tests at positions K, K + N, K + 2N, ... (0 <= K < N): N pytest "
                          "processes given K = 0 ... N-1 run every test once, side by side (scripts/gpu_check.sh)")


def pytest_configure(config):
    # scripts/test.sh runs one pytest-xdist worker per CPU; each takes its share of the CPUs for
    # torch's threads (N workers at one thread per CPU each would run N threads per CPU), but at
    # least 2, so the kernels' multithreaded paths still run.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(min(threads, max(2, threads // workers)))


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    k, slash, n = shard.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise pytest.UsageError(f"--shard must be K/N with whole numbers 0 <= K < N, got {shard!r}")
    k, n = int(k), int(n)
    config.hook.pytest_deselected(items=[item for index, item in enumerate(items) if index % n != k])
    items[:] = items[k::n]


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from torch's seed 0: its random draws are the same whichever tests ran
    before it in its process (pytest-xdist hands tests to its workers in no fixed order)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def cuda_context_survives(request):
    """After each test that used the GPU, wait for its kernels: a device-side assert or fault breaks
    the CUDA context for every later test in the process, so stop there, naming the test that broke
    it, rather than report each later test as failed."""
    yield
    # (a test that failed inside a graph capture left it open: its own error, not a broken context)
    if torch.cuda.is_initialized() and not torch.cuda.is_current_stream_capturing():
        try:
            torch.cuda.synchronize()
        except RuntimeError as error:  # torch.AcceleratorError is one
            # (pytest.exit inside a pytest-xdist worker ends in xdist's internal error, losing this message)
            message = (f"{request.node.nodeid} left the CUDA context broken, so no later test can run in this "
                       f"process: {error}")
            request.session.shouldstop = message
            pytest.fail(message, pytrace=False)


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op thread count (``torch_threads(n)``) for the rest of the test; the count
    it had before comes back when the test ends, passed or failed."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder of the real MNIST IDX files (``t10k-images-idx3-ubyte.gz`` and the others directly
    in it): $PYFASTNN_MNIST, else ../shared/data/mnist beside the project (an empty variable counts
    as unset, as the lesson's loader takes it). scripts/gpu_check.sh looks for the same file.

    Missing data skips locally but fails under CI, where the files are always provided.
    """
    path = Path(os.environ.get("PYFASTNN_MNIST", "").strip() or _SHARED_MNIST)
    if not (path / "t10k-images-idx3-ubyte.gz").exists() and not (path / "t10k-images-idx3-ubyte").exists():
        message = f"MNIST IDX files not found at {path} (set PYFASTNN_MNIST)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    """MNIST-format IDX files with 96 training and 40 test images: training runs in a blink."""
    import gzip
    import struct

    import numpy as np

    folder = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 40)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


@pytest.fixture
def exact_fp32():
    """float32 CUDA matmuls without TF32 for the test, so comparisons are as tight as on the CPU."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous
