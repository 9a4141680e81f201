"""The settings of one training run, read by the loop (:mod:`pyfastnn.lesson.train`) and kept
with its checkpoint (:mod:`pyfastnn.lesson.checkpoint`)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from ..command import check_number


@dataclasses.dataclass
class TrainConfig:
    """The settings of one training run: ``pyfastnn train``'s options, for
    :func:`pyfastnn.lesson.train.train` (``from pyfastnn.lesson.train import train``).

    Attributes:
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        data: the folder with the IDX files (flat or ``<Name>/raw``); required.
        epochs, batch_size, lr, dropout, seed: the lesson's hyper-parameters (batch size per
            process under torchrun); the seed is 0 to 2**32 - 1.
        hidden_sizes, activation: the hidden layers' widths and activation (one of
            ``pyfastnn.ACTIVATIONS``), for the lesson's exercises: other architectures, other
            activation functions.
        backend: ``"fused"`` (pyfastnn's layers) or ``"torch"`` (the plain ``nn.Linear`` twin).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: the run's folder (checkpoint.pt, metrics.json, pictures); None writes nothing.
        resume: a checkpoint.pt to continue from (its settings must match).
        max_steps: stop each epoch after this many steps (quick runs, tests).
        progress: the progress bar; summaries: each epoch's one-line summary and the "nothing to
            train" line (both on rank 0 only).
        plots: the pictures; download: fetch missing files into ``data``.
        cuda_graph: the whole step as one CUDA graph; None: on CUDA in one process.
        flush_denormals: CPU: denormal floats become zero on every thread while training.
        overwrite: start a new run in an ``out`` folder that holds another run's files.
        label: free text kept in metrics.json's config (the demo marks its runs).

    Example:
        >>> from pyfastnn.lesson import TrainConfig
        >>> config = TrainConfig(data="data/mnist", epochs=1, out=None)
        >>> config.batch_size, config.lr
        (64, 0.001)
    """

    dataset: str = "mnist"
    data: Optional[str] = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    dropout: float = 0.2
    hidden_sizes: Tuple[int, ...] = (256, 128)
    activation: str = "relu"
    backend: str = "fused"
    device: str = "cpu"
    seed: int = 0
    out: Optional[str] = "runs/mnist"
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    progress: bool = True
    summaries: bool = True
    plots: bool = True
    download: bool = False
    cuda_graph: Optional[bool] = None
    flush_denormals: bool = True
    overwrite: bool = False
    label: Optional[str] = None


def check_seed(seed: int) -> None:
    """Raises :class:`~pyfastnn.command.InvalidArgument` unless ``seed`` is an integer from 0 to
    2**32 - 1, a seed of torch's CPU generator (a training run's, a perceptron's, the batches' order).

    Example:
        >>> from pyfastnn.lesson.settings import check_seed
        >>> check_seed(2 ** 32)
        Traceback (most recent call last):
        ...
        pyfastnn.command.InvalidArgument: seed must be <= 4294967295, got 4294967296
    """
    # torch's CPU generator (Mersenne Twister) keeps a seed's low 32 bits: larger ones repeat smaller ones' draws
    check_number("seed", seed, 0, 2 ** 32 - 1, integer=True)
