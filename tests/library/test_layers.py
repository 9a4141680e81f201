"""FusedLinear as a drop-in for nn.Linear + activation."""

import pytest
import torch
from torch import nn

import pyfastnn
from pyfastnn.testing import REFERENCE_ACTIVATIONS, TOLERANCES, reference


def test_parameters_and_init_match_nn_linear():
    torch.manual_seed(3)
    linear = nn.Linear(784, 256)
    torch.manual_seed(3)
    fused = pyfastnn.FusedLinear(784, 256, activation="relu")
    assert [n for n, _ in fused.named_parameters()] == ["weight", "bias"]
    assert torch.equal(fused.weight, linear.weight) and torch.equal(fused.bias, linear.bias)


def test_state_dict_moves_both_ways():
    linear, fused = nn.Linear(20, 7), pyfastnn.FusedLinear(20, 7, activation="tanh")
    assert fused.load_state_dict(linear.state_dict()) is not None
    assert torch.equal(fused.weight, linear.weight)
    other = nn.Linear(20, 7)
    other.load_state_dict(fused.state_dict())
    x = torch.randn(5, 20)
    torch.testing.assert_close(fused(x), torch.tanh(other(x)))
    no_bias = pyfastnn.FusedLinear(20, 7, bias=False)
    assert list(no_bias.state_dict()) == list(nn.Linear(20, 7, bias=False).state_dict()) == ["weight"]


