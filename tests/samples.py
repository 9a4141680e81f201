"""The one generator of test inputs for the fused ops (the reference they must match is
:mod:`pyfastnn.testing`), and the checks the CPU and CUDA tests share."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Tuple

import torch

import pyfastnn
from pyfastnn.testing import DTYPES, random_tensor, split_mlp_tensors


@dataclasses.dataclass
class Sample:
    """One call of fused_linear: tensors plus keyword arguments, and a readable id."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    activation: str
    negative_slope: float
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype

    def kwargs(self) -> dict:
        return {"activation": self.activation, "negative_slope": self.negative_slope}

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.input, self.weight) + ((self.bias,) if self.bias is not None else ())

    def op_args(self) -> tuple:
        """Positional arguments of torch.ops.pyfastnn.fused_linear."""
        code = pyfastnn.ACTIVATIONS.index(self.activation)
        return (self.input, self.weight, self.bias, code, self.negative_slope)

    def __repr__(self) -> str:
        return self.name


# (name, leading input shape, in_features, out_features, bias, layout)
# layout: "contiguous", "input_t" (input is a transposed view), "weight_t" (weight is a transposed
# view), "sliced" (input and weight are strided slices of larger tensors).
SHAPES = (
    ("empty_batch", (0,), 5, 3, True, "contiguous"),
    ("one_row", (1,), 784, 256, True, "contiguous"),
    ("odd", (3,), 5, 7, True, "contiguous"),
    ("odd_no_bias", (3,), 5, 7, False, "contiguous"),
    ("mnist", (64,), 784, 256, True, "contiguous"),
    ("nd", (2, 3, 5), 7, 11, True, "contiguous"),
    ("nd_no_bias", (2, 3, 5), 7, 11, False, "contiguous"),
    ("input_transposed", (9,), 6, 4, True, "input_t"),
    ("weight_transposed", (5,), 6, 4, True, "weight_t"),
    ("sliced", (4,), 6, 5, True, "sliced"),
    ("wide_tail", (5,), 8, 45, True, "contiguous"),  # 45 columns: a full SIMD step plus a tail
    ("nd_no_features", (2, 3), 0, 4, True, "contiguous"),  # in_features = 0: output is act(bias)
    # 2 and 4 rows take the small-batch CPU kernels: 37 and 200 inputs end in a SIMD tail, 13 and 130
    # outputs in a partial block.
    ("two_rows_tails", (2,), 37, 13, True, "contiguous"),
    ("four_rows", (4,), 200, 130, True, "contiguous"),
)

SMALL = {"nd_no_features", "empty_batch", "odd", "odd_no_bias", "nd", "nd_no_bias", "input_transposed",
         "weight_transposed", "sliced", "wide_tail", "two_rows_tails"}


def sample_inputs(
    device: str = "cpu",
    dtypes: Sequence[torch.dtype] = DTYPES,
    activations: Sequence[str] = pyfastnn.ACTIVATIONS,
    requires_grad: bool = True,
    small_only: bool = False,
    seed: int = 0,
) -> Iterator[Sample]:
    """Every combination of SHAPES x dtypes x activations (leaky_relu also with slopes 0 and < 0)."""
    generator = torch.Generator().manual_seed(seed)
    for name, batch, k, n, has_bias, layout in SHAPES:
        if small_only and name not in SMALL:
            continue
        for dtype in dtypes:
            for activation in activations:
                slopes = (0.01, 0.0, -0.2) if activation == "leaky_relu" else (0.01,)
                for slope in slopes:
                    in_layout = {"input_t": "transposed", "sliced": "strided"}.get(layout)
                    w_layout = {"weight_t": "transposed", "sliced": "strided"}.get(layout)
                    # Drawn in float64 from one generator: every device and dtype sees the same values.
                    x = random_tensor((*batch, k), dtype, generator, in_layout if len(batch) == 1 else None, device)
                    # nn.Linear-like scale keeps pre-activations O(1), where every activation is curved.
                    w = random_tensor((n, k), dtype, generator, w_layout, device, scale=max(k, 1) ** -0.5)
                    b = random_tensor((n,), dtype, generator, None, device) if has_bias else None
                    for t in (x, w, b):
                        if t is not None:
                            t.requires_grad_(requires_grad)
                    label = f"{name}-{str(dtype).replace('torch.', '')}-{activation}"
                    if activation == "leaky_relu":
                        label += f"({slope})"
                    yield Sample(x, w, b, activation, slope, label)


