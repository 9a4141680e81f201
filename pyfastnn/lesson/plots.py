"""Pictures for the lesson: activation functions, training curves, a grid of predictions (PNG)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..command import check_number
from ..files import atomic_write, check_output_file
from ..functional import fused_linear


def _figure(**kwargs):
    """A matplotlib Figure drawn without pyplot: no backend is chosen, so a notebook's or a GUI
    session's stays as it was, and none needs a display. MPLBACKEND is set aside for the first
    import of matplotlib, the one that reads it: a name matplotlib does not know there would stop
    the import itself, after a whole training run."""
    requested = os.environ.pop("MPLBACKEND", None) if "matplotlib" not in sys.modules else None
    try:
        import matplotlib
        from matplotlib.figure import Figure
    finally:
        if requested is not None:
            os.environ["MPLBACKEND"] = requested
    if requested is not None:
        with contextlib.suppress(Exception):  # a valid name is the user's choice, for their own plots
            matplotlib.rcParams["backend"] = requested
    return Figure(**kwargs)


#: The slope plot_activations draws leaky_relu with: steeper than the library's default 0.01, so
#: that the negative side is visibly not flat.
PLOTTED_NEGATIVE_SLOPE = 0.1


def plot_activations(path, names: Sequence[str] = ("sigmoid", "relu", "tanh", "leaky_relu", "gelu", "silu",
                                                   "softmax")) -> Path:
    """Each activation and its derivative, both computed by pyfastnn's fused op and its backward
    (``names``: one activation name, or several). ``"softmax"``, the lesson's output function (not a
    layer activation: ``F.cross_entropy`` applies it to the logits), is drawn as the lesson draws it,
    over all the points of the x axis at once, by ``torch.softmax``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("plot_activations needs at least one activation name")
    x = torch.linspace(-5, 5, 201, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    one = torch.ones(1, 1, dtype=torch.float64)
    cols = 4 if len(names) > 6 else 3
    rows = -(-len(names) // cols)
    fig = _figure(figsize=(4 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        if name == "softmax":
            ax.plot(x.detach().numpy(), torch.softmax(x.detach().reshape(-1), 0).numpy(), label="softmax")
            ax.set_title(f"softmax (over all {x.shape[0]} points; sum = 1)")
        else:
            y = fused_linear(x, one, None, activation=name, negative_slope=PLOTTED_NEGATIVE_SLOPE)
            (dy,) = torch.autograd.grad(y.sum(), x)
            ax.plot(x.detach().numpy(), y.detach().numpy(), label=name)
            ax.plot(x.detach().numpy(), dy.numpy(), "--", label="derivative")
            ax.set_title(f"{name} (slope {PLOTTED_NEGATIVE_SLOPE} below 0)" if name == "leaky_relu" else name)
        ax.grid(True)
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: List[Dict], path) -> Path:
    """Loss and accuracy per epoch, train and test."""
    if not history:
        raise ValueError("plot_training_curves: the history holds no epoch to plot")
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["test_accuracy"] for h in history], "o-", label="test")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="fraction correct")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax):
        ax.grid(True)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no ticks at 1.5
        if len(epochs) < 3:  # too few whole numbers in the range for the locator: it falls back to fractions
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    # Fixed margins for this fixed layout: tight_layout would draw the figure once more to measure it.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    return _save(fig, path)


def plot_loss(losses: Union[Sequence[float], Mapping[str, Sequence[float]]], path, title: str = "Training loss") -> Path:
    """A loss curve per epoch (e.g. the from-scratch XOR network's), or several, by label."""
    curves = dict(losses) if isinstance(losses, Mapping) else {None: losses}
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(list(curve), label=label)
    ax.set(title=title, xlabel="epoch", ylabel="loss")
    ax.grid(True)
    if len(curves) > 1 or None not in curves:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, path,
                     columns: int = 8, title: Optional[str] = None) -> Path:
    """A grid of test images titled with prediction (and truth when wrong, in red), under ``title``.

    The grid is one image (the digits tiled with white gaps) under one set of axes with a caption
    per tile: a fraction of the time of one axes per digit, which the training command pays once.
    """
    check_number("columns", columns, 1, integer=True)
    n = images.shape[0]
    rows = max(1, -(-n // columns))
    height, width = images.shape[-2:] if images.dim() >= 3 else (28, 28)
    gap_x, caption = 4, 10  # pixels between tiles, and above each for its caption
    cell_w, cell_h = width + gap_x, height + caption
    mosaic = np.full((rows * cell_h, columns * cell_w), np.nan)
    pixels = images.reshape(n, height, width).to(torch.float32).numpy()
    header = 0.4 if title else 0.0  # inches above the grid for the title
    figure_height = 1.8 * rows + header
    fig = _figure(figsize=(1.5 * columns, figure_height))
    ax = fig.add_axes((0.005, 0.01, 0.99, 0.98 - header / figure_height))
    if title:
        fig.text(0.5, 1 - header / 2 / figure_height, title, ha="center", va="center", fontsize=11)
    ax.axis("off")
    for i in range(n):
        row, column = divmod(i, columns)
        top, left = row * cell_h + caption, column * cell_w + gap_x // 2
        tile = pixels[i]
        span = tile.max() - tile.min()
        mosaic[top:top + height, left:left + width] = (tile - tile.min()) / span if span > 0 else 0.0
        predicted, truth = int(predictions[i]), int(labels[i])
        right = predicted == truth
        text = f"\u2713 {predicted}" if right else f"\u2717 {predicted} (true {truth})"
        ax.text(left + width / 2, top - 1.5, text, ha="center", va="bottom", fontsize=9,
                color="green" if right else "red")
    import matplotlib

    colormap = matplotlib.colormaps["gray"].with_extremes(bad="white")  # the gaps between tiles
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto",
              interpolation="nearest")
    return _save(fig, path)


#: The PNG text field (``Software``) every lesson picture carries, by which a later run tells the
#: pictures it may replace from a user's file of the same name (:func:`drawn_by_pyfastnn`).
PICTURE_SOFTWARE = "pyfastnn"


def _save(fig, path) -> Path:
    """Writes the figure atomically in the format its suffix names (PNG when it has none)."""
    path = check_output_file(path, "picture")  # a file in its folder's place is named; /dev/stdout is taken
    image_format = path.suffix[1:].lower() or "png"
    metadata = {"Software": PICTURE_SOFTWARE} if image_format == "png" else None
    with atomic_write(path) as f:
        fig.savefig(f, format=image_format, dpi=100, metadata=metadata)
    return path


def drawn_by_pyfastnn(path) -> bool:
    """Whether ``path`` is a PNG file whose ``Software`` text field is :data:`PICTURE_SOFTWARE` (a
    picture a lesson command drew). Pillow (which matplotlib requires) reads the text fields without
    decoding the image."""
    from PIL import Image

    if not Path(path).is_file():  # reading a pipe or a device could block
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PICTURE_SOFTWARE
    except (OSError, Image.DecompressionBombError):  # not an image (UnidentifiedImageError), unreadable, huge
        return False
