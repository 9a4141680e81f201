"""Drop-in layers built on the fused ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._ops import activation_code, canonical_activation
from .functional import _fused_linear

__all__ = ["FusedLinear", "activation_module"]


class FusedLinear(nn.Module):
    """``nn.Linear`` followed by an activation, computed by one fused op each way.

    Parameters are named, shaped and initialised exactly like ``nn.Linear``'s (``weight`` of shape
    ``(out_features, in_features)``, optional ``bias``), so state dicts move freely between the two.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        activation: one of :data:`pyfastnn.ACTIVATIONS` (``None``/``"none"`` mean identity).
        negative_slope: ``leaky_relu``'s slope for negative inputs.

    Example:
        >>> import torch, pyfastnn
        >>> layer = pyfastnn.FusedLinear(784, 256, activation="relu")
        >>> layer.load_state_dict(torch.nn.Linear(784, 256).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(64, 784)).shape
        torch.Size([64, 256])
    """

    __constants__ = ["in_features", "out_features", "activation", "negative_slope"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = canonical_activation(activation)
        self.negative_slope = float(negative_slope)
        self._activation_code = activation_code(self.activation)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # The very same initialisation as nn.Linear (kaiming-uniform weight, fan-in-uniform bias).
    reset_parameters = nn.Linear.reset_parameters

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _fused_linear(input, self.weight, self.bias, self._activation_code, self.negative_slope)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = 0.01,
        copy: bool = False,
    ) -> "FusedLinear":
        """A FusedLinear computing ``activation(linear(x))``.

        By default it shares ``linear``'s parameters (training one trains the other); ``copy=True``
        gives it independent copies instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    activation=activation, negative_slope=negative_slope, device="meta")
        take = (lambda p: nn.Parameter(p.detach().clone(), p.requires_grad)) if copy else (lambda p: p)
        layer.weight = take(linear.weight)
        if linear.bias is not None:
            layer.bias = take(linear.bias)
        return layer

    def to_linear(self) -> nn.Sequential:
        """The plain-PyTorch equivalent (``nn.Linear`` + activation module), sharing parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return nn.Sequential(linear, activation_module(self.activation, self.negative_slope))

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text


def activation_module(activation: Optional[str], negative_slope: float = 0.01) -> nn.Module:
    """The ``torch.nn`` module computing the named activation (the reference for our kernels)."""
    name = canonical_activation(activation)
    return {
        "identity": lambda: nn.Identity(),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "sigmoid": lambda: nn.Sigmoid(),
        "tanh": lambda: nn.Tanh(),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": lambda: nn.SiLU(),
    }[name]()
