"""Reference implementations and random-case checkers for the fused ops, for tests and long fuzzing runs.

- :func:`reference` / :func:`reference_mlp`: what ``fused_linear`` / ``fused_mlp`` must equal, computed
  by stock PyTorch (``F.linear`` and the ``torch.nn.functional`` activations of
  :data:`REFERENCE_ACTIVATIONS`, a table written here, independent of the library's own);
- :func:`assert_close`: the comparison with per-dtype tolerances every check uses;
- :func:`random_case` / :func:`check` and :func:`random_mlp_case` / :func:`check_mlp`: random calls
  (shapes with 0, 1, primes and large K, N-D and strided inputs, every activation x dtype, biases,
  requires_grad mixes; MLP stacks with per-layer dropout) checked value by value and gradient by
  gradient against the float64 reference; :func:`run` runs many, on the CPU or a CUDA device.

The bounded property test (``tests/library/test_fuzz.py``) and ``scripts/fuzz_fused_linear.py`` both
use them. Only torch and pyfastnn are imported here.

Example:
    >>> import random
    >>> from pyfastnn.testing import check, random_case, run
    >>> check(random_case(random.Random(0))) is None  # None: no mismatch
    True
    >>> run(cases=20, seed=1, mlp=True)  # the mismatches, one line each
    []
"""

from __future__ import annotations

import dataclasses
import numbers
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyfastnn

from ._ops import DTYPES, check_flag

