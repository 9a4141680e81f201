import os
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)

_SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: $PYFASTNN_MNIST, else ../shared/data/mnist beside the project.

    Missing data skips locally but fails under CI, where the files are always provided.
    """
    path = Path(os.environ.get("PYFASTNN_MNIST", _SHARED_MNIST))
    if not (path / "t10k-images-idx3-ubyte.gz").exists() and not (path / "t10k-images-idx3-ubyte").exists():
        message = f"MNIST IDX files not found at {path} (set PYFASTNN_MNIST)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
