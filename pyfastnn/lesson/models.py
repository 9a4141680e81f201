"""The neural-network lesson's models, rebuilt on pyfastnn's fused layers.

- :class:`Perceptron`: one neuron, step output, the perceptron learning rule (AND, OR; not XOR).
- :class:`NumpyTwoLayerNet`: the from-scratch numpy network with manual backprop (the reference).
- :class:`TwoLayerNet`: the same network on fused sigmoid layers, trained through autograd.
- :class:`SimpleNN`: Linear-ReLU-Linear-Sigmoid for XOR (BCE + Adam in the lesson).
- :class:`MNISTClassifier`: 784-256-128-10 with ReLU and dropout, logits out (other sizes and
  activations for the lesson's exercises).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..command import InvalidArgument, check_number
from ..functional import fused_linear
from ..nn import FusedLinear, FusedMLP
from .settings import check_seed

__all__ = ["Perceptron", "NumpyTwoLayerNet", "TwoLayerNet", "SimpleNN", "MNISTClassifier", "TorchMNISTClassifier",
           "XOR_INPUTS", "XOR_TARGETS", "AND_TARGETS", "OR_TARGETS", "check_hidden_sizes"]

XOR_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_TARGETS = np.array([[0], [1], [1], [0]], dtype=np.float64)
AND_TARGETS = np.array([0, 0, 0, 1])
OR_TARGETS = np.array([0, 1, 1, 1])


class Perceptron:
    """A single neuron: ``step(w . x + b)``, the weighted sum computed by the fused op.

    A single neuron draws one straight line, so it learns AND and OR but can never learn XOR.

    Example:
        >>> from pyfastnn.lesson import Perceptron
        >>> p = Perceptron(2, seed=0).fit([[0, 0], [0, 1], [1, 0], [1, 1]], [0, 0, 0, 1])
        >>> p.predict([[0, 0], [0, 1], [1, 0], [1, 1]]).tolist()
        [0, 0, 0, 1]
    """

    def __init__(self, n_inputs: int, seed: Optional[int] = None) -> None:
        check_number("n_inputs", n_inputs, 1, integer=True)
        if seed is not None:
            check_seed(seed)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        self.weights = torch.randn(1, int(n_inputs), dtype=torch.float64, generator=generator)
        self.bias = torch.randn(1, dtype=torch.float64, generator=generator)

    def weighted_sum(self, X) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(X, dtype=np.float64))
        return fused_linear(x, self.weights, self.bias, activation="identity").reshape(-1)

    def predict(self, X) -> np.ndarray:
        """0/1 output for each row of X (step function: 1 where the weighted sum is > 0)."""
        return (self.weighted_sum(X) > 0).to(torch.int64).numpy()

    def fit(self, X, y, epochs: int = 100, lr: float = 0.1) -> "Perceptron":
        """Perceptron rule: for each sample, ``w += lr * (target - output) * x`` (and b likewise).

        Stops early once an epoch makes no mistakes.
        """
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).reshape(-1)
        _check_training(X, epochs, lr, "lr")
        if y.shape[0] != X.shape[0]:  # zip would drop the extra rows without a word
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
        if not np.isin(y, (0, 1)).all():  # the step output is 0 or 1: other targets never stop erring
            raise ValueError(f"y must hold labels 0 and 1, got {sorted(set(y.tolist()) - {0, 1})[:5]}")
        for _ in range(epochs):
            mistakes = 0
            for xi, target in zip(X, y):
                error = float(target) - float(self.predict(xi[None, :])[0])
                if error != 0.0:
                    mistakes += 1
                    self.weights += lr * error * torch.from_numpy(xi)[None, :]
                    self.bias += lr * error
            if mistakes == 0:
                break
        return self


def _check_training(X: np.ndarray, epochs: int, learning_rate: float, name: str = "learning_rate") -> None:
    """Raises ValueError for inputs that are not rows of features, or a number of epochs or
    learning rate that cannot train."""
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples x features), got shape {X.shape}")
    if X.shape[0] == 0:  # a mean over no samples is NaN, and a step with it would make the weights NaN
        raise ValueError("X holds no samples to train on")
    if not np.isfinite(X).all():  # one step with it would make the weights NaN, silently
        raise ValueError("X holds NaN or infinite values")
    check_number("epochs", epochs, 0, integer=True)
    check_number(name, learning_rate, 0, include_minimum=False)  # 0 never learns; < 0 climbs the loss


def _check_targets(X: np.ndarray, y: np.ndarray, output_size: int) -> None:
    """Raises ValueError unless ``y`` holds one row of ``output_size`` targets per row of ``X``: a
    1-D ``y`` would broadcast against the (samples, 1) output into a (samples, samples) error."""
    expected = (X.shape[0], output_size)
    if y.shape != expected:
        raise ValueError(f"y must have shape {expected} (one row of {output_size} target(s) per sample), "
                         f"got {y.shape}" + ("; reshape it with y.reshape(-1, 1)" if y.ndim == 1 and output_size == 1 else ""))
    if not np.isfinite(y).all():
        raise ValueError("y holds NaN or infinite values")


class NumpyTwoLayerNet:
    """The lesson's from-scratch 2-layer network: sigmoid hidden and output, MSE, manual backprop.

    Weights ``randn * init_scale`` (shape ``(in, out)``; the lesson's 0.01 by default), zero biases;
    gradient descent on the batch. With the lesson's tiny initial weights every hidden unit starts
    out nearly the same and XOR training sits on the saddle at loss 0.25; ``init_scale=1.0`` breaks
    the symmetry and it learns.

    Example:
        >>> from pyfastnn.lesson import NumpyTwoLayerNet, XOR_INPUTS, XOR_TARGETS
        >>> net = NumpyTwoLayerNet(2, 4, 1, seed=0)
        >>> losses = net.fit(XOR_INPUTS, XOR_TARGETS, epochs=10, learning_rate=1.0)
        >>> len(losses)
        10
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, seed: int = 0,
                 init_scale: float = 0.01) -> None:
        for name, size in (("input_size", input_size), ("hidden_size", hidden_size), ("output_size", output_size)):
            check_number(name, size, 1, integer=True)
        # A standard deviation: 0 is one (every unit alike, the symmetry the lesson's 0.01 nearly has); NaN never trains
        check_number("init_scale", init_scale, 0)
        if isinstance(seed, numbers.Integral):  # None, a SeedSequence or a Generator: numpy's own
            check_number("seed", seed, 0, integer=True)
        rng = np.random.default_rng(seed)
        self.W1 = rng.standard_normal((input_size, hidden_size)) * init_scale
        self.b1 = np.zeros((1, hidden_size))
        self.W2 = rng.standard_normal((hidden_size, output_size)) * init_scale
        self.b2 = np.zeros((1, output_size))
        self.a2: Optional[np.ndarray] = None  # the forward pass's output, which backward reads

    @staticmethod
    def sigmoid(x: np.ndarray) -> np.ndarray:
        """The lesson's sigmoid, its input clipped to [-500, 500] so that exp cannot overflow."""
        return 1.0 / (1.0 + np.exp(-np.clip(x, -500, 500)))

    @staticmethod
    def sigmoid_derivative(a: np.ndarray) -> np.ndarray:
        """sigmoid' written from the sigmoid's output ``a``, as the lesson does: a * (1 - a)."""
        return a * (1 - a)

    def forward(self, X: np.ndarray) -> np.ndarray:
        self.z1 = X @ self.W1 + self.b1
        self.a1 = self.sigmoid(self.z1)
        self.z2 = self.a1 @ self.W2 + self.b2
        self.a2 = self.sigmoid(self.z2)
        return self.a2

    def backward(self, X: np.ndarray, y: np.ndarray, learning_rate: float = 0.1) -> None:
        """One gradient step from the cached forward pass."""
        if self.a2 is None:
            raise RuntimeError("backward needs the activations of a forward pass: call forward(X) first")
        m = X.shape[0]
        output_delta = (self.a2 - y) * self.sigmoid_derivative(self.a2)
        hidden_delta = (output_delta @ self.W2.T) * self.sigmoid_derivative(self.a1)
        self.W2 -= learning_rate * self.a1.T @ output_delta / m
        self.b2 -= learning_rate * output_delta.sum(axis=0, keepdims=True) / m
        self.W1 -= learning_rate * X.T @ hidden_delta / m
        self.b1 -= learning_rate * hidden_delta.sum(axis=0, keepdims=True) / m

    def fit(self, X, y, epochs: int = 1000, learning_rate: float = 0.1,
            print_every: Optional[int] = None) -> List[float]:
        """Trains for ``epochs`` full-batch steps; returns the MSE before each step, and prints it
        every ``print_every`` epochs in the lesson's words (``Epoch 0, Loss: 0.2500``)."""
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        _check_training(X, epochs, learning_rate)
        if print_every is not None:
            check_number("print_every", print_every, 1, integer=True)
        if X.shape[1] != self.W1.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features per sample but the network takes {self.W1.shape[0]}")
        _check_targets(X, y, self.W2.shape[1])
        losses = []
        for epoch in range(epochs):
            output = self.forward(X)
            losses.append(float(np.mean((y - output) ** 2)))
            self.backward(X, y, learning_rate)
            if print_every is not None and epoch % print_every == 0:
                print(f"Epoch {epoch}, Loss: {losses[-1]:.4f}")
        return losses

    def train(self, X, y, epochs: int = 1000, learning_rate: float = 0.1) -> List[float]:
        """The lesson's own name and output for :meth:`fit`: the loss printed every 100 epochs.

        Example:
            >>> from pyfastnn.lesson import NumpyTwoLayerNet, XOR_INPUTS, XOR_TARGETS
            >>> losses = NumpyTwoLayerNet(2, 4, 1, seed=0).train(XOR_INPUTS, XOR_TARGETS, epochs=101, learning_rate=1.0)
            Epoch 0, Loss: 0.2500
            Epoch 100, Loss: 0.2500
        """
        return self.fit(X, y, epochs, learning_rate, print_every=100)


