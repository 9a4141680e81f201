"""Property-based fuzzing of fused_linear and fused_mlp against PyTorch (bounded to stay fast; the
long runs are scripts/fuzz_fused_linear.py [--mlp])."""

import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastnn
from pyfastnn.testing import (TOLERANCES, MLPCase, assert_close, check, check_mlp, random_case, random_mlp_case,
                              reference_mlp)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_cases_match_pytorch(seed):
    mismatch = check(random_case(random.Random(seed)))
    assert mismatch is None, mismatch


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_mlp_cases_match_pytorch(seed):
    mismatch = check_mlp(random_mlp_case(random.Random(seed)))
    assert mismatch is None, mismatch


@pytest.mark.parametrize("layout", ["input_strided", "weight_strided", "input_transposed", "weight_transposed"])
def test_the_op_sees_each_cases_layout(layout, monkeypatch):
    """A case's non-contiguous layout reaches the op as such (a copy would make it contiguous)."""
    seen = []
    original = pyfastnn.fused_linear
    monkeypatch.setattr(pyfastnn, "fused_linear", lambda x, w, *args, **kwargs: seen.append((x, w)) or original(
        x, w, *args, **kwargs))
    case = dataclasses.replace(random_case(random.Random(0)), batch=(5,), in_features=7, out_features=6, layout=layout,
                               dtype=torch.float32)
    assert check(case) is None
    x, w = seen[0]
    assert not (x if layout.startswith("input") else w).is_contiguous()
    assert (w if layout.startswith("input") else x).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_op_writing_into_its_input_is_caught(dtype, monkeypatch):
    original = pyfastnn.fused_linear

    def scribbling(x, *args, **kwargs):
        with torch.no_grad():
            x.mul_(2)  # the reference must not see this (in float64 too, where .to() would not copy)
        return original(x, *args, **kwargs)

    case = dataclasses.replace(random_case(random.Random(1)), batch=(4,), in_features=5, out_features=3,
                               layout="contiguous", dtype=dtype, activation="tanh")
    assert check(case) is None
    monkeypatch.setattr(pyfastnn, "fused_linear", scribbling)
    assert check(case) is not None


# A fuzz case (seed 0 of `fuzz_fused_linear.py --mlp`) whose relu pre-activation in row 15, column 154
# is -1.05e-7 in float64: the op, in float32, took it for positive, eager PyTorch for negative.
NEAR_ZERO_RELU = MLPCase(batch=(16,), widths=(17, 16, 257), dtype=torch.float32, activations=("gelu", "relu"),
                         negative_slope=0.01, biases=(True, True), dropout=(0.9, 0.0), training=True,
                         input_requires_grad=True, seed=569603251)


def test_a_relu_choice_within_rounding_of_zero_is_not_a_mismatch():
    assert check_mlp(NEAR_ZERO_RELU) is None


def test_a_wrong_relu_gradient_is_still_caught(monkeypatch):
    """The fuzzer's allowance for choices within rounding of zero does not hide a wrong gradient: a
    last relu layer whose backward passes the gradient everywhere (slope 1 on the negative side) fails."""
    original = torch.ops.pyfastnn.fused_mlp

    def relu_with_identity_gradient(input, weights, biases, codes, *rest):
        z = original(input, weights, biases, list(codes[:-1]) + [pyfastnn.ACTIVATIONS.index("identity")], *rest)
        return z + (z.clamp(min=0) - z).detach()  # relu's values, the identity's gradient

    case = dataclasses.replace(NEAR_ZERO_RELU, dropout=(0.0, 0.0))
    assert check_mlp(case) is None
    monkeypatch.setattr(torch.ops.pyfastnn, "fused_mlp", relu_with_identity_gradient)
    assert "gradient" in check_mlp(case)


def test_a_relu_taking_the_other_side_beyond_rounding_is_caught(monkeypatch):
    """The allowance covers pre-activations within rounding of 0 only: a last relu layer whose
    backward takes its kink at 0.5 (its gradient and the pre-activations it records; its values stay
    relu's) is reported."""
    original_mlp, original_forward = torch.ops.pyfastnn.fused_mlp, torch.ops.pyfastnn.fused_mlp_forward
    identity = pyfastnn.ACTIVATIONS.index("identity")

    def kink_at_half(input, weights, biases, codes, *rest):
        z = original_mlp(input, weights, biases, list(codes[:-1]) + [identity], *rest)
        return torch.where(z.detach() > 0.5, z, 0 * z) + (z.clamp(min=0) - torch.where(z > 0.5, z, 0 * z)).detach()

    def forward_kink_at_half(input, weights, biases, codes, *rest):
        out, hidden, preacts, masks = original_forward(input, weights, biases, list(codes[:-1]) + [identity], *rest)
        preacts = list(preacts)
        preacts[-1] = (out - 0.5).reshape(-1, out.shape[-1])
        return out.clamp(min=0), hidden, preacts, masks

    case = MLPCase(batch=(16,), widths=(17, 16, 32), dtype=torch.float32, activations=("gelu", "relu"),
                   negative_slope=0.01, biases=(True, True), dropout=(0.0, 0.0), training=False,
                   input_requires_grad=True, seed=1)
    assert check_mlp(case) is None
    monkeypatch.setattr(torch.ops.pyfastnn, "fused_mlp", kink_at_half)
    monkeypatch.setattr(torch.ops.pyfastnn, "fused_mlp_forward", forward_kink_at_half)
    assert "layer 1 took a relu pre-activation of 0.4" in check_mlp(case)