__all__ = ["TOLERANCES", "REFERENCE_ACTIVATIONS", "DTYPES", "assert_close", "reference", "reference_mlp",
           "Case", "MLPCase", "random_tensor", "random_case", "random_mlp_case", "build", "check", "check_mlp", "run",
           "checked_cases", "split_mlp_tensors"]

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

    Infinities and NaNs must match exactly; the scale is that of the finite values.

    Example:
        >>> import torch
        >>> from pyfastnn.testing import assert_close
        >>> assert_close(torch.tensor([100.0, 1e-4]), torch.tensor([100.0, 0.0]), torch.float32)
    """
    if dtype not in TOLERANCES:
        raise TypeError(f"assert_close: no tolerances for {dtype} (known: {', '.join(map(str, TOLERANCES))})")
    rtol, atol = TOLERANCES[dtype]
    finite = expected[torch.isfinite(expected)]
    if finite.numel():
        atol *= max(1.0, finite.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=True)


#: Each activation as stock ``torch.nn.functional`` computes it, given (pre-activation, negative_slope).
#: Written out here on purpose, not read from the library's own tables (``pyfastnn.activation_module``):
#: a wrong row there would otherwise be copied by the reference and pass unnoticed.
REFERENCE_ACTIVATIONS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "identity": lambda t, slope: t,
    "relu": lambda t, slope: F.relu(t),
    "leaky_relu": lambda t, slope: F.leaky_relu(t, slope),
    "sigmoid": lambda t, slope: torch.sigmoid(t),
    "tanh": lambda t, slope: torch.tanh(t),
    "gelu": lambda t, slope: F.gelu(t),
    "gelu_tanh": lambda t, slope: F.gelu(t, approximate="tanh"),
    "silu": lambda t, slope: F.silu(t),
}


def reference(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              activation: Optional[str] = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    """What fused_linear must equal: ``act(F.linear(...))`` from stock PyTorch, ``act`` from
    :data:`REFERENCE_ACTIVATIONS` (``None``/``"none"`` mean identity; the default slope is
    ``F.leaky_relu``'s own, written out rather than taken from the library).

    Example:
        >>> import torch
        >>> import pyfastnn
        >>> from pyfastnn.testing import reference
        >>> x, w = torch.randn(3, 4), torch.randn(2, 4)
        >>> torch.allclose(pyfastnn.fused_linear(x, w, activation="silu"), reference(x, w, activation="silu"))
        True
    """
    name = "identity" if activation in (None, "none") else activation
    if name not in REFERENCE_ACTIVATIONS:
        raise ValueError(f"reference: unknown activation {activation!r}; known: {', '.join(REFERENCE_ACTIVATIONS)}")
    return REFERENCE_ACTIVATIONS[name](F.linear(input, weight, bias), negative_slope)


def reference_mlp(input: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                  activations: Sequence[Optional[str]], negative_slope: float = 0.01,
                  keep_masks: Optional[Sequence[torch.Tensor]] = None,
                  dropout: Optional[Sequence[float]] = None) -> torch.Tensor:
    """What fused_mlp must equal: the layers one by one in stock PyTorch; keep_masks[l] (uint8, or
    None/empty for none) applies dropout after layer l (x * mask / (1 - p), rounded once).

    Example:
        >>> import torch
        >>> import pyfastnn
        >>> from pyfastnn.testing import reference_mlp
        >>> x, w1, w2 = torch.randn(5, 4), torch.randn(8, 4), torch.randn(3, 8)
        >>> out = pyfastnn.fused_mlp(x, [w1, w2], activation="tanh")
        >>> torch.allclose(out, reference_mlp(x, [w1, w2], [None, None], ["tanh", "identity"]), atol=1e-5)
        True
    """
    for name, values in (("biases", biases), ("activations", activations), ("keep_masks", keep_masks),
                         ("dropout", dropout)):
        if values is not None and len(values) != len(weights):
            raise ValueError(f"reference_mlp: {len(values)} {name} for {len(weights)} weights")
    if biases is None or activations is None:
        raise TypeError("reference_mlp: biases and activations take one entry per layer (None: no bias)")
    if keep_masks is not None and dropout is None:
        raise ValueError("reference_mlp: keep_masks need the dropout probabilities they were drawn with")
    x = input
    for layer, (w, b, activation) in enumerate(zip(weights, biases, activations)):
        x = reference(x, w, b, activation, negative_slope)
        if keep_masks is not None:
            x = _apply_dropout(x, keep_masks[layer], dropout[layer])
    return x


def _apply_dropout(x: torch.Tensor, keep_mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """``x`` after one layer's dropout, x * mask / (1 - p), with one rounding: in float32 for half
    and bfloat16, as the kernels and CUDA's nn.Dropout compute it (rounding 1 / (1 - p) to half
    first, as CPU's nn.Dropout does, moves a third of the values by an ulp, enough to flip a later
    relu near 0). A None or empty mask (a layer without dropout) leaves ``x`` as it is; any other
    holds one entry per element of ``x``, in any shape (the ops keep them as rows x features)."""
    if keep_mask is None or keep_mask.numel() == 0:
        return x
    if keep_mask.numel() != x.numel():
        raise ValueError(f"reference_mlp: a keep mask of shape {tuple(keep_mask.shape)} for a layer output of "
                         f"shape {tuple(x.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"reference_mlp: dropout probabilities are in [0, 1), got {p}")
    opmath = torch.promote_types(x.dtype, torch.float32)
    return (x.to(opmath) * keep_mask.reshape(x.shape).to(opmath) * (1.0 / (1.0 - p))).to(x.dtype)


SIZES = (0, 1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 64, 127, 257)
LARGE_K = (1031, 4099)


#: The layouts a Case's input and weight are drawn in.
LAYOUTS = ("contiguous", "input_transposed", "input_strided", "weight_transposed", "weight_strided")


@dataclasses.dataclass
class Case:
    """One random call of fused_linear: shapes, dtype, activation, layout, which tensors need a
    gradient, and the seed its tensors (:func:`build`) and incoming gradient are drawn from."""

    batch: Tuple[int, ...]
    in_features: int
    out_features: int
    dtype: torch.dtype
    activation: str
    negative_slope: float
    bias: bool
    layout: str  # contiguous | input_transposed | input_strided | weight_transposed | weight_strided
    requires_grad: Tuple[bool, bool, bool]
    seed: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:  # a misspelt layout would be tested as contiguous
            raise ValueError(f"Case: unknown layout {self.layout!r} (known: {', '.join(LAYOUTS)})")
        _check_activations("Case", (self.activation,))
        _check_dtype("Case", self.dtype)
        if (not isinstance(self.requires_grad, tuple) or len(self.requires_grad) != 3
                or not all(isinstance(flag, bool) for flag in self.requires_grad)):
            raise ValueError(f"Case: requires_grad takes three flags (input, weight, bias), got {self.requires_grad!r}")

    def describe(self) -> str:
        """One line that names the case, as a mismatch reports it."""
        return (f"batch={self.batch} {self.in_features}->{self.out_features} {self.dtype} {self.activation}"
                f"({self.negative_slope}) bias={self.bias} {self.layout} grad={self.requires_grad} seed={self.seed}"
                f" device={self.device}")


def _check_activations(what: str, activations: Sequence[str]) -> None:
    unknown = [name for name in activations if name not in pyfastnn.ACTIVATIONS]
    if unknown:
        raise ValueError(f"{what}: unknown activation {unknown[0]!r} (known: {', '.join(pyfastnn.ACTIVATIONS)})")


def _check_dtype(what: str, dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{what}: dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype!r}")


def random_case(rng: random.Random, device: str = "cpu") -> Case:
    """A random :class:`Case` drawn from ``rng`` (0, 1, primes and powers of two around SIMD widths,
    sometimes a large ``in_features``; every dtype, activation and layout).

    Example:
        >>> import random
        >>> from pyfastnn.testing import check, random_case
        >>> case = random_case(random.Random(0))
        >>> check(case) is None  # None: no mismatch
        True
    """
    ndim = rng.choice((1, 1, 1, 2, 3))
    batch = tuple(rng.choice(SIZES[:9]) for _ in range(ndim))
    in_features = rng.choice(SIZES + LARGE_K) if rng.random() < 0.15 else rng.choice(SIZES)
    return Case(
        batch=batch, in_features=in_features, out_features=rng.choice(SIZES), dtype=rng.choice(DTYPES),
        activation=rng.choice(pyfastnn.ACTIVATIONS), negative_slope=rng.choice((0.01, 0.0, 0.3, -0.5)),
        bias=rng.random() < 0.7,
        layout=rng.choice(LAYOUTS),
        requires_grad=(rng.random() < 0.7, rng.random() < 0.7, rng.random() < 0.7), seed=rng.randrange(2**31),
        device=device)


def random_tensor(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator, layout: Optional[str] = None,
                  device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values times ``scale`` of ``shape``, drawn on the CPU in float64 from
    ``generator`` (the same values on every device and in every dtype), then converted and moved;
    ``layout`` ``"transposed"`` (a transposed view of the last two dimensions) or ``"strided"``
    (every second element of a last dimension twice as long) makes it a non-contiguous view.

    Example:
        >>> import torch
        >>> from pyfastnn.testing import random_tensor
        >>> t = random_tensor((3, 4), torch.float32, torch.Generator().manual_seed(0), "strided")
        >>> t.shape, t.is_contiguous()
        (torch.Size([3, 4]), False)
    """
    def make(size) -> torch.Tensor:
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
        return values.to(dtype=dtype, device=device)

    if layout is None:
        return make(shape)
    if layout not in ("transposed", "strided"):
        raise ValueError(f"random_tensor: layout must be None, 'transposed' or 'strided', got {layout!r}")
    needed = 2 if layout == "transposed" else 1
    if len(shape) < needed:
        raise ValueError(f"random_tensor: layout {layout!r} needs at least {needed} dimension(s), "
                         f"got shape {tuple(shape)}")
    if layout == "transposed":
        return make((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    return make((*shape[:-1], shape[-1] * 2))[..., ::2]


def build(case: Case) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The case's (input, weight, bias), drawn from its seed in its layout, dtype and device."""
    g = torch.Generator().manual_seed(case.seed)
    x = random_tensor((*case.batch, case.in_features), case.dtype, g,
                      case.layout.split("_")[1] if case.layout.startswith("input") else None, case.device)
    # nn.Linear-like scale, applied before the view is taken: the weight keeps its layout.
    w = random_tensor((case.out_features, case.in_features), case.dtype, g,
                      case.layout.split("_")[1] if case.layout.startswith("weight") else None, case.device,
                      scale=max(case.in_features, 1) ** -0.5)
    b = random_tensor((case.out_features,), case.dtype, g, None, case.device) if case.bias else None
    return x, w, b


def _grad_output(out: torch.Tensor, case) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1),
                       dtype=torch.float64).to(dtype=case.dtype, device=out.device)


