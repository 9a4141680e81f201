"""The neural-network lesson, rebuilt on pyfastnn: an application of the library, never a part of it.

- :mod:`~pyfastnn.lesson.models`: the perceptron, the from-scratch numpy network and its fused twin,
  SimpleNN for XOR and the MNIST classifier;
- :mod:`~pyfastnn.lesson.data`: MNIST / Fashion-MNIST IDX files as tensors and shuffled batches;
- :mod:`~pyfastnn.lesson.train`: ``pyfastnn train`` (the loop, metrics, pictures, CUDA graphs), with
  :mod:`~pyfastnn.lesson.settings` (``TrainConfig``), :mod:`~pyfastnn.lesson.checkpoint` (what
  ``--resume`` reads, checked) and :mod:`~pyfastnn.lesson.processes` (a DDP run's processes);
- :mod:`~pyfastnn.lesson.demo`: ``pyfastnn demo``, the lesson end to end;
- :mod:`~pyfastnn.lesson.plots`: the PNG pictures.

It needs the ``lesson`` extra (numpy, tqdm, matplotlib): ``pip install "pyfastnn[lesson]"``.
``import pyfastnn`` never imports it; the ``train`` and ``demo`` commands load it when they run.

Example:
    >>> import torch
    >>> from pyfastnn.lesson import MNISTClassifier
    >>> MNISTClassifier()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

# The packages the lesson needs beyond the library's, and how to install them: described in the
# library, where they can be read without the lesson (which needs them to import).
from ..extras import LESSON_INSTALL_COMMAND as INSTALL_COMMAND
from ..extras import LESSON_REQUIREMENTS as REQUIREMENTS
from ..extras import missing_lesson_requirements

_missing = missing_lesson_requirements()
if _missing:
    # One line naming what is missing and how to get it, before any lesson module fails on it.
    raise ModuleNotFoundError(f"the pyfastnn lesson needs {', '.join(_missing)}, which "
                              f"{'is' if len(_missing) == 1 else 'are'} not installed: {INSTALL_COMMAND}",
                              name=_missing[0])

from .data import Batches, IDXError, find_mnist, load_fashion_mnist, load_mnist, normalize, read_idx  # noqa: E402
from .models import (MNISTClassifier, NeuralNetwork, NumpyTwoLayerNet, Perceptron, SimpleNN, TwoLayerNet,  # noqa: E402
                     XOR_INPUTS, XOR_TARGETS, AND_TARGETS, OR_TARGETS)
# The train() function stays in its module: exported here it would hide the module pyfastnn.lesson.train.
from .settings import TrainConfig  # noqa: E402
from .train import TrainResult, evaluate, make_adam  # noqa: E402

__all__ = [
    "Perceptron", "NumpyTwoLayerNet", "NeuralNetwork", "TwoLayerNet", "SimpleNN", "MNISTClassifier",
    "XOR_INPUTS", "XOR_TARGETS", "AND_TARGETS", "OR_TARGETS",
    "IDXError", "read_idx", "load_mnist", "load_fashion_mnist", "find_mnist", "normalize", "Batches",
    "TrainConfig", "TrainResult", "evaluate", "make_adam",
    "REQUIREMENTS", "INSTALL_COMMAND",
]