#: The lesson's name for :class:`NumpyTwoLayerNet` (``NeuralNetwork(2, 4, 1).train(X, y)``).
NeuralNetwork = NumpyTwoLayerNet


class TwoLayerNet(nn.Module):
    """:class:`NumpyTwoLayerNet` on fused sigmoid layers, trained through autograd.

    ``fit`` applies the lesson's update rule: the gradient of ``sum((out - y)^2) / (2 m)`` (whose
    derivative is the lesson's ``(a2 - y) / m`` error term) with plain gradient descent.

    Example:
        >>> import torch
        >>> from pyfastnn.lesson import NumpyTwoLayerNet, TwoLayerNet
        >>> net = TwoLayerNet.from_numpy(NumpyTwoLayerNet(2, 4, 1, seed=0))
        >>> net(torch.zeros(1, 2, dtype=torch.float64)).shape
        torch.Size([1, 1])
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, *, dtype=None) -> None:
        super().__init__()
        self.hidden = FusedLinear(input_size, hidden_size, activation="sigmoid", dtype=dtype)
        self.output = FusedLinear(hidden_size, output_size, activation="sigmoid", dtype=dtype)

    @classmethod
    def from_numpy(cls, net: NumpyTwoLayerNet, dtype: torch.dtype = torch.float64) -> "TwoLayerNet":
        """A copy of a numpy network's weights (transposed into nn.Linear's (out, in) layout)."""
        model = cls(net.W1.shape[0], net.W1.shape[1], net.W2.shape[1], dtype=dtype)
        with torch.no_grad():
            for layer, W, b in ((model.hidden, net.W1, net.b1), (model.output, net.W2, net.b2)):
                layer.weight.copy_(torch.from_numpy(W.T))
                layer.bias.copy_(torch.from_numpy(b.reshape(-1)))
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))

    def fit(self, X, y, epochs: int = 1000, learning_rate: float = 0.1) -> List[float]:
        """Full-batch gradient descent; returns the MSE before each step (like the numpy net)."""
        dtype = self.hidden.weight.dtype
        X_array, y_array = np.asarray(X), np.asarray(y)
        _check_training(X_array, epochs, learning_rate)
        _check_targets(X_array, y_array, self.output.weight.shape[0])
        X = torch.as_tensor(X_array, dtype=dtype)
        y = torch.as_tensor(y_array, dtype=dtype)
        losses = []
        for _ in range(epochs):
            out = self(X)
            losses.append(torch.mean((y - out) ** 2).item())
            objective = ((out - y) ** 2).sum() / (2 * X.shape[0])
            grads = torch.autograd.grad(objective, list(self.parameters()))
            with torch.no_grad():
                for p, g in zip(self.parameters(), grads):
                    p -= learning_rate * g
        return losses


class SimpleNN(nn.Module):
    """The lesson's SimpleNN: Linear -> ReLU -> Linear -> Sigmoid, as two fused layers.

    Example:
        >>> import torch
        >>> from pyfastnn.lesson import SimpleNN
        >>> SimpleNN(2, 4, 1)(torch.zeros(3, 2)).shape
        torch.Size([3, 1])
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.layer1 = FusedLinear(input_size, hidden_size, activation="relu")
        self.layer2 = FusedLinear(hidden_size, output_size, activation="sigmoid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))

    def to_torch(self) -> nn.Sequential:
        """The plain-PyTorch twin (nn.Linear/nn.ReLU/nn.Linear/nn.Sigmoid) with copied weights."""
        twin = nn.Sequential(*self.layer1.to_linear(), *self.layer2.to_linear())
        return _detached_copy(twin)


class MNISTClassifier(nn.Module):
    """784 -> 256 -> 128 -> 10 with ReLU and dropout between layers; returns logits.

    The layers are one :class:`~pyfastnn.FusedMLP` (one op forward, one op backward), whose state
    dict has the keys of the lesson's ``nn.Sequential`` (``layers.0.weight``, ``layers.3.weight``,
    ``layers.6.weight`` ...). Accepts images ``(N, 1, 28, 28)`` or flat ``(N, 784)``.
    ``hidden_sizes`` and ``activation`` (of the hidden layers) are the lesson's exercises: other
    architectures (its funnel 784 -> 256 -> 64 -> 10) and other activation functions.

    Example:
        >>> import torch
        >>> from pyfastnn.lesson import MNISTClassifier
        >>> model = MNISTClassifier()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> MNISTClassifier(hidden_sizes=(256, 64), activation="gelu").layers[1]
        FusedLinear(in_features=256, out_features=64, bias=True, activation=gelu, dropout=0.2)
    """

    def __init__(self, hidden_sizes: Sequence[int] = (256, 128), dropout: float = 0.2,
                 in_features: int = 28 * 28, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        check_hidden_sizes(hidden_sizes)
        check_number("in_features", in_features, 1, integer=True)
        check_number("num_classes", num_classes, 1, integer=True)
        # Built with dropout, the layers sit at the lesson's indices (0, 3, 6: its Sequential has a
        # Dropout after each hidden ReLU whatever p is); the indices stay when p is then set.
        self.layers = FusedMLP([in_features, *hidden_sizes, num_classes], activation=activation, dropout=0.5)
        for hidden in list(self.layers)[:-1]:
            hidden.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))

    def to_torch(self) -> "TorchMNISTClassifier":
        """The plain-PyTorch twin, structured like the lesson's class, with copied weights; the two
        state dicts are interchangeable."""
        *hidden, last = self.layers
        modules: List[nn.Module] = []
        for layer in hidden:  # Linear, activation (none for identity), Dropout (even at p = 0, as in the lesson)
            plain = [m for m in layer.to_linear() if not isinstance(m, (nn.Identity, nn.Dropout))]
            modules += [*plain, nn.Dropout(layer.dropout).train(layer.training)]
        modules += [m for m in last.to_linear() if not isinstance(m, nn.Identity)]
        twin = TorchMNISTClassifier(nn.Sequential(*modules))
        twin.training = twin.flatten.training = twin.layers.training = self.training  # the rest: their layers' modes
        return _detached_copy(twin)


