"""Drop-in layers built on the fused ops."""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ._ops import activation_code, canonical_activation
from .functional import _fused_linear, _fused_mlp

__all__ = ["FusedLinear", "FusedMLP", "activation_module"]


def _check_dropout(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return p


class FusedLinear(nn.Module):
    """``nn.Linear`` followed by an activation (and optionally dropout), one fused op each way.

    Parameters are named, shaped and initialised exactly like ``nn.Linear``'s (``weight`` of shape
    ``(out_features, in_features)``, optional ``bias``), so state dicts move freely between the two.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        activation: one of :data:`pyfastnn.ACTIVATIONS` (``None``/``"none"`` mean identity).
        negative_slope: ``leaky_relu``'s slope for negative inputs.
        dropout: probability of zeroing each output in ``train()`` mode, inside the fused pass (like
            ``nn.Dropout`` after the activation; identity in ``eval()``).

    Example:
        >>> import torch, pyfastnn
        >>> layer = pyfastnn.FusedLinear(784, 256, activation="relu")
        >>> layer.load_state_dict(torch.nn.Linear(784, 256).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(64, 784)).shape
        torch.Size([64, 256])
    """

    __constants__ = ["in_features", "out_features", "activation", "negative_slope", "dropout"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = 0.01,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dropout = _check_dropout(dropout)
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
        if self.dropout > 0.0 and self.training:  # a one-layer fused MLP with dropout after it
            return _fused_mlp(input, [self.weight], [self.bias], [self._activation_code], self.negative_slope,
                              [self.dropout], True)
        return _fused_linear(input, self.weight, self.bias, self._activation_code, self.negative_slope)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = 0.01,
        dropout: float = 0.0,
        copy: bool = False,
    ) -> "FusedLinear":
        """A FusedLinear computing ``dropout(activation(linear(x)))``.

        By default it shares ``linear``'s parameters (training one trains the other); ``copy=True``
        gives it independent copies instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    activation=activation, negative_slope=negative_slope, dropout=dropout, device="meta")
        take = (lambda p: nn.Parameter(p.detach().clone(), p.requires_grad)) if copy else (lambda p: p)
        layer.weight = take(linear.weight)
        if linear.bias is not None:
            layer.bias = take(linear.bias)
        return layer

    def to_linear(self) -> nn.Sequential:
        """The plain-PyTorch equivalent (``nn.Linear``, activation module, ``nn.Dropout`` if any),
        sharing parameters."""
        return nn.Sequential(*self._plain_modules(keep_identity=True))

    def _plain_modules(self, keep_identity: bool) -> List[nn.Module]:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        modules: List[nn.Module] = [linear]
        if keep_identity or self.activation != "identity":
            modules.append(activation_module(self.activation, self.negative_slope))
        if self.dropout > 0.0:
            modules.append(nn.Dropout(self.dropout))
        return modules

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.dropout > 0.0:
            text += f", dropout={self.dropout}"
        return text


class FusedMLP(nn.Module):
    """A whole MLP as ONE fused op forward and ONE backward: ``Linear -> activation (-> dropout)``
    for each hidden layer, then ``Linear -> output_activation``.

    Its layers are :class:`FusedLinear` modules that hold the parameters (initialised like
    ``nn.Linear``), registered under the indices the equivalent ``nn.Sequential`` gives its
    ``nn.Linear`` modules, so the state dicts of the two are interchangeable as they are
    (:meth:`to_sequential`, :meth:`from_sequential`). The layers are run by the fused op, not called
    one by one: hooks on them do not fire, and their activation and dropout are read once, when the
    FusedMLP is built (their parameters are read on every call).

    Args:
        sizes: ``[in_features, hidden_1, ..., out_features]`` (at least two entries).
        activation: hidden layers' activation (one of :data:`pyfastnn.ACTIVATIONS`).
        output_activation: the last layer's activation (default identity: logits).
        dropout: probability after each hidden activation, in ``train()`` mode only.
        bias: whether the layers have biases.
        negative_slope: ``leaky_relu``'s slope.

    Example:
        >>> import torch, pyfastnn
        >>> mlp = pyfastnn.FusedMLP([784, 256, 128, 10], activation="relu", dropout=0.2)
        >>> mlp(torch.randn(64, 784)).shape
        torch.Size([64, 10])
        >>> plain = mlp.to_sequential()  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        >>> plain.load_state_dict(mlp.state_dict())
        <All keys matched successfully>
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Optional[str] = "relu",
        output_activation: Optional[str] = "identity",
        dropout: float = 0.0,
        bias: bool = True,
        *,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2 or any(n < 0 for n in sizes):
            raise ValueError(f"sizes must list at least in_features and out_features (>= 0), got {sizes}")
        dropout = _check_dropout(dropout)
        activation = canonical_activation(activation)  # checked even when there is no hidden layer
        last = len(sizes) - 2
        layers = [FusedLinear(fan_in, fan_out, bias, activation if i < last else output_activation,
                              negative_slope=negative_slope, dropout=dropout if i < last else 0.0,
                              device=device, dtype=dtype)
                  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]))]
        self._set_layers(layers)

    def _set_layers(self, layers: Sequence[FusedLinear]) -> None:
        if not layers:
            raise ValueError("a FusedMLP needs at least one layer")
        slopes = {layer.negative_slope for layer in layers if layer.activation == "leaky_relu"}
        if len(slopes) > 1:
            raise ValueError(f"all leaky_relu layers of one FusedMLP need the same negative_slope, got {sorted(slopes)}")
        for before, after in zip(layers[:-1], layers[1:]):
            if before.out_features != after.in_features:
                raise ValueError(f"layer widths do not chain: {before.out_features} outputs feed "
                                 f"{after.in_features} inputs")
        self.negative_slope = slopes.pop() if slopes else 0.01
        index = 0
        for layer in layers:  # the indices nn.Sequential gives the nn.Linear modules
            self.add_module(str(index), layer)
            index += 1 + (layer.activation != "identity") + (layer.dropout > 0.0)
        # Fixed at construction: the forward pass reads these instead of every layer's attributes
        # (a few microseconds per call, a visible share at batch 1).
        self._activation_codes = [layer._activation_code for layer in layers]
        self._dropout = [layer.dropout for layer in layers]
        self._parameter_dicts = [layer._parameters for layer in layers]

    @classmethod
    def from_layers(cls, layers: Iterable[FusedLinear]) -> "FusedMLP":
        """A FusedMLP running the given layers (sharing their parameters, activations, dropout)."""
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp._set_layers(list(layers))
        return mlp

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential, *, copy: bool = False) -> "FusedMLP":
        """The FusedMLP equivalent to ``Linear, activation, (Dropout,) ..., Linear, (activation)``,
        sharing its parameters (or copies of them with ``copy=True``)."""
        from .fuse import parse_layers  # the one parser of Linear/activation/Dropout runs

        modules = list(sequential)
        layers, used = parse_layers(modules, 0)
        if used != len(modules) or not layers:
            raise ValueError("from_sequential needs a Sequential of Linear -> activation (-> Dropout) "
                             f"layers only; stopped at module {used}: {modules[used] if used < len(modules) else None}")
        fused = [FusedLinear.from_linear(linear, act, negative_slope=slope, dropout=p, copy=copy)
                 for linear, act, slope, p in layers]
        return cls.from_layers(fused)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[FusedLinear]:
        """The layers, in order."""
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> FusedLinear:
        """The index-th layer (by position, like a list)."""
        return list(self._modules.values())[index]  # type: ignore[return-value]

    def to_sequential(self) -> nn.Sequential:
        """The plain-PyTorch equivalent (``nn.Linear``/activation/``nn.Dropout`` modules), sharing
        parameters; its state dict has the same keys as this module's."""
        modules: List[nn.Module] = []
        for layer in self:
            modules.extend(layer._plain_modules(keep_identity=False))
        return nn.Sequential(*modules)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The layers' own parameter dicts: assigning a new Parameter to a layer is still seen.
        parameters = self._parameter_dicts
        try:
            weights = [p["weight"] for p in parameters]
            biases = [p["bias"] for p in parameters]
        except KeyError:  # a parametrized layer (e.g. weight_norm) computes its weight on access
            weights = [layer.weight for layer in self]
            biases = [layer.bias for layer in self]
        return _fused_mlp(input, weights, biases, self._activation_codes, self.negative_slope, self._dropout,
                          self.training)


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
