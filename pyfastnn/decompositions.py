"""The fused ops written as stock ATen ops, for programs that must run without pyfastnn.

``torch.export`` keeps each fused call as one ``pyfastnn::`` node; runtimes that only know ATen
(the ONNX exporter, ExecuTorch, another machine without this extension) need it spelled out.
:func:`decompositions` is the table ``ExportedProgram.run_decompositions`` takes for that: each
op becomes ``F.linear`` and the activation module of the library's own table, layer by layer.

The table is handed over, never registered in torch's global decomposition registry: torch's
fake-tensor mode would then prefer it to the ops' own fake kernels under dynamic shapes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ._ops import ACTIVATIONS, dropout_runs, ops
from ._patterns import activation_module

__all__ = ["decompositions"]


def _linear_layer(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: int,
                  negative_slope: float) -> torch.Tensor:
    """``pyfastnn::fused_linear``: ``act(F.linear(input, weight, bias))``."""
    return activation_module(ACTIVATIONS[activation], negative_slope)(F.linear(input, weight, bias))


def _mlp(input: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
         activations: List[int], negative_slope: float, dropout: List[float], training: bool) -> torch.Tensor:
    """``pyfastnn::fused_mlp``: the layers one by one, each followed by ``F.dropout`` where it has a
    probability and ``training`` is set (nn.Dropout's distribution; the masks are ATen's draws, not
    the fused kernel's)."""
    x = input
    for weight, bias, activation, p in zip(weights, biases, activations, dropout):
        x = _linear_layer(x, weight, bias, activation, negative_slope)
        if dropout_runs(p, training):
            x = F.dropout(x, p, training=True)
    return x


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """The fused ops as stock ATen ops: a table for ``ExportedProgram.run_decompositions``.

    A program decomposed with it holds no ``pyfastnn::`` op, so it runs where pyfastnn is not
    installed and converts to ONNX (``torch.onnx.export(program)``). Values equal the fused ops
    within rounding; in training mode, dropout draws its masks from ATen's dropout (the same
    distribution, other masks). To lower the rest of the program to core ATen as well, update the
    default table with it: ``table = torch.export.default_decompositions()`` then
    ``table.update(pyfastnn.decompositions())`` (``table | pyfastnn.decompositions()`` would keep
    pyfastnn's entries only: the default table keeps its own outside the dict).

    Example:
        >>> import torch
        >>> import pyfastnn
        >>> model = pyfastnn.FusedMLP([8, 16, 4], activation="gelu").eval()
        >>> x = torch.randn(3, 8)
        >>> program = torch.export.export(model, (x,)).run_decompositions(pyfastnn.decompositions())
        >>> any(str(node.target).startswith("pyfastnn") for node in program.graph.nodes)
        False
        >>> torch.allclose(program.module()(x), model(x), atol=1e-6)
        True
    """
    return {ops.fused_linear.default: _linear_layer, ops.fused_mlp.default: _mlp}
