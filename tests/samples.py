"""The one generator of test inputs for the fused ops, and the PyTorch reference they must match."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyfastnn

DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# (rtol, atol) per dtype for comparisons against the PyTorch reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The comparison every test uses: per-dtype tolerances, the absolute one on the tensor's scale.

    Gradients of weight and bias are sums over every row; summed in another order (or rounded once
    more, in bfloat16) they differ by rounding proportional to the largest value, so an element that
    cancels to near zero is judged against the tensor's magnitude rather than its own.
    """
    rtol, atol = TOLERANCES[dtype]
    if expected.numel():
        atol *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=True)


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


def reference(input, weight, bias=None, activation="relu", negative_slope=0.01):
    """What fused_linear must equal: act(F.linear(...)) from stock PyTorch."""
    pre = F.linear(input, weight, bias)
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, negative_slope),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
    }[activation](pre)


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
)

SMALL = {"nd_no_features", "empty_batch", "odd", "odd_no_bias", "nd", "nd_no_bias", "input_transposed",
         "weight_transposed", "sliced", "wide_tail"}


def _make(shape, dtype, device, layout, generator, scale=1.0):
    # Drawn on the CPU in float64 from one generator, so every device and dtype sees the same values.
    if layout == "transposed":
        return (torch.randn(tuple(reversed(shape)), generator=generator, dtype=torch.float64) * scale
                ).to(dtype=dtype, device=device).t()
    if layout == "sliced":
        big = torch.randn((shape[0], shape[1] * 2), generator=generator, dtype=torch.float64) * scale
        return big.to(dtype=dtype, device=device)[:, ::2]
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


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
                    in_layout = {"input_t": "transposed", "sliced": "sliced"}.get(layout, "plain")
                    w_layout = {"weight_t": "transposed", "sliced": "sliced"}.get(layout, "plain")
                    if in_layout == "plain" or len(batch) != 1:
                        x = _make((*batch, k), dtype, device, "plain", generator)
                    else:
                        x = _make((batch[0], k), dtype, device, in_layout, generator)
                    # nn.Linear-like scale keeps pre-activations O(1), where every activation is curved.
                    w = _make((n, k), dtype, device, w_layout, generator, scale=max(k, 1) ** -0.5)
                    b = _make((n,), dtype, device, "plain", generator) if has_bias else None
                    for t in (x, w, b):
                        if t is not None:
                            t.requires_grad_(requires_grad)
                    label = f"{name}-{str(dtype).replace('torch.', '')}-{activation}"
                    if activation == "leaky_relu":
                        label += f"({slope})"
                    yield Sample(x, w, b, activation, slope, label)