@dataclasses.dataclass
class MLPSample:
    """One call of fused_mlp: input, per-layer weights/biases/activations/dropout, and an id."""

    input: torch.Tensor
    weights: list
    biases: list
    activations: list  # one name per layer (the last is the output activation)
    dropout: list      # one probability per layer
    negative_slope: float
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.input, *self.weights, *[b for b in self.biases if b is not None])

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, list, list]:
        """(input, weights, biases) from a flat tuple laid out like tensors()."""
        return split_mlp_tensors(tensors, [b is not None for b in self.biases])

    def op_args(self, training: bool, tensors: Optional[Sequence[torch.Tensor]] = None) -> tuple:
        """Positional arguments of torch.ops.pyfastnn.fused_mlp / fused_mlp_forward."""
        x, weights, biases = self.rebuild(tensors if tensors is not None else self.tensors())
        codes = [pyfastnn.ACTIVATIONS.index(a) for a in self.activations]
        return (x, weights, biases, codes, self.negative_slope, list(self.dropout), training)

    def __repr__(self) -> str:
        return self.name


# (name, leading input shape, widths, hidden activations + output activation, bias pattern, dropout)
MLP_SHAPES = (
    ("lesson", (64,), (784, 256, 128, 10), ("relu", "relu", "identity"), (True, True, True), 0.2),
    ("one_layer", (5,), (7, 3), ("tanh",), (True,), 0.0),
    ("one_row", (1,), (784, 256, 128, 10), ("relu", "relu", "identity"), (True, True, True), 0.2),
    ("mixed_acts", (6,), (9, 12, 8, 4), ("gelu", "sigmoid", "tanh"), (True, False, True), 0.3),
    ("leaky_silu", (3,), (5, 8, 6, 2), ("leaky_relu", "silu", "gelu_tanh"), (False, True, False), 0.1),
    # hidden leaky_relu layers with a slope >= 0 derive from their outputs; the output layer from its
    # pre-activation
    ("leaky", (4,), (6, 9, 7, 3), ("leaky_relu", "leaky_relu", "leaky_relu"), (True, True, True), 0.25),
    ("nd", (2, 3, 4), (7, 11, 5), ("relu", "sigmoid"), (True, True), 0.5),
    ("empty_batch", (0,), (5, 4, 3), ("relu", "identity"), (True, True), 0.2),
)
MLP_SMALL = {"one_layer", "mixed_acts", "leaky_silu", "leaky", "nd", "empty_batch"}


def mlp_sample_inputs(dtypes: Sequence[torch.dtype] = DTYPES, small_only: bool = False, with_dropout: bool = True,
                      requires_grad: bool = True, seed: int = 0) -> Iterator[MLPSample]:
    """Every MLP_SHAPES entry per dtype; hidden layers get the entry's dropout (0 if not with_dropout)."""
    generator = torch.Generator().manual_seed(seed)
    for name, batch, widths, activations, has_bias, p in MLP_SHAPES:
        if small_only and name not in MLP_SMALL:
            continue
        for dtype in dtypes:
            x = random_tensor((*batch, widths[0]), dtype, generator)
            weights = [random_tensor((n, k), dtype, generator, scale=k ** -0.5)
                       for k, n in zip(widths[:-1], widths[1:])]
            biases = [random_tensor((n,), dtype, generator) if bias else None
                      for n, bias in zip(widths[1:], has_bias)]
            for t in (x, *weights, *biases):
                if t is not None:
                    t.requires_grad_(requires_grad)
            dropout = [p if with_dropout else 0.0] * (len(weights) - 1) + [0.0]
            label = f"{name}-{str(dtype).replace('torch.', '')}" + ("-dropout" if with_dropout and p else "")
            yield MLPSample(x, weights, biases, list(activations), dropout, -0.2 if name == "leaky_silu" else 0.01,
                            label)


#: Whether the CUDA tests can run here: a GPU and a pyfastnn build with CUDA kernels.
CUDA_READY = torch.cuda.is_available() and pyfastnn.info()["backends"]["cuda"]


def assert_dropout_statistics(device: str, rows: int, cols: int) -> None:
    """fused_mlp's dropout on ``device`` behaves like nn.Dropout for p in (0.1, 0.2, 0.5, 0.9)."""
    identity = torch.eye(cols, device=device)
    x = torch.full((rows, cols), 3.0, device=device)
    for p in (0.1, 0.2, 0.5, 0.9):
        out = torch.ops.pyfastnn.fused_mlp(x, [identity], [None], [0], 0.01, [p], True)
        kept = out != 0
        n = kept.numel()
        # Bernoulli(1 - p): the kept count lies within 5 standard deviations of n(1 - p) ...
        assert abs(kept.sum().item() - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5
        # ... kept values are scaled by exactly 1 / (1 - p), like nn.Dropout's ...
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 3.0 / (1 - p)))
        assert set(torch.nn.Dropout(p)(x).unique().tolist()) == set(out.unique().tolist())
        # ... neighbours in a row, in a column and 4 apart (CUDA: one Philox block serves 4 elements)
        # are uncorrelated ...
        k = kept.double()
        for a, b in ((k[:, 1:], k[:, :-1]), (k[1:], k[:-1]), (k[:, 4:], k[:, :-4])):
            correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
            assert abs(correlation) < 5 / n ** 0.5
        # ... and every column and every row is kept at the same rate (no position bias).
        for rate in (k.mean(0), k.mean(1)):
            assert (rate - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / min(rows, cols)) ** 0.5