def _assert_made_like(out: torch.Tensor, case) -> None:
    """The op's output is in the case's dtype, on its device (assert_close compares values alone)."""
    assert out.dtype == case.dtype, f"output dtype {out.dtype} for {case.dtype} inputs"
    assert out.device.type == torch.device(case.device).type, f"output on {out.device} for inputs on {case.device}"


def _gradients(out: torch.Tensor, needs: Sequence[torch.Tensor], grad_out: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The op's gradients of ``needs``, checking that its backward leaves ``grad_out`` as it was:
    the reference is handed the same values afterwards, and would otherwise be fed the change."""
    before = grad_out.clone()
    grads = torch.autograd.grad(out, needs, grad_out)
    assert torch.equal(grad_out, before), "the op's backward wrote into the incoming gradient"
    for got, leaf in zip(grads, needs):
        assert got.dtype == leaf.dtype, f"gradient dtype {got.dtype} for a {leaf.dtype} input"
    return grads


def _assert_gradients_close(grads, expected_grads, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Gradient by gradient; `scale` divides both sides, widening the absolute tolerance by it."""
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape, f"gradient shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert_close(got / scale, want / scale, dtype)


def _within_tolerance(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    try:
        assert_close(actual, expected, dtype)
    except AssertionError:
        return False
    return True


def _mismatch(case, error: AssertionError) -> str:
    return f"{case.describe()}: {str(error).splitlines()[0] if str(error) else 'mismatch'}"


def check(case: Case) -> Optional[str]:
    """None if fused_linear matches the reference in value and every gradient, else what differs."""
    x, w, b = build(case)
    leaves = [t for t in (x, w, b) if t is not None]
    flags = case.requires_grad[:len(leaves)]
    ours_in = [t.detach().requires_grad_(r) for t, r in zip(leaves, flags)]  # clone() would drop a strided layout
    # The reference reads copies (even in float64), so an op writing into its inputs cannot hide.
    # The reference is float64 from the very same values: PyTorch's own reduced-precision paths round
    # differently by layout (an N-D strided input rounds before adding the bias, a 2-D one after).
    ref_in = [t.detach().to(torch.float64, copy=True).requires_grad_(r) for t, r in zip(leaves, flags)]
    kwargs = dict(activation=case.activation, negative_slope=case.negative_slope)
    unpack = lambda ts: (ts[0], ts[1], ts[2] if case.bias else None)  # noqa: E731
    try:
        out = pyfastnn.fused_linear(*unpack(ours_in), **kwargs)
        expected = reference(*unpack(ref_in), **kwargs)
        _assert_made_like(out, case)
        assert_close(out, expected, case.dtype)
        needs = [t for t in ours_in if t.requires_grad]
        if needs:  # an empty output too: its weight and bias (or input) gradients are zeros
            grad_out = _grad_output(out, case)
            grads = _gradients(out, needs, grad_out)
            expected_grads = torch.autograd.grad(expected, [t for t in ref_in if t.requires_grad],
                                                 grad_out.to(torch.float64))
            try:
                _assert_gradients_close(grads, expected_grads, case.dtype)
            except AssertionError:
                if case.dtype not in (torch.bfloat16, torch.float16):
                    raise
                # A gradient summed over many terms in bfloat16/float16 may carry the rounding of its
                # partial sums beyond the tolerance (a 1 -> 127 tanh layer's input gradient, say).
                eager_in = [t.detach().requires_grad_(r) for t, r in zip(leaves, flags)]
                eager = reference(*unpack(eager_in), **kwargs)
                eager_grads = torch.autograd.grad(eager, [t for t in eager_in if t.requires_grad], grad_out)
                for got, eager_grad, want in zip(grads, eager_grads, expected_grads):
                    _assert_close_or_no_worse_than_eager(got, eager_grad, want, case.dtype, "gradient")
    except AssertionError as e:
        return _mismatch(case, e)
    return None


def run(cases: int, seed: int = 0, mlp: bool = False, device: str = "cpu") -> List[str]:
    """The mismatches among `cases` random fused_linear cases (fused_mlp cases with `mlp`) on `device`.

    Example:
        >>> from pyfastnn.testing import run
        >>> run(3)
        []
        >>> run(-1)
        Traceback (most recent call last):
        ...
        ValueError: cases must be a count >= 0, got -1
    """
    return [m for m in checked_cases(cases, seed, mlp, device) if m is not None]


def checked_cases(cases: int, seed: int = 0, mlp: bool = False, device: str = "cpu") -> Iterator[Optional[str]]:
    """Checks the cases of :func:`run` one at a time: each case's mismatch, or None where it passed
    (a long run can then report as it goes, and stop early)."""
    if isinstance(cases, bool) or not isinstance(cases, numbers.Integral) or cases < 0:
        raise ValueError(f"cases must be a count >= 0, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # the cases repeat from it
        raise TypeError(f"seed must be an integer, got {seed!r}")
    check_flag("pyfastnn.testing", "mlp", mlp)
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):  # the checks compare values, which other devices (meta) do not hold
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    make, verify = (random_mlp_case, check_mlp) if mlp else (random_case, check)
    rng = random.Random(seed)
    for _ in range(cases):
        yield verify(make(rng, device))


@dataclasses.dataclass
class MLPCase:
    """One random call of fused_mlp: the input's leading shape, each layer's width, activation, bias
    and dropout, whether it trains, whether the input needs a gradient, and the seed of its tensors."""

    batch: Tuple[int, ...]
    widths: Tuple[int, ...]
    dtype: torch.dtype
    activations: Tuple[str, ...]  # per layer, the last is the output activation
    negative_slope: float
    biases: Tuple[bool, ...]
    dropout: Tuple[float, ...]    # per layer; used when training
    training: bool
    input_requires_grad: bool
    seed: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        layers = len(self.widths) - 1
        if layers < 1:
            raise ValueError(f"MLPCase: widths takes the input's and each layer's, two at least, got {self.widths!r}")
        for name in ("activations", "biases", "dropout"):  # zip would drop or ignore layers silently
            if len(getattr(self, name)) != layers:
                raise ValueError(f"MLPCase: {len(getattr(self, name))} {name} for {layers} layers "
                                 f"(widths {self.widths!r})")
        _check_activations("MLPCase", self.activations)
        _check_dtype("MLPCase", self.dtype)

    def describe(self) -> str:
        """One line that names the case, as a mismatch reports it."""
        return (f"batch={self.batch} widths={self.widths} {self.dtype} {self.activations}({self.negative_slope}) "
                f"biases={self.biases} dropout={self.dropout} training={self.training} "
                f"input_grad={self.input_requires_grad} seed={self.seed} device={self.device}")


def random_mlp_case(rng: random.Random, device: str = "cpu") -> MLPCase:
    """A random :class:`MLPCase` drawn from ``rng``: 1 to 4 layers of random widths, activations,
    biases and dropout, in training or not.

    Example:
        >>> import random
        >>> from pyfastnn.testing import random_mlp_case
        >>> case = random_mlp_case(random.Random(0))
        >>> len(case.widths) == len(case.activations) + 1
        True
    """
    layers = rng.choice((1, 2, 3, 4))
    widths = tuple(rng.choice(SIZES[1:]) for _ in range(layers + 1))
    return MLPCase(
        batch=tuple(rng.choice(SIZES[:9]) for _ in range(rng.choice((1, 1, 2)))), widths=widths,
        dtype=rng.choice(DTYPES), activations=tuple(rng.choice(pyfastnn.ACTIVATIONS) for _ in range(layers)),
        negative_slope=rng.choice((0.01, 0.0, -0.5)), biases=tuple(rng.random() < 0.7 for _ in range(layers)),
        dropout=tuple(rng.choice((0.0, 0.1, 0.5, 0.9)) for _ in range(layers)), training=rng.random() < 0.7,
        input_requires_grad=rng.random() < 0.5, seed=rng.randrange(2**31), device=device)


def _assert_close_or_no_worse_than_eager(ours: torch.Tensor, eager: torch.Tensor, expected: torch.Tensor,
                                         dtype: torch.dtype, what: str, scale: float = 1.0,
                                         atol: float = 0.0) -> None:
    """The fallback of every check, for a result whose rounding can legitimately exceed the dtype's
    tolerance (``scale`` widening its absolute part, as in :func:`_assert_gradients_close`). Where
    ``ours`` is beyond it, and further than ``atol`` from the float64 ``expected`` (a bound the
    caller derives, such as the rounding dropout's scaling amplifies), eager PyTorch's ``eager`` (the
    same computation in the same dtype) must be beyond the tolerance too, and ``ours`` no further
    from ``expected`` than twice eager's."""
    if _within_tolerance(ours / scale, expected / scale, dtype) or not expected.numel():
        return
    ours_error = (ours.detach().double() - expected).abs().max().item()
    if ours_error <= atol:
        return
    if _within_tolerance(eager / scale, expected / scale, dtype):
        raise AssertionError(f"{what} beyond the tolerance" + (f" and {atol:.4g}" if atol else "")
                             + ", where eager PyTorch's is within it")
    eager_error = (eager.detach().double() - expected).abs().max().item()
    assert ours_error <= 2 * eager_error, (
        f"{what} error {ours_error:.4g} exceeds twice eager PyTorch's ({eager_error:.4g})"
        + (f" and the tolerance scaled by dropout ({atol:.4g})" if atol else ""))


def _mlp_reference(x: torch.Tensor, weights, biases, case: MLPCase, masks,
                   decided: Optional[List[Optional[torch.Tensor]]] = None):
    """(output, pre-activations) of the case's network layer by layer in float64, each hidden output
    rounded to the case's dtype as the op (and eager PyTorch in that dtype) stores it: a bfloat16
    network is compared with a bfloat16 network, not with an unrounded float64 one whose error
    compounds over the layers. ``decided[l]``, where given, says where relu / leaky_relu layer l
    takes its positive side instead of the sign of its float64 pre-activation."""
    preacts = []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        z = F.linear(x, w, b)
        preacts.append(z.detach())
        activation = case.activations[layer]
        if decided is not None and decided[layer] is not None:
            slope = 0.0 if activation == "relu" else case.negative_slope
            x = torch.where(decided[layer].reshape(z.shape), z, slope * z)
        else:
            x = REFERENCE_ACTIVATIONS[activation](z, case.negative_slope)
        x = _apply_dropout(x, masks[layer], case.dropout[layer])
        if layer + 1 < len(weights):
            x = x.to(case.dtype).to(torch.float64)
    return x, preacts


def _kink_decisions(case: MLPCase, replay) -> Optional[List[Optional[torch.Tensor]]]:
    """Per layer, where the op (its forward ``replay``: output, hidden, pre-activations, masks) took
    a relu / leaky_relu layer's positive side, read as its backward reads it (None for other
    activations); None if the network has no such layer."""
    output, hidden, preacts, _ = replay
    decided: List[Optional[torch.Tensor]] = []
    for layer, activation in enumerate(case.activations):
        if activation not in ("relu", "leaky_relu"):
            decided.append(None)
        elif preacts[layer].dim() == 2 and preacts[layer].dtype != torch.uint8:
            decided.append(preacts[layer] > 0)  # a kept pre-activation (leaky_relu's, as torch's, where visible)
        else:
            decided.append((hidden[layer] if layer < len(hidden) else output) > 0)
    return decided if any(d is not None for d in decided) else None


def _assert_flips_within_rounding(case: MLPCase, decided, preacts, masks) -> None:
    """The op's relu-like choices differ from the float64 pre-activation's sign only where that
    pre-activation is within rounding of 0 (or dropout dropped the element)."""
    for layer, (choice, z) in enumerate(zip(decided, preacts)):
        if choice is None:
            continue
        flips = choice.reshape(z.shape) != (z > 0)
        if masks[layer].dim() == 2:
            flips &= masks[layer].reshape(z.shape).bool()
        # The rounding of z grows with the dropout factors of the layers below it (their kept values are scaled).
        tolerance = TOLERANCES[case.dtype][1] * max(1.0, z.abs().max().item()) * _dropout_scale(case, layers=layer)
        worst = z[flips].abs().max().item() if flips.any() else 0.0
        assert worst <= tolerance, (
            f"layer {layer} took a {case.activations[layer]} pre-activation of {worst:.4g} for the other side")


def _dropout_scale(case: MLPCase, layers: Optional[int] = None) -> float:
    """The product of the 1/(1-p) factors dropout applies in the case (1 outside training), in its
    first ``layers`` layers where given."""
    scale = 1.0
    for p in (case.dropout[:layers] if case.training else ()):
        scale /= 1.0 - p
    return scale


def check_mlp(case: MLPCase) -> Optional[str]:
    """None if fused_mlp (with the masks it drew) matches the float64 layer-by-layer reference in value
    (every dtype) and every gradient (float32/float64), else what differs. It seeds torch's
    generators with the case's seed (the masks are drawn twice alike) and restores them after."""
    device = torch.device(case.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _check_mlp(case)


def split_mlp_tensors(tensors: Sequence[torch.Tensor], has_bias: Sequence[bool]):
    """(input, weights, biases) from a flat sequence laid out as input, each weight, then the biases
    that exist (``has_bias`` per layer; a missing bias is None): how fused_mlp's tensors travel
    through ``torch.autograd.grad`` and ``opcheck``, which take flat lists.

    Example:
        >>> from pyfastnn.testing import split_mlp_tensors
        >>> split_mlp_tensors(["x", "w0", "w1", "b1"], [False, True])
        ('x', ['w0', 'w1'], [None, 'b1'])
    """
    layers = len(has_bias)
    rest = iter(tensors[1 + layers:])
    return tensors[0], list(tensors[1:1 + layers]), [next(rest) if has else None for has in has_bias]


@dataclasses.dataclass
class _MLPLeaves:
    """An MLP case's tensors as one flat list (input, weights, present biases), as autograd takes
    them, and which of them need a gradient."""

    case: MLPCase
    tensors: List[torch.Tensor]
    requires_grad: List[bool]

    @classmethod
    def draw(cls, case: MLPCase) -> "_MLPLeaves":
        g = torch.Generator().manual_seed(case.seed)
        x = random_tensor((*case.batch, case.widths[0]), case.dtype, g, None, case.device)
        weights = [random_tensor((n, k), case.dtype, g, None, case.device, scale=k ** -0.5)
                   for k, n in zip(case.widths[:-1], case.widths[1:])]
        biases = [random_tensor((n,), case.dtype, g, None, case.device)
                  for n, has in zip(case.widths[1:], case.biases) if has]
        tensors = [x, *weights, *biases]
        return cls(case, tensors, [case.input_requires_grad] + [True] * (len(tensors) - 1))

    def copies(self, dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        """Fresh leaves (in ``dtype``), requiring a gradient as the case says: no check shares a
        tensor with another, so an op writing into its inputs cannot hide."""
        return [t.detach().to(dtype or t.dtype, copy=True).requires_grad_(r)
                for t, r in zip(self.tensors, self.requires_grad)]

    def split(self, tensors: Sequence[torch.Tensor]):
        return split_mlp_tensors(tensors, self.case.biases)

    def eager(self, tensors: Sequence[torch.Tensor], masks) -> torch.Tensor:
        """PyTorch's own network on ``tensors`` in their dtype, with the op's dropout ``masks``."""
        case = self.case
        return reference_mlp(*self.split(tensors), case.activations, case.negative_slope, masks, case.dropout)


def _check_mlp(case: MLPCase) -> Optional[str]:
    leaves = _MLPLeaves.draw(case)
    ours = leaves.copies()
    codes = [pyfastnn.ACTIVATIONS.index(a) for a in case.activations]
    args = (codes, case.negative_slope, list(case.dropout), case.training)
    try:
        torch.manual_seed(case.seed)
        out = torch.ops.pyfastnn.fused_mlp(*leaves.split(ours), *args)
        torch.manual_seed(case.seed)  # the same draws again, for the masks
        with torch.no_grad():
            replay = torch.ops.pyfastnn.fused_mlp_forward(*leaves.split([t.detach() for t in ours]), *args)
        masks = replay[3]
        refs = leaves.copies(torch.float64)
        expected, _ = _mlp_reference(*leaves.split(refs), case, masks)
        _assert_made_like(out, case)
        try:
            assert_close(out, expected, case.dtype)
        except AssertionError:
            if case.dtype not in (torch.bfloat16, torch.float16):
                raise
            # Deep bfloat16/float16 stacks (with 1/(1-p) up to 10x) can exceed the one-layer tolerance.
            # Where a kept value is scaled by 1/(1-p), the rounding of the sum before it is scaled too:
            # an absolute tolerance that many times the one-layer one also passes.
            scaled_atol = TOLERANCES[case.dtype][1] * max(1.0, expected.abs().max().item()) * _dropout_scale(case)
            _assert_close_or_no_worse_than_eager(out, leaves.eager(leaves.tensors, masks), expected, case.dtype,
                                                 str(case.dtype), atol=scaled_atol)
        needs = [t for t in ours if t.requires_grad]
        if needs:  # an empty output too: its weight and bias gradients are zeros
            grad_out = _grad_output(out, case)
            grads = _gradients(out, needs, grad_out)  # bfloat16 too: it must run
            # Gradients are compared in float32/float64. In bfloat16 every backpropagated gradient is
            # rounded again and relu-like masks flip on pre-activations within rounding of 0, so
            # bfloat16 gradients of a deep stack (PyTorch's own included) drift from float64 by more
            # than any fixed tolerance; they are checked against PyTorch's bfloat16 in
            # tests/library/test_fused_mlp.py instead.
            if case.dtype not in (torch.bfloat16, torch.float16):
                _check_mlp_gradients(leaves, grads, expected, refs, grad_out, replay)
    except AssertionError as e:
        return _mismatch(case, e)
    return None


def _check_mlp_gradients(leaves: _MLPLeaves, grads, expected: torch.Tensor, refs: List[torch.Tensor],
                         grad_out: torch.Tensor, replay) -> None:
    """The op's float32/float64 gradients ``grads`` against the float64 network ``expected`` (of the
    leaves ``refs``), with the two fallbacks rounding calls for; raises AssertionError."""
    case = leaves.case
    expected_grads = torch.autograd.grad(expected, [t for t in refs if t.requires_grad], grad_out.to(torch.float64))
    # Each dropout scales the terms of the gradient sums by 1/(1-p) (10x at p = 0.9), and their
    # rounding with them, while cancellation can leave the sum itself small: the absolute tolerance
    # grows by that factor.
    scale = _dropout_scale(case)
    try:
        _assert_gradients_close(grads, expected_grads, case.dtype, scale)
        return
    except AssertionError:
        pass
    masks = replay[3]
    decided = _kink_decisions(case, replay)
    if decided is not None:
        # A relu-like layer may take a pre-activation within rounding of 0 for the other side than
        # float64 does (eager PyTorch in the op's dtype may too): both slopes are right there. Where
        # the op's choices differ from float64's only at such elements, its gradients must match the
        # float64 network that makes its choices.
        decided_refs = leaves.copies(torch.float64)
        as_decided, preacts = _mlp_reference(*leaves.split(decided_refs), case, masks, decided)
        _assert_flips_within_rounding(case, decided, preacts, masks)
        decided_grads = torch.autograd.grad(as_decided, [t for t in decided_refs if t.requires_grad],
                                            grad_out.to(torch.float64))
        try:
            _assert_gradients_close(grads, decided_grads, case.dtype, scale)
            return
        except AssertionError:
            pass
    # A sum through a narrow layer can cancel to far below its terms, whose rounding the tolerance (on
    # the result's scale) does not see.
    eager_in = leaves.copies()
    eager_grads = torch.autograd.grad(leaves.eager(eager_in, masks), [t for t in eager_in if t.requires_grad],
                                      grad_out)
    for got, eager_grad, want in zip(grads, eager_grads, expected_grads):
        _assert_close_or_no_worse_than_eager(got, eager_grad, want, case.dtype, "gradient", scale)