def test_drop_in_for_sequential():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3))
    fused = nn.Sequential(pyfastnn.FusedLinear(12, 8, activation="gelu"), pyfastnn.FusedLinear(8, 3, activation=None))
    fused[0].load_state_dict(plain[0].state_dict())
    fused[1].load_state_dict(plain[2].state_dict())
    x = torch.randn(4, 6, 12)
    torch.testing.assert_close(fused(x), plain(x))
    fused(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(fused[0].weight.grad, plain[0].weight.grad)


def test_from_linear_shares_or_copies():
    linear = nn.Linear(6, 4)
    shared = pyfastnn.FusedLinear.from_linear(linear, activation="sigmoid")
    assert shared.weight is linear.weight and shared.bias is linear.bias
    copied = pyfastnn.FusedLinear.from_linear(linear, activation="sigmoid", copy=True)
    assert copied.weight is not linear.weight and torch.equal(copied.weight, linear.weight)
    with torch.no_grad():
        linear.weight.add_(1.0)
    assert torch.equal(shared.weight, linear.weight) and not torch.equal(copied.weight, linear.weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(shared(x), torch.sigmoid(linear(x)))
    with pytest.raises(TypeError, match="nn.Linear"):
        pyfastnn.FusedLinear.from_linear(nn.Conv1d(1, 1, 1))


def test_to_linear_is_the_plain_equivalent():
    fused = pyfastnn.FusedLinear(6, 4, activation="leaky_relu", negative_slope=0.2)
    plain = fused.to_linear()
    x = torch.randn(3, 6)
    torch.testing.assert_close(plain(x), fused(x))
    assert plain[0].weight is fused.weight


def test_repr_like_nn_linear_plus_activation():
    assert repr(pyfastnn.FusedLinear(784, 256)) == \
        "FusedLinear(in_features=784, out_features=256, bias=True, activation=relu)"
    assert "negative_slope=0.2" in repr(pyfastnn.FusedLinear(2, 3, activation="leaky_relu", negative_slope=0.2))
    assert "activation=identity" in repr(pyfastnn.FusedLinear(2, 3, activation=None))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device_arguments(dtype):
    layer = pyfastnn.FusedLinear(5, 3, activation="silu", device="cpu", dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(2, 5, dtype=dtype)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(layer(x), reference(x, layer.weight, layer.bias, "silu"), rtol=rtol, atol=atol)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu.*gelu_tanh"):
        pyfastnn.FusedLinear(2, 3, activation="swish")


def test_layer_trains():
    torch.manual_seed(0)
    model = nn.Sequential(pyfastnn.FusedLinear(2, 16, activation="tanh"), pyfastnn.FusedLinear(16, 1, activation="sigmoid"))
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert ((model(x) > 0.5).float() == y).all(), "XOR not learned"


def test_the_reference_covers_every_activation():
    assert sorted(REFERENCE_ACTIVATIONS) == sorted(pyfastnn.ACTIVATIONS)


@pytest.mark.parametrize("activation", pyfastnn.ACTIVATIONS)
@pytest.mark.parametrize("negative_slope", [0.01, -0.3])
def test_activation_module_computes_what_torch_functional_does(activation, negative_slope):
    # The library's table of torch.nn modules (which fuse() and to_sequential() rely on) against the
    # reference's independent table of torch.nn.functional calls.
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    module = pyfastnn.activation_module(activation, negative_slope)
    torch.testing.assert_close(module(torch.nn.functional.linear(x, w, b)),
                               reference(x, w, b, activation, negative_slope), rtol=0, atol=0)


def test_a_module_or_parameter_given_for_a_setting_is_refused_not_filed_away():
    # nn.Module would take a module given for a setting as a submodule, never read, and a parameter
    # as a name clash; the settings' own checks refuse both.
    layer = pyfastnn.FusedLinear(3, 3, activation="relu")
    for name, value, error, message in (
            ("activation", torch.nn.GELU(), ValueError, "unknown activation GELU"),
            ("dropout", torch.nn.Dropout(0.5), TypeError, "dropout probability must be a real number"),
            ("negative_slope", torch.nn.Parameter(torch.tensor(0.1)), TypeError, "negative_slope must be a real number")):
        with pytest.raises(error, match=message):
            setattr(layer, name, value)
        assert name not in layer._modules and name not in layer._parameters
    assert (layer.activation, layer.dropout, layer.negative_slope) == ("relu", 0.0, 0.01)
    with pytest.raises(ValueError, match="unknown activation ReLU"):
        pyfastnn.FusedLinear(3, 3, activation=torch.nn.ReLU())
    with pytest.raises(TypeError, match="dropout probability must be a real number"):
        pyfastnn.FusedLinear(3, 3, dropout=torch.nn.Dropout(0.5))
    for activation in ("leaky_relu", "relu"):
        with pytest.raises(TypeError, match="negative_slope must be a real number, got 'x'"):
            pyfastnn.activation_module(activation, "x")


def test_a_fused_linear_pickled_with_its_settings_as_plain_attributes_still_loads():
    # Before its settings became checked properties, a FusedLinear kept them as plain attributes: its
    # pickled state was nn.Linear's plus those three.
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    old_state = {**linear.__dict__, "activation": "tanh", "negative_slope": 0.01, "dropout": 0.1}
    layer = pyfastnn.FusedLinear.__new__(pyfastnn.FusedLinear)
    layer.__setstate__(old_state)  # what pickle.load does with it
    assert (layer.activation, layer.negative_slope, layer.dropout) == ("tanh", 0.01, 0.1)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer.eval()(x), torch.tanh(linear(x)))
    assert set(layer.__dict__) == set(pyfastnn.FusedLinear(4, 3).__dict__)


def test_a_replaced_fused_mlp_layer_must_chain_with_its_neighbours():
    mlp = pyfastnn.FusedMLP([3, 4, 5], dropout=0.1)
    with pytest.raises(ValueError, match=r"FusedMLP layers '0' and '3' do not chain: "
                                         r"4 features out of one layer, 8 into the next"):
        mlp[1] = pyfastnn.FusedLinear(8, 7)
    with pytest.raises(ValueError, match=r"layers '0' and '3' do not chain: "
                                         r"layers in torch.float32 on cpu and torch.float64 on cpu: one fused"):
        mlp[-1] = pyfastnn.FusedLinear(4, 5, dtype=torch.float64)
    mlp[1] = pyfastnn.FusedLinear(4, 5, activation="tanh")
    assert mlp[1].activation == "tanh" and mlp(torch.randn(2, 3)).shape == (2, 5)
