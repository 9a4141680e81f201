"""Functional interface: ``fused_linear`` (one layer) and ``fused_mlp`` (a whole stack of layers)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._ops import (DEFAULT_NEGATIVE_SLOPE, activation_code, check_flag, dropout_probability, run_fused_linear,
                   run_fused_mlp, slope_value)

__all__ = ["fused_linear", "fused_mlp"]


def fused_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "relu",
    *,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
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
    return run_fused_linear(input, weight, bias, activation_code(activation), slope_value(negative_slope))


def _per_layer(value, layers: int, name: str, check) -> list:
    """One value per layer: a list/tuple of exactly `layers` values, or one value for all (checked
    by `check` even when there is no layer to apply it to)."""
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise ValueError(f"pyfastnn: got {len(value)} values for {name}, expected {layers} (one per hidden layer)")
        return [check(v) for v in value]
    checked = check(value)
    return [checked] * layers


def _tensor_list(values, name: str) -> list:
    """A list from a list, tuple or other iterable of tensors (nn.ParameterList included)."""
    if isinstance(values, (torch.Tensor, str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"pyfastnn: {name} must be a list of tensors, got {type(values).__name__}")
    return list(values)


def fused_mlp(
    input: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: Union[str, None, Sequence[Optional[str]]] = "relu",
    output_activation: Optional[str] = "identity",
    dropout: Union[float, Sequence[float]] = 0.0,
    training: bool = False,
    *,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """A whole MLP, ``Linear -> activation (-> dropout)`` per hidden layer and ``Linear ->
    output_activation`` last, as ONE op forward and ONE op backward.

    Args:
        input: ``(*, in_features)``.
        weights: ``[(out_0, in_features), (out_1, out_0), ...]``, the ``nn.Linear`` layout (a list,
            tuple or ``nn.ParameterList``).
        biases: one ``(out_l,)`` tensor or ``None`` per layer; ``None`` for no biases at all.
        activation: hidden layers' activation, one name or one per hidden layer.
        output_activation: the last layer's activation.
        dropout: probability after each hidden activation (one value, or one per hidden layer);
            applied only when ``training``. Masks come from torch's generator (``torch.manual_seed``
            reproduces them) and are kept as bytes for backward.
        training: apply dropout (like ``nn.Dropout`` in ``train()`` mode).
        negative_slope: ``leaky_relu``'s slope.

    Example:
        >>> import torch, torch.nn.functional as F, pyfastnn
        >>> x = torch.randn(8, 4)
        >>> w1, b1, w2, b2 = torch.randn(16, 4), torch.randn(16), torch.randn(3, 16), torch.randn(3)
        >>> y = pyfastnn.fused_mlp(x, [w1, w2], [b1, b2], activation="relu")
        >>> torch.allclose(y, F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), atol=1e-5)
        True
    """
    weights = _tensor_list(weights, "weights")
    layers = len(weights)
    if layers == 0:
        raise ValueError("pyfastnn: fused_mlp needs at least one weight")
    biases = [None] * layers if biases is None else _tensor_list(biases, "biases")
    codes = _per_layer(activation, layers - 1, "activation", activation_code) + [activation_code(output_activation)]
    probabilities = _per_layer(dropout, layers - 1, "dropout", dropout_probability) + [0.0]
    return run_fused_mlp(input, weights, biases, codes, slope_value(negative_slope), probabilities,
                         check_flag("fused_mlp", "training", training))
