"""Functional interface: ``fused_linear(input, weight, bias, activation)``."""

from __future__ import annotations

from typing import Optional

import torch

from ._ops import activation_code, ops

__all__ = ["fused_linear"]

_fused_linear_op = ops.fused_linear.default


def _fused_linear(input, weight, bias, code: int, negative_slope: float) -> torch.Tensor:
    """Calls the op; turns the dispatcher's generic error for a non-tensor argument into a TypeError."""
    try:
        return _fused_linear_op(input, weight, bias, code, negative_slope)
    except RuntimeError:
        for name, value in (("input", input), ("weight", weight), ("bias", bias)):
            if not isinstance(value, torch.Tensor) and not (name == "bias" and value is None):
                raise TypeError(f"pyfastnn: {name} must be a torch.Tensor, got {type(value).__name__}") from None
        raise


def fused_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "relu",
    *,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(F.linear(input, weight, bias))`` in one fused op, forward and backward.

    Args:
        input: ``(*, in_features)``; any number of leading dimensions, 0-sized ones included.
        weight: ``(out_features, in_features)``, same dtype and device as ``input``.
        bias: ``(out_features,)`` or ``None``.
        activation: one of :data:`pyfastnn.ACTIVATIONS` (``None``/``"none"`` mean identity).
        negative_slope: slope of ``leaky_relu`` for negative inputs (ignored by the others).

    Returns:
        ``(*, out_features)`` tensor, differentiable with respect to input, weight and bias.

    Example:
        >>> import torch, pyfastnn
        >>> x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
        >>> y = pyfastnn.fused_linear(x, w, b, activation="gelu")
        >>> torch.allclose(y, torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), atol=1e-6)
        True
    """
    return _fused_linear(input, weight, bias, activation_code(activation), float(negative_slope))