def check_hidden_sizes(hidden_sizes: Sequence[int]) -> None:
    """Raises :class:`~pyfastnn.command.InvalidArgument` unless ``hidden_sizes`` lists the widths of
    one or more hidden layers, each an integer from 1 to 2**31 - 1 (a width of 0 would build a
    network with no hidden units)."""
    if not isinstance(hidden_sizes, (list, tuple)) or not hidden_sizes:
        raise InvalidArgument("hidden_sizes", f"must be the widths of one or more hidden layers, got {hidden_sizes!r}")
    for width in hidden_sizes:  # beyond int32, no layer's weight would fit in any memory
        check_number("hidden_sizes", width, 1, 2 ** 31 - 1, integer=True)


class TorchMNISTClassifier(nn.Module):
    """The lesson's classifier in plain PyTorch: ``flatten``, then ``layers``, an ``nn.Sequential`` of
    ``Linear, ReLU, Dropout, ..., Linear`` (what :meth:`MNISTClassifier.to_torch` gives).

    Example:
        >>> from pyfastnn.lesson import MNISTClassifier
        >>> twin = MNISTClassifier().to_torch()
        >>> [name for name, _ in twin.named_parameters()][:2]
        ['layers.0.weight', 'layers.0.bias']
    """

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(x))


def _detached_copy(model: nn.Module) -> nn.Module:
    """Gives every parameter of ``model`` its own storage (to_linear() shares with the fused layer)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().clone(), p.requires_grad))
    return model