def test_a_bfloat16_op_off_beyond_the_tolerance_and_twice_eager_is_caught(monkeypatch):
    """The bfloat16 allowance (no further from float64 than twice eager PyTorch in bfloat16, or the
    tolerance) does not pass an op that is eager bfloat16 except for one output 1.5 tolerances off
    (8 to 20 times eager's error here)."""
    original = torch.ops.pyfastnn.fused_mlp

    def one_output_off(input, weights, biases, codes, *rest):
        out = original(input, weights, biases, codes, *rest)
        activations = [pyfastnn.ACTIVATIONS[code] for code in codes]
        detached = [[None if t is None else t.detach() for t in ts] for ts in (weights, biases)]
        expected = reference_mlp(input.detach().double(), *[[None if t is None else t.double() for t in ts]
                                                            for ts in detached], activations)
        target = reference_mlp(input.detach(), *detached, activations).double()
        tolerance = TOLERANCES[torch.bfloat16][1] * max(1.0, expected.abs().max().item())
        smallest = expected.abs().argmin()  # where the relative tolerance adds least
        target.view(-1)[smallest] = expected.view(-1)[smallest] + 1.5 * tolerance
        return out + (target.to(out.dtype) - out).detach()

    case = MLPCase(batch=(64,), widths=(256, 64), dtype=torch.bfloat16, activations=("identity",),
                   negative_slope=0.01, biases=(True,), dropout=(0.0,), training=False,
                   input_requires_grad=False, seed=0)
    assert check_mlp(case) is None
    monkeypatch.setattr(torch.ops.pyfastnn, "fused_mlp", one_output_off)
    assert "exceeds twice eager PyTorch's" in check_mlp(case)


def test_assert_close_does_not_pass_everything_beside_an_infinity():
    # The absolute tolerance follows the finite values' scale; an infinite one would make it infinite.
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("inf"), 1000.0]), torch.tensor([float("inf"), 1.0]), torch.float32)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([-float("inf")]), torch.tensor([float("inf")]), torch.float32)
    assert_close(torch.tensor([float("inf"), 1.0, float("nan")]), torch.tensor([float("inf"), 1.0, float("nan")]),
                 torch.float32)
    with pytest.raises(TypeError, match="no tolerances for torch.int64"):
        assert_close(torch.tensor([1]), torch.tensor([1]), torch.int64)


def test_check_mlp_leaves_torchs_generator_as_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert check_mlp(random_mlp_case(random.Random(3))) is None
    assert torch.equal(torch.rand(3), expected)


def test_references_and_cases_refuse_what_they_would_misread():
    x, w = torch.randn(2, 3), [torch.randn(4, 3), torch.randn(2, 4)]
    with pytest.raises(ValueError, match="1 activations for 2 weights"):
        reference_mlp(x, w, [None, None], ["relu"])  # zip would silently drop the second layer
    torch.testing.assert_close(reference_mlp(x, w, [None, None], ["relu", "identity"], keep_masks=[None, None],
                                             dropout=[0.0, 0.0]),
                               reference_mlp(x, w, [None, None], ["relu", "identity"]))
    with pytest.raises(ValueError, match="unknown layout 'input_transpose'"):
        dataclasses.replace(random_case(random.Random(0)), layout="input_transpose")



def test_a_wrong_gradient_is_caught(monkeypatch):
    """check() compares every gradient, not the values alone: an op right forward and off by 10 %
    backward is reported."""
    original = pyfastnn.fused_linear

    def steep(*args, **kwargs):
        out = original(*args, **kwargs)
        return out + 0.1 * (out - out.detach())  # the same values, gradients scaled by 1.1

    monkeypatch.setattr(pyfastnn, "fused_linear", steep)
    cases = [random_case(random.Random(seed)) for seed in range(40)]
    assert sum(check(case) is not None for case in cases) >= 10
