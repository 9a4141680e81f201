"""Pictures for the lesson: activation functions, training curves, a grid of predictions (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_activations(path, names: Sequence[str] = ("sigmoid", "relu", "tanh", "leaky_relu", "gelu", "silu")) -> Path:
    """Each activation and its derivative, both computed by pyfastnn's fused op and its backward."""
    from .functional import fused_linear

    plt = _pyplot()
    x = torch.linspace(-5, 5, 201, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    one = torch.ones(1, 1, dtype=torch.float64)
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        y = fused_linear(x, one, None, activation=name, negative_slope=0.1)
        (dy,) = torch.autograd.grad(y.sum(), x)
        ax.plot(x.detach().numpy(), y.detach().numpy(), label=name)
        ax.plot(x.detach().numpy(), dy.numpy(), "--", label="derivative")
        ax.set_title(name)
        ax.grid(True)
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: List[Dict], path) -> Path:
    """Loss and accuracy per epoch, train and test."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["test_accuracy"] for h in history], "o-", label="test")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="fraction correct")
    for ax in (loss_ax, acc_ax):
        ax.grid(True)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_loss(losses: Sequence[float], path, title: str = "Training loss") -> Path:
    """One loss curve (e.g. the from-scratch XOR network's)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(losses))
    ax.set(title=title, xlabel="epoch", ylabel="loss")
    ax.grid(True)
    fig.tight_layout()
    return _save(fig, path)


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, path,
                     columns: int = 8) -> Path:
    """A grid of test images titled with prediction (and truth when wrong, in red)."""
    plt = _pyplot()
    n = images.shape[0]
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].reshape(28, 28).numpy(), cmap="gray")
        right = int(predictions[i]) == int(labels[i])
        text = f"{int(predictions[i])}" if right else f"{int(predictions[i])} (true {int(labels[i])})"
        ax.set_title(("\u2713 " if right else "\u2717 ") + text, color="green" if right else "red", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Writes the figure atomically in the format its suffix names (PNG when it has none) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=100)
    finally:
        _pyplot().close(fig)
    return path
