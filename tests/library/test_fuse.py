"""FusedMLP as a module (init, state dicts, conversions) and pyfastnn.fuse on the lesson's models and
on module trees it must partly leave alone."""

import contextlib
import copy
import functools
import pickle
import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyfastnn
from pyfastnn import FusedLinear, FusedMLP


class ModernNetwork(nn.Module):
    """The lesson's MNIST network, as written there."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.layers(x)


class SimpleNN(nn.Module):
    """The lesson's XOR network, as written there (attributes, not a Sequential)."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.layer1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.layer2 = nn.Linear(hidden_size, output_size)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        x = self.layer1(x)
        x = self.relu(x)
        x = self.layer2(x)
        x = self.sigmoid(x)
        return x


def assert_same_function(original, fused, x, train_grads=True):
    original.eval(), fused.eval()
    torch.testing.assert_close(fused(x), original(x))
    if train_grads:
        original.train(), fused.train()
        grads = torch.autograd.grad(original(x).square().sum(), list(original.parameters()))
        fused_grads = torch.autograd.grad(fused(x).square().sum(), list(fused.parameters()))
        assert len(grads) == len(fused_grads)
        for g, f in zip(grads, fused_grads):
            torch.testing.assert_close(f, g)


def test_fused_mlp_initialises_like_the_sequential_of_linears():
    torch.manual_seed(3)
    mlp = FusedMLP([30, 20, 10, 5], dropout=0.1)
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Dropout(0.1), nn.Linear(20, 10), nn.ReLU(),
                          nn.Dropout(0.1), nn.Linear(10, 5))
    assert list(mlp.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(mlp.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_mlp_state_dict_both_ways_and_conversions():
    mlp = FusedMLP([8, 6, 4], activation="tanh", output_activation="sigmoid", dropout=0.0)
    plain = mlp.to_sequential()
    assert [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear, nn.Sigmoid]
    assert plain[0].weight is mlp[0].weight  # shares parameters
    other = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid())
    mlp.load_state_dict(other.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), other(x))
    back = FusedMLP.from_sequential(other)
    assert back[1].weight is other[2].weight
    copied = FusedMLP.from_sequential(other, copy=True)
    assert copied[1].weight is not other[2].weight and torch.equal(copied[1].weight, other[2].weight)
    torch.testing.assert_close(back(x), other(x))
    with pytest.raises(ValueError, match="stopped at module 1"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(8, 6), nn.Softplus()))
    with pytest.raises(ValueError, match=r"stopped at module 2: .*\(LeakyReLU slopes 0.1 and 0.2 \(one fused op"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.LeakyReLU(0.2)))
    # Slopes apart (a relu layer between them) cannot share one op either: a clear error, not a crash later.
    apart = nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.2), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3),
                          nn.LeakyReLU(0.3))
    with pytest.raises(ValueError, match=r"stopped at module 4: .*\(LeakyReLU slopes 0.2 and 0.3 \(one fused op"):
        FusedMLP.from_sequential(apart)
    runs = []
    fused = pyfastnn.fuse(apart, report=runs)  # two runs, each with its own slope
    assert [type(m).__name__ for m in fused][::4] == ["FusedMLP", "FusedLinear"] and len(runs) == 2
    assert list(fused.state_dict()) == list(apart.state_dict())
    assert_same_function(apart, fused, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\(layers in torch.float32 on cpu and torch.float64 on cpu: one fused op"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4).double()))
    with pytest.raises(ValueError, match=r"\(4 features out of one layer, 5 into the next\)"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 4)))


def test_fused_mlp_from_layers_in_mixed_modes_is_in_eval_mode():
    mlp = FusedMLP.from_layers([FusedLinear(4, 8, activation="relu"), FusedLinear(8, 2, activation=None).eval()])
    assert mlp.training is False and [layer.training for layer in mlp] == [True, False]
    assert FusedMLP.from_layers([FusedLinear(4, 8), FusedLinear(8, 2)]).training is True


def test_fused_mlp_repr_len_and_indexing():
    mlp = FusedMLP([784, 256, 128, 10], dropout=0.2)
    assert len(mlp) == 3 and [layer.out_features for layer in mlp] == [256, 128, 10]
    assert "(3): FusedLinear(in_features=256, out_features=128, bias=True, activation=relu, dropout=0.2)" in repr(mlp)
    assert mlp[-1].activation == "identity"
    keys, layer = list(mlp.state_dict()), FusedLinear(256, 128, activation="tanh")
    mlp[1] = layer
    assert mlp[1] is layer and mlp[-2] is layer and list(mlp.state_dict()) == keys
    with pytest.raises(TypeError, match="FusedMLP layer '0' must be a FusedLinear, got Linear"):
        mlp[0] = nn.Linear(784, 256)
    with pytest.raises(IndexError):
        mlp[3] = layer


def test_fused_mlp_with_a_parametrized_layer():
    torch.manual_seed(0)
    mlp = FusedMLP([6, 5, 3])
    plain = mlp.to_sequential()
    torch.nn.utils.parametrizations.weight_norm(mlp[0])
    x = torch.randn(4, 6)
    torch.testing.assert_close(mlp(x), plain(x))
    mlp(x).sum().backward()
    assert mlp[0].parametrizations.weight.original0.grad is not None


@pytest.mark.parametrize("bad", [dict(sizes=[5]), dict(sizes=[4, -1]), dict(sizes=[4, 3], activation="swish")])
def test_fused_mlp_bad_arguments(bad):
    args = dict(sizes=[4, 3])
    args.update(bad)
    with pytest.raises(ValueError):
        FusedMLP(**args)


def test_fused_linear_dropout_layer():
    torch.manual_seed(0)
    layer = FusedLinear(50, 40, activation="sigmoid", dropout=0.25)
    assert "dropout=0.25" in repr(layer)
    plain = layer.to_linear()
    assert [type(m) for m in plain] == [nn.Linear, nn.Sigmoid, nn.Dropout]
    x = torch.randn(30, 50)
    layer.eval()
    torch.testing.assert_close(layer(x), plain.eval()(x))
    layer.train()
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    assert 0.15 < dropped < 0.35
    kept = out != 0
    torch.testing.assert_close(out[kept], (plain[1](plain[0](x)) / 0.75)[kept])


def test_fuse_lesson_modern_network():
    torch.manual_seed(0)
    model = ModernNetwork()
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert type(fused.layers) is FusedMLP and fused is not model
    assert [str(r) for r in runs] == [
        "layers: Linear(784, 256) -> ReLU -> Dropout(0.2) -> Linear(256, 128) -> ReLU -> Dropout(0.2) -> "
        "Linear(128, 10) => FusedMLP"]
    assert list(fused.state_dict()) == list(model.state_dict())  # checkpoints load either way
    assert type(model.layers) is nn.Sequential  # the original is untouched
    x = torch.randn(16, 784)
    assert_same_function(model, fused, x, train_grads=False)
    # Training gradients are equal once dropout is off.
    no_dropout = copy.deepcopy(model)
    for module in no_dropout.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert_same_function(no_dropout, pyfastnn.fuse(no_dropout), x)


def test_fuse_lesson_simple_nn_by_tracing():
    torch.manual_seed(0)
    model = SimpleNN(2, 4, 1)
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert [type(m) for m in fused.children()] == [FusedLinear, FusedLinear]
    assert [r.module for r in runs] == ["FusedLinear", "FusedLinear"]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_function(model, fused, torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))


def test_fuse_nested_and_partial_runs():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 4),
                                      nn.LeakyReLU(0.2))
            self.head = nn.Sequential(nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 3), nn.Tanh()))

        def forward(self, x):
            return self.head(self.body(x))

    model = Block()
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    kinds = [type(m).__name__ for m in fused.body]
    # Linear-GELU-Linear is one run (Softplus is not fused), then Linear-LeakyReLU on its own; each
    # takes its first module's index and leaves Absorbed placeholders in the others' places.
    assert kinds == ["FusedMLP", "Absorbed", "Absorbed", "Softplus", "FusedLinear", "Absorbed"]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert type(fused.head[1]) is FusedMLP  # the nested Sequential is one run: replaced whole
    assert len(runs) == 3
    assert_same_function(model, fused, torch.randn(5, 6))


def test_each_torch_activation_module_becomes_its_own_kernel():
    # Written out here, not read from pyfastnn's table: GELU's erf and tanh forms differ by ~1e-3,
    # within a loose tolerance, so only the layer's activation name tells them apart reliably.
    cases = [(nn.ReLU(), "relu"), (nn.LeakyReLU(0.3), "leaky_relu"), (nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh"),
             (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu")]
    x = torch.randn(16, 6, dtype=torch.float64)
    for module, name in cases:
        model = nn.Sequential(nn.Linear(6, 5), module, nn.Linear(5, 2)).double()
        fused = pyfastnn.fuse(model)
        assert type(fused) is FusedMLP and fused[0].activation == name, (module, fused)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_each_activation_function_a_traced_forward_calls_becomes_its_own_kernel():
    # (function of the Linear's output, the fused layer's activation and slope; None: left unfused)
    cases = [(lambda h: F.relu(h), ("relu", 0.01)), (lambda h: F.relu(h, False), ("relu", 0.01)),
             (lambda h: h.sigmoid(), ("sigmoid", 0.01)), (lambda h: torch.tanh(h), ("tanh", 0.01)),
             (lambda h: F.gelu(h), ("gelu", 0.01)), (lambda h: F.gelu(h, approximate="none"), ("gelu", 0.01)),
             (lambda h: F.gelu(h, approximate="tanh"), ("gelu_tanh", 0.01)), (lambda h: F.silu(h), ("silu", 0.01)),
             (lambda h: F.leaky_relu(h), ("leaky_relu", 0.01)), (lambda h: F.leaky_relu(h, 0.2), ("leaky_relu", 0.2)),
             (lambda h: F.leaky_relu(h, negative_slope=-0.5), ("leaky_relu", -0.5)),
             (lambda h: F.relu(h, inplace=True), None), (lambda h: F.leaky_relu(h, 0.2, True), None),
             (lambda h: F.leaky_relu(h, float("nan")), None), (lambda h: F.leaky_relu(h, 1e39), None)]

    def model_applying(function):
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 2)

            def forward(self, x):
                return self.out(function(self.fc(x)))

        return Model().double()

    x = torch.randn(16, 6, dtype=torch.float64)
    for function, expected in cases:
        model, runs = model_applying(function), []
        fused = pyfastnn.fuse(model, report=runs)
        if expected is None:
            assert runs == [] and type(fused.fc) is nn.Linear, fused
            continue
        assert (fused.fc.activation, fused.fc.negative_slope) == expected, fused
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    runs = []
    pyfastnn.fuse(model_applying(lambda h: F.gelu(h, approximate="tanh")), report=runs)
    assert "gelu(approximate='tanh')" in str(runs[0])  # the report says which form it took


def test_fuse_leaves_unfusable_modules_alone():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.relu(self.linear(x))
            return x

    model = nn.Sequential(Untraceable(), nn.Linear(3, 2))
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert runs == [] and type(fused[0]) is Untraceable and type(fused[1]) is nn.Linear


def test_a_traced_linear_or_dropout_used_twice_is_fused_only_where_every_use_allows():
    class OutputUsedTwice(nn.Module):  # the sum needs the Linear's output before the activation
        def __init__(self):
            super().__init__()
            self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            h = self.fc(x)
            return self.relu(h) + h

    class DropoutCalledTwice(nn.Module):  # the second call drops its own input, unfused
        def __init__(self):
            super().__init__()
            self.fc, self.relu, self.drop = nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.relu(self.fc(x))) + self.drop(x)

    x = torch.randn(8, 4)
    model = OutputUsedTwice()
    fused = pyfastnn.fuse(model)
    assert type(fused.fc) is nn.Linear
    assert_same_function(model, fused, x)
    model = DropoutCalledTwice()
    fused = pyfastnn.fuse(model)
    assert type(fused.fc) is FusedLinear and fused.fc.dropout == 0.0 and type(fused.drop) is nn.Dropout
    assert_same_function(model, fused, x, train_grads=False)


def test_a_linear_followed_by_dropout_alone_is_fused_and_one_alone_is_not():
    # The dropout rides in the fused epilogue; a lone Linear gains nothing.
    runs = []
    fused = pyfastnn.fuse(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Softmax(-1)), report=runs)
    assert [str(run) for run in runs] == ["0: Linear(4, 8) -> Dropout(0.2) => FusedLinear"]
    assert type(fused[0]) is FusedLinear and fused[0].dropout == 0.2 and fused[0].activation == "identity"
    runs = []
    fused = pyfastnn.fuse(nn.Sequential(nn.Linear(4, 8), nn.Softmax(-1)), report=runs)
    assert runs == [] and type(fused[0]) is nn.Linear


def test_fuse_keeps_eval_mode():
    torch.manual_seed(0)
    model = ModernNetwork().eval()
    fused = pyfastnn.fuse(model)
    assert not any(m.training for m in fused.modules())
    traced = pyfastnn.fuse(SimpleNN(2, 4, 1).eval())  # a module that becomes a GraphModule
    assert type(traced.layer1) is FusedLinear and not any(m.training for m in traced.modules())
    x = torch.randn(4, 784)
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_inplace_shares_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    weight = model[0].weight
    fused = pyfastnn.fuse(model, inplace=True)
    assert fused[0].weight is weight


def test_fuse_verbose_and_bad_argument(capsys):
    pyfastnn.fuse(nn.Sequential(nn.Linear(2, 2)), verbose=True)
    assert "nothing to fuse" in capsys.readouterr().out
    with pytest.raises(TypeError, match="nn.Module"):
        pyfastnn.fuse("model")
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    for slope in (float("nan"), float("inf")):  # the kernels refuse such slopes: the pair stays as it is
        odd = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(slope))
        assert [type(m) for m in pyfastnn.fuse(odd)] == [nn.Linear, nn.LeakyReLU]
    with pytest.raises(TypeError, match="fuse's report must be a list .*got int"):
        pyfastnn.fuse(model, inplace=True, report=5)
    assert type(model[0]) is nn.Linear  # refused before anything was replaced


def test_fused_model_trains_like_the_original():
    """A few Adam steps from the same start give the same weights (dropout off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    fused = pyfastnn.fuse(model)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for m in (model, fused):
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            optimizer.step()
    for a, b in zip(model.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b)


def test_fused_mlp_layers_by_position_and_by_their_sequential_names():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    mlp = FusedMLP.from_sequential(seq)
    assert list(mlp._modules) == ["0", "2", "4"]
    assert [mlp[i].out_features for i in range(len(mlp))] == [8, 6, 3] == [layer.out_features for layer in mlp]
    assert [layer.out_features for layer in reversed(mlp)] == [3, 6, 8]
    assert mlp.get_submodule("2") is mlp[1]


def test_functional_call_and_load_state_dict_with_either_keys_of_a_partly_fused_sequential():
    from torch.func import functional_call

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False), nn.Softmax(-1))
    fused = pyfastnn.fuse(seq)
    assert list(fused.state_dict()) == ["0.weight", "2.weight"]
    own = dict(fused.named_parameters())
    assert list(own) == ["0.0.weight", "0.2.weight"]
    # Its own parameters' names load too (they were renamed once more: a missing-keys error).
    assert fused.load_state_dict({name: p.detach() * 2 for name, p in own.items()}) is not None
    torch.testing.assert_close(fused[0][0].weight, seq[0].weight * 2)
    x = torch.randn(2, 4)
    zeros = {name: torch.zeros_like(p) for name, p in own.items()}
    torch.testing.assert_close(functional_call(fused, zeros, (x,)), torch.full((2, 3), 1 / 3))
    # The original's keys would set an unused `weight` on the FusedMLP or on a placeholder: refused,
    # never ignored.
    with pytest.raises(AttributeError, match=r"reads 'weight' from its layers .* layers' \(0\.weight, 2\.weight\), "
                                             r"named from the FusedMLP itself: in a model holding it they follow"):
        functional_call(fused, {name: torch.zeros_like(p) for name, p in seq.named_parameters()}, (x,))
    with pytest.raises(AttributeError, match=r"folded into module 0, whose layer '2' holds its weight "
                                             r"\(0\.2\.weight in the named_parameters\(\)"):
        functional_call(fused, {"2.weight": torch.zeros(3, 8)}, (x,))


def test_a_state_dict_giving_a_key_both_ways_is_refused_not_half_loaded():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Softmax(-1))

    fused = pyfastnn.fuse(model())
    both = dict(model().state_dict())  # "3.weight", the original key ...
    both["1.2.weight"] = torch.full((8, 8), 7.0)  # ... and the fused layer's own name for it
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "3.weight"'):
        fused.load_state_dict(both)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "1.2.weight"'):
        model().load_state_dict(both)  # as the original Sequential refuses it


def test_absorbed_placeholders_say_where_their_linears_went():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4),
                        nn.Softmax(-1))
    fused = pyfastnn.fuse(seq)
    assert [repr(m) for m in list(fused)[2:6]] == [
        "Absorbed(fused into module 1)", "Absorbed(nn.Linear fused into module 1 as its layer '2')",
        "Absorbed(fused into module 1)", "Absorbed(nn.Linear fused into module 1 as its layer '4')"]
    assert not hasattr(fused[3], "weight")  # no second path to a parameter (hasattr-based code visits it once)
    with pytest.raises(AttributeError, match=r"layer '4' holds its bias \(1\.4\.bias"):
        fused[5].bias = nn.Parameter(torch.zeros(4))
    with pytest.raises(AttributeError, match=r"layer '2' holds its weight"):  # also registered directly
        fused[3].register_parameter("weight", nn.Parameter(torch.zeros(12, 16)))
    fused[2].note = "a placeholder of a ReLU takes other attributes, as the ReLU did"
    # Inside a model, the key named is the model's; a Linear without a bias had none to set.
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                                                       nn.Linear(16, 4, bias=False), nn.Softmax(-1)))
    nested = pyfastnn.fuse(model)
    with pytest.raises(AttributeError, match=r"\(1\.1\.2\.weight in the named_parameters"):
        nested[1][3].weight = nn.Parameter(torch.zeros(4, 16))
    assert "1.1.2.weight" in dict(nested.named_parameters())
    with pytest.raises(AttributeError, match="that nn.Linear had no bias"):
        nested[1][3].bias = None
    # A size mismatch names the checkpoint's key, not the fused module's own.
    wider = nn.Sequential(nn.Flatten(), nn.Linear(8, 17), nn.ReLU(), nn.Linear(17, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.weight:(.|\n)*size mismatch for 3\.weight:"):
        fused.load_state_dict(wider.state_dict())
    state = seq.state_dict()
    state["3.weight"] = 3  # torch's other message: "While copying the parameter named ..."
    with pytest.raises(RuntimeError, match=r'While copying the parameter named "3\.weight", expected torch\.Tensor'):
        fused.load_state_dict(state)


def test_a_partly_fused_model_loads_with_weights_only_given_pyfastnn_safe_globals(tmp_path):
    """torch.load(weights_only=True) of a whole model: pyfastnn.SAFE_GLOBALS and the model's own
    classes are all it needs (no `getattr`, which would open the unpickler to any attribute)."""
    torch.manual_seed(0)
    model = pyfastnn.fuse(_head_with_a_fused_run())
    torch.save(model, tmp_path / "model.pt")
    own = [nn.Sequential, nn.LayerNorm, nn.Softmax]
    with pytest.raises(Exception, match="Unsupported global"), torch.serialization.safe_globals(own):
        torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.serialization.safe_globals([*pyfastnn.SAFE_GLOBALS, *own]):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x))
    plain = _head_with_a_fused_run()
    assert list(loaded.state_dict()) == list(plain.state_dict())
    state = plain.state_dict()
    del state["3.weight"]
    result = loaded.load_state_dict(state, strict=False)  # the loaded hooks name the original keys
    assert result.missing_keys == ["3.weight"] and result.unexpected_keys == []


def _head_with_a_fused_run():
    """A Sequential that fuse() fuses in place: LayerNorm, then one run (FusedMLP at 1, placeholders
    at 2..5), then a Softmax."""
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4), nn.Softmax(-1))


@pytest.mark.parametrize("change", ["replace a placeholder", "replace the fused module", "insert", "delete"])
def test_a_fused_run_changed_after_fuse_is_refused_where_it_would_run_or_save(change):
    """The fused module computes its whole run from its own index: a module put in a placeholder's
    place ran after the run (a silently different network, whose state dict lost the fused layer's
    weights under the colliding original key), and shifted indices misnamed every key."""
    torch.manual_seed(0)
    original = _head_with_a_fused_run()
    fused = pyfastnn.fuse(original)
    saved = fused.state_dict()
    x = torch.randn(3, 8)
    if change == "replace a placeholder":  # say, a new head to fine-tune: classifier[5] = nn.Linear(...)
        fused[5], slot = nn.Linear(12, 4), "5"
    elif change == "replace the fused module":
        fused[1], slot = nn.Linear(8, 16), "1"
    elif change == "insert":
        fused.insert(0, nn.Identity())
        slot = "1"  # the fused module moved to 2
    else:
        del fused[0]
        slot = "1"
    message = rf"module '{slot}' of this Sequential was replaced, moved or deleted after fuse\(\) folded modules 1\.\.5"
    with pytest.raises(RuntimeError, match=message):
        fused(x)
    with pytest.raises(RuntimeError, match=message):
        fused.state_dict()
    with pytest.raises(RuntimeError, match=message):
        fused.load_state_dict(saved)


def test_a_fused_sequential_guards_its_runs_in_copies_and_still_takes_appended_modules():
    torch.manual_seed(0)
    original = _head_with_a_fused_run()
    fused = pyfastnn.fuse(original)
    x = torch.randn(3, 8)
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        torch.testing.assert_close(twin(x), original(x))
        placeholder = twin[3]
        twin[3] = nn.Identity()  # a copy's guard watches the copy's own modules
        with pytest.raises(RuntimeError, match="module '3' of this Sequential was replaced"):
            twin(x)
        twin[3] = placeholder  # put back, the network is whole again
        torch.testing.assert_close(twin(x), original(x))
        torch.testing.assert_close(fused(x), original(x))  # the original never noticed
    fused.append(nn.Identity())  # after the last run: no index of a run moves
    torch.testing.assert_close(fused(x), original(x))
    fused.load_state_dict(original.state_dict())
    # Inside a model, the message names the Sequential by its path there.
    model = pyfastnn.fuse(nn.Sequential(nn.Identity(), _head_with_a_fused_run()))
    model[1][5] = nn.Linear(12, 4)
    with pytest.raises(RuntimeError, match="module '5' of Sequential '1' was replaced"):
        model(x)


def test_a_wrapper_that_runs_just_the_fused_module_keeps_the_run():
    """apply_activation_checkpointing (FSDP's usual companion) wraps the fused module in place: the
    network and its keys are the same, so the guard takes it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    torch.manual_seed(0)
    original = _head_with_a_fused_run()
    fused = pyfastnn.fuse(original)
    apply_activation_checkpointing(fused, check_fn=lambda module: isinstance(module, FusedMLP))
    assert type(fused[1]) is not FusedMLP
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(fused(x), original(x))
    fused(x).sum().backward()
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict())
    fused[1] = nn.Sequential(fused[1], nn.Identity())  # a module that runs more than the fused one is not a wrapper
    with pytest.raises(RuntimeError, match="module '1' of this Sequential was replaced"):
        fused(x)


@pytest.mark.parametrize("hook", ["forward", "forward pre", "full backward"])
def test_hooks_on_an_absorbed_placeholder_are_refused_at_the_call(hook):
    """A placeholder passes the fused run's output on: a hook there would see that output, not the
    absorbed ReLU's or Linear's (a feature-capturing hook silently captured the wrong tensor)."""
    torch.manual_seed(0)
    fused = pyfastnn.fuse(_head_with_a_fused_run())
    x = torch.randn(3, 8, requires_grad=True)
    for placeholder in (fused[2], fused[3]):  # where a ReLU stood, where a Linear stood
        register = {"forward": placeholder.register_forward_hook,
                    "forward pre": placeholder.register_forward_pre_hook,
                    "full backward": placeholder.register_full_backward_hook}[hook]
        handle = register(lambda *args: None)
        with pytest.raises(RuntimeError, match="this Absorbed placeholder has hooks, but fuse\\(\\) folded the "
                                               "module that stood here into module 1"):
            fused(x)
        handle.remove()
    fused(x).sum().backward()  # without them, it runs again


def test_torch_distributed_checkpoint_of_a_partly_fused_sequential_as_documented(tmp_path):
    """dcp's state-dict helpers walk keys as attribute paths, which the original keys are not here
    (README); dcp.save / dcp.load of the module's own state_dict() work."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Softmax(-1))  # noqa: E731
    fused = pyfastnn.fuse(make())
    with pytest.raises(AttributeError):
        get_model_state_dict(fused)
    dcp.save(fused.state_dict(), checkpoint_id=tmp_path)
    other = pyfastnn.fuse(make())
    state = other.state_dict()
    dcp.load(state, checkpoint_id=tmp_path)
    other.load_state_dict(state)
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), fused(x))
    plain = make()  # ... and the same files load into the plain model
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=tmp_path)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), fused(x))


def test_a_partly_fused_sequential_with_a_parametrized_layer_loads_its_own_state_dict():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(-1))
    fused = pyfastnn.fuse(seq)
    torch.nn.utils.parametrizations.weight_norm(fused[0][0])
    state = fused.state_dict()
    assert "0.parametrizations.weight.original0" in state
    assert fused.load_state_dict(state) is not None
    assert fused.load_state_dict(dict(fused.named_parameters()) | {n: b for n, b in fused.named_buffers()}) is not None


def test_fuse_refuses_a_compiled_model_and_leaves_compiled_children_alone():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="got a torch.compile'd model.*fuse first, then compile"):
        pyfastnn.fuse(torch.compile(seq))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
            self.head = nn.Sequential(nn.Linear(8, 2), nn.ReLU())

        def forward(self, x):
            return self.head(self.block(x))

    runs = []
    with pytest.warns(UserWarning, match="left 'block' unfused: torch.compile wrappers") as caught:
        fused = pyfastnn.fuse(Net(), report=runs)
    assert [run.path for run in runs] == ["head"] and type(fused.block._orig_mod[0]) is nn.Linear
    assert {w.filename for w in caught if "pyfastnn.fuse" in str(w.message)} == {__file__}


def test_fuse_leaves_a_dropout_whose_p_is_no_float_alone():
    for p in (torch.tensor(0.2), False):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(p))
        fused = pyfastnn.fuse(model)
        assert [type(m).__name__ for m in fused] == ["FusedLinear", "Absorbed", "Dropout"]


def _train_steps(model, x, steps=5):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    return model(x).pow(2).mean().item()


@pytest.mark.parametrize("convert", ["fuse", "from_sequential"])
def test_a_linear_used_at_several_places_stays_one_layer_through_module_by_module_rebuilds(convert):
    """nn.Sequential(*[nn.Linear(8, 8), nn.Tanh()] * 3) holds one Linear: its fused form holds one
    FusedLinear, so that a meta-device model loaded from a checkpoint, load_state_dict(assign=True)
    and a parametrization per module keep its uses one layer, as they do in the original."""
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Linear(8, 8), nn.Tanh()] * 3, nn.Linear(8, 2))
    fused = pyfastnn.fuse(plain) if convert == "fuse" else FusedMLP.from_sequential(plain, copy=True)
    assert isinstance(fused, FusedMLP) and fused[0] is fused[1] is fused[2]
    assert len(list(fused.parameters())) == 4 and list(fused.state_dict()) == list(plain.state_dict())
    checkpoint = {key: value.clone() for key, value in plain.state_dict().items()}
    x = torch.randn(16, 8)

    def rebuilt(model):
        model = copy.deepcopy(model).to("meta").to_empty(device="cpu")
        model.load_state_dict(checkpoint)
        return model

    def assigned(model):
        model = copy.deepcopy(model)
        model.load_state_dict({key: value.clone() for key, value in checkpoint.items()}, assign=True)  # trained later
        return model

    for rebuild in (rebuilt, assigned):
        expected = _train_steps(rebuild(plain), x)
        model = rebuild(fused)
        assert len(list(model.parameters())) == 4, rebuild.__name__
        assert _train_steps(model, x) == pytest.approx(expected, rel=1e-5), rebuild.__name__
    for model, kind in ((copy.deepcopy(plain), nn.Linear), (copy.deepcopy(fused), FusedLinear)):
        for module in list(model.modules()):
            if isinstance(module, kind):
                torch.nn.utils.parametrizations.weight_norm(module)
        assert len(list(model.parameters())) == 6, kind  # a (g, v) pair per module, and two biases
    back = fused.to_sequential()
    assert back[0] is back[2] is back[4] and back[1] is back[3]


def test_a_linear_fusable_at_one_place_and_not_at_another_stays_one_module():
    # Fused at one place only, it would become two modules sharing parameters, which rebuilds
    # module by module (assign=True, a meta-device load) would split into two layers.
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 2)),
                           "b": nn.Sequential(shared, nn.Softmax(-1))})
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert runs == [] and fused["a"][0] is fused["b"][0] and type(fused["a"][0]) is nn.Linear


def test_an_activation_with_a_setting_absorbed_at_one_place_only_stays_one_module():
    # Absorbed after the Linear and kept after the Softplus, the LeakyReLU's slope would be copied into
    # the fused layer, and a later change of the module that stays would reach one place only.
    act = nn.LeakyReLU(0.1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 8)), nn.Sequential(nn.Softplus(), act))
    fused = pyfastnn.fuse(model)
    assert fused[0][1] is fused[1][1] and type(fused[0][1]) is nn.LeakyReLU
    for candidate in (model, fused):
        candidate[1][1].negative_slope = 0.5
    x = torch.randn(5, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_an_activation_also_held_outside_the_module_tree_is_not_absorbed():
    class Holder(nn.Module):
        def __init__(self, activation):
            super().__init__()
            self.activations = [activation]  # a plain list: the module tree does not see it

        def forward(self, x):
            return self.activations[0](x - 1.0)

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.ReLU())
    model = nn.Sequential(body, Holder(body[1])).eval()
    fused = pyfastnn.fuse(model)
    assert type(fused[0][1]) is nn.LeakyReLU and fused[1].activations[0] is fused[0][1]
    assert type(fused[0][2]) is FusedLinear  # the run after it still fuses
    for candidate in (model, fused):
        candidate[1].activations[0].negative_slope = 0.5  # the user tunes the module they hold
    x = torch.randn(5, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_a_sequential_a_fused_mlp_would_give_other_keys_is_fused_in_place():
    # An Identity between the Linears: a FusedMLP in its place would name its layers 0 and 1, where the
    # Sequential's keys are 0 and 2, and the model's checkpoints would no longer load.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 2), nn.Tanh())
    fused = pyfastnn.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict({key: value + 1 for key, value in model.state_dict().items()})
    model.load_state_dict({key: value + 1 for key, value in model.state_dict().items()})
    assert_same_function(model, fused, torch.randn(3, 4))


def test_a_linear_used_twice_in_a_partly_fused_sequential_keeps_the_original_keys():
    shared = nn.Linear(8, 8)
    plain = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 2), nn.LayerNorm(2))
    fused = pyfastnn.fuse(plain)
    assert isinstance(fused[0], FusedMLP) and fused[0][0] is fused[0][1]
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [repr(fused[i]) for i in (2, 4)] == ["Absorbed(nn.Linear fused into module 0 as its layer '2')",
                                                "Absorbed(nn.Linear fused into module 0 as its layer '4')"]
    rebuilt = copy.deepcopy(fused).to("meta").to_empty(device="cpu")
    rebuilt.load_state_dict(plain.state_dict())
    assert len(list(rebuilt.parameters())) == len(list(plain.parameters())) == 6
    x = torch.randn(3, 8)
    torch.testing.assert_close(rebuilt(x), plain(x))


def test_a_linear_followed_by_other_activations_at_its_uses_is_left_to_itself_by_fuse():
    """No one fused layer can stand for all its uses, and several would be several modules where the
    model has one; FusedMLP.from_sequential, asked for, gives each kind of use its layer, sharing the
    parameters as weights tied between modules do."""
    shared = nn.Linear(8, 8)
    plain = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh(), shared, nn.ReLU(), nn.Linear(8, 2))
    fused = pyfastnn.fuse(plain)
    assert type(fused[0]) is nn.Linear and fused[0] is fused[2] is fused[4]
    mlp = FusedMLP.from_sequential(plain)
    assert mlp[0] is mlp[2] and mlp[1] is not mlp[0] and mlp[1].weight is mlp[0].weight
    x = torch.randn(4, 8)
    torch.testing.assert_close(mlp(x), plain(x))

    class CallsItElsewhere(nn.Module):  # one use in a Sequential, one in its own forward
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.seq = nn.Sequential(self.fc, nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.seq(torch.tanh(self.fc(x)))

    fused = pyfastnn.fuse(CallsItElsewhere())
    assert type(fused.fc) is nn.Linear and fused.fc is fused.seq[0]
    # Inside a run worth fusing at one place, alone at another: it stays one Linear at both, and the
    # run around it changes accordingly.
    shared = nn.Linear(8, 8)
    fused = pyfastnn.fuse(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.LayerNorm(8), shared))
    assert type(fused[0]) is FusedLinear and type(fused[2]) is nn.Linear and fused[2] is fused[4]
    fused = pyfastnn.fuse(nn.Sequential(nn.Sequential(shared), nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 8))))
    assert fused[0][0] is fused[1][0] and type(fused[0][0]) is nn.Linear


def test_fuse_leaves_what_it_cannot_see_through_or_would_split():
    """A forward that reaches the modules below its children through its own structure
    (named_children, get_submodule), untraceable so no graph says which; a class overriding what
    torch calls on modules (train, extra state, a versioned state dict); an activation with a
    setting held at several places; one called after a Linear that stays (called in a loop) too."""
    import torch.nn.functional as F

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            self.box = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            if x.dim() == 1:  # data-dependent: no trace
                x = x.unsqueeze(0)
            out = {}
            for name, head in self.named_children():
                out[name], out[name + "_embedding"] = head(x), head[0](x)  # the first layer's pre-activation
            return out

    torch.manual_seed(0)
    heads, x = Heads(), torch.randn(3, 8)
    fused = pyfastnn.fuse(heads)
    assert all(torch.equal(fused(x)[key], value) for key, value in heads(x).items())

    class FrozenNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 8)

        def forward(self, x):
            return F.relu(self.fc(self.norm(x)))

        def train(self, mode=True):  # the norm stays in eval, as detection code keeps its BatchNorms
            super().train(mode)
            self.norm.eval()
            return self

    class WithExtraState(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return F.relu(self.fc(x))

        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    for model in (FrozenNorm(), WithExtraState()):
        fused = pyfastnn.fuse(model).train()
        assert type(fused) is type(model) and list(fused.state_dict()) == list(model.state_dict())
    assert not pyfastnn.fuse(FrozenNorm()).train().norm.training

    class Block(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), act

        def forward(self, x):
            return self.act(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.LeakyReLU(0.1)  # one module, its slope set once for all its places
            self.first, self.second = Block(self.act), Block(self.act)

        def forward(self, x):
            return self.act(self.second(self.first(x)))

    fused = pyfastnn.fuse(Net())
    assert fused.first.act is fused.second.act is fused.act and type(fused.first.fc) is nn.Linear

    class Recurrent(nn.Module):  # one ReLU after a Linear called once and after one called in a loop
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            h = self.act(self.inp(x))
            for _ in range(2):
                h = self.act(self.rec(h))
            return h

    fused = pyfastnn.fuse(Recurrent())  # absorbed at one call only, the ReLU would be two things
    assert type(fused.inp) is nn.Linear and type(fused.act) is nn.ReLU


def _sequential():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8))


class _PreActivation(nn.Module):
    """A Sequential's first Linear, also called alone by a forward no graph records (data-dependent)."""
    def __init__(self):
        super().__init__()
        self.seq = _sequential()


class _ByGetattr(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), getattr(self, "seq")[0](x)


class _ByGetattrAlias(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        seq = getattr(self, "seq")
        return seq(x), seq[0](x)


class _ByModulesDict(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self._modules["seq"][0](x)


class _ByChildrenList(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), list(self.children())[0][0](x)


class _ByPlainList(_PreActivation):
    def __init__(self):
        super().__init__()
        self.taps = [self.seq[0]]  # not a child: the module tree does not see it

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.taps[0](x)


class _ByHelperMethod(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.pre_activation(x)

    def pre_activation(self, x):  # not forward, but called by it (or by anyone)
        return self.get_submodule("seq.0")(x)


class _ByAliasIndexed(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        seq = self.seq
        return seq(x), seq[0](x)


class _InAModuleList(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8))])
        self.seq = self.heads[0]

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return [out for head in self.heads for out in (head(x), head[0](x))]


def _first_layer(model, x):
    return model.seq[0](x)


class _BySelfGivenAway(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), _first_layer(self, x)


class _ByPartialOfSelf(_PreActivation):
    def __init__(self):
        super().__init__()
        self.pre_activation = functools.partial(_first_layer, self)  # runs later, reaching into self

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.pre_activation(x)


class _Holder:
    def __init__(self, layer):
        self.layer = layer


class _ByObjectHolding(_PreActivation):
    def __init__(self):
        super().__init__()
        self.holder = _Holder(self.seq[0].forward)  # a plain object holding a bound method

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.holder.layer(x)


class _ByModuleDictItems(nn.Module):
    def __init__(self):
        super().__init__()
        self.seqs = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8))})
        self.seq = self.seqs["a"]

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return [out for _, seq in self.seqs.items() for out in (seq(x), seq[0](x))]


class _ByClassLambda(_PreActivation):
    pre_activation = lambda self, x: self.seq[0](x)  # noqa: E731 - a method written as a lambda

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.pre_activation(x)


class _ByClosureInInit(_PreActivation):
    def __init__(self):
        super().__init__()
        first = self.seq[0]
        self.pre_activation = lambda x: first(x)  # the closure holds the Linear

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), self.pre_activation(x)


class _ByDefaultArgument(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        pre_activation = lambda t, seq=self.seq: seq[0](t)  # noqa: E731
        return self.seq(x), pre_activation(x)


class _ByNextOfIter(_PreActivation):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x), next(iter(self.seq))(x)


def _pre_activation_hook(module, inputs, output):
    return output, module[0](inputs[0])


class _ByHookOnTheSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8))
        self.seq.register_forward_hook(_pre_activation_hook)

    def forward(self, x):
        return self.seq(x)


@pytest.mark.parametrize("model_class", [_ByGetattr, _ByGetattrAlias, _ByModulesDict, _ByChildrenList, _ByPlainList,
                                         _ByHelperMethod, _ByAliasIndexed, _InAModuleList, _BySelfGivenAway,
                                         _ByPartialOfSelf, _ByObjectHolding, _ByModuleDictItems, _ByClassLambda,
                                         _ByClosureInInit, _ByDefaultArgument, _ByHookOnTheSequential,
                                         _ByNextOfIter])
def test_fuse_leaves_a_linear_reached_past_its_sequential_by_any_way(model_class):
    """getattr(self, ...), self._modules[...], list(self.children()), get_submodule in a helper
    method, an alias indexed, a loop variable indexed (also over a ModuleDict's items()), self given
    to a function (now or through a functools.partial), a method written as a lambda, a default
    argument, a forward hook, and a list, plain object or closure holding it reach a Sequential's
    Linear alone (its pre-activation): fused with the ReLU after it, that call would get the ReLU,
    and a Linear held outside the module tree would keep parameters the fused layer no longer has
    once rebuilt (load_state_dict(assign=True))."""
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    model = model_class()
    torch.manual_seed(0)
    in_place = model_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a top-level forward that would need tracing stays, with a warning
        assert pyfastnn.fuse(in_place, inplace=True) is in_place
    # (fuse's copy of a closure is the closure itself, calling the original's Linear: only in place
    # is the Linear the closure holds in the model fused.)
    assert type(in_place.seq[0]) is nn.Linear
    fused = pyfastnn.fuse(model)
    for candidate in (fused, in_place):
        for got, expected in zip(candidate(x), model(x)):
            torch.testing.assert_close(got, expected)
    state = {key: value + 1 for key, value in model.state_dict().items()}
    for candidate in (model, fused, in_place):
        candidate.load_state_dict(state, assign=True)
    for candidate in (fused, in_place):
        for got, expected in zip(candidate(x), model(x)):
            torch.testing.assert_close(got, expected)


# More ways a model reaches a Sequential's first Linear alone, by code fuse() reads (its class
# source, hooks, functions it holds) or by objects holding the Sequential itself or its parent (the
# models above hold or reach the Linear from the Sequential's owner): fused with the ReLU after it,
# that call would silently get the ReLU too. `_PROBES` says how a user reaches it.

def _first_of(seq, x):
    return seq[0](x)


def _first_of_blocks(blocks, x):
    return blocks[0][0](x)


class _Seq(_PreActivation):
    def forward(self, x):
        return self.seq(x)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_sequential()])

    def forward(self, x):
        return self.blocks[0](x)


class _HeldByPartial(_Seq):
    def __init__(self):
        super().__init__()
        self.pre = functools.partial(_first_of, self.seq)


class _Slots:
    __slots__ = ("seq",)

    def __init__(self, seq):
        self.seq = seq


class _OneSlot:
    __slots__ = "seq"  # a single slot, named by a string

    def __init__(self, seq):
        self.seq = seq


class _HeldBySlots(_Seq):
    def __init__(self):
        super().__init__()
        self.holder = _Slots(self.seq)


class _HeldByOneSlot(_Seq):
    def __init__(self):
        super().__init__()
        self.holder = _OneSlot(self.seq)


class _HeldInAList(_Seq):
    def __init__(self):
        super().__init__()
        self.taps = [self.seq]  # the Sequential, not its Linear


class _HeldInADict(_Seq):
    def __init__(self):
        super().__init__()
        self.taps = {"seq": self.seq}


class _HeldDeep(_Seq):
    def __init__(self):
        super().__init__()
        self.stages = {"encoder": [(self.seq, "encoder")]}


class _BoundToSelfInInit(_Seq):
    def __init__(self):
        super().__init__()
        self.pre = types.MethodType(_first_layer, self)


def _add_first_layer(module, inputs):
    return (inputs[0] + module[0](inputs[0]),)


class _TapOutput:  # a callable object as a hook: no function source to read
    def __call__(self, module, inputs, output):
        return output + module[0](inputs[0])


class _ByPreHook(_Seq):
    def __init__(self):
        super().__init__()
        self.seq.register_forward_pre_hook(_add_first_layer)


class _ByCallableObjectHook(_Seq):
    def __init__(self):
        super().__init__()
        self.seq.register_forward_hook(_TapOutput())


class _ByBoundGrandchild(_Blocks):
    def forward(self, x):
        if x.dim() == 1:  # data-dependent: no graph, the source alone says what forward reaches
            x = x.unsqueeze(0)
        first = self.blocks[0][0]
        return self.blocks[0](x) + first(x)


class _ByNestedIndex(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.blocks[0](x) + self.blocks[0][0](x)


class _ByKeywordArgument(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.blocks[0](x) + _first_of_blocks(blocks=self.blocks, x=x)


class _ByHandingOn(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.blocks[0](x) + _first_of_blocks(self.blocks, x)


class _ByAliasHandedOn(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        blocks = self.blocks
        return self.blocks[0](x) + _first_of_blocks(blocks, x)


class _ByAliasOfAlias(_Blocks):
    def forward(self, x):
        if x.dim() == 2:
            blocks = self.blocks
        else:
            blocks = self.blocks
        chosen = blocks
        return self.blocks[0](x) + chosen[0][0](x)


class _ByLambdaDefault(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        pre = lambda t, blocks=self.blocks: blocks[0][0](t)  # noqa: E731
        return self.blocks[0](x) + pre(x)


class _ByReturningHelper(_Blocks):
    def all_blocks(self):
        return self.blocks

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.blocks[0](x) + self.all_blocks()[0][0](x)


class _ByHelperHandingOn(_Blocks):
    def run_first(self, x):  # run by forward
        return _first_of_blocks(self.blocks, x)

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.blocks[0](x) + self.run_first(x)


class _ByMatch(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        match list(self.blocks):
            case [first, *_]:
                return self.blocks[0](x) + first[0](x)


class _ByIteration(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        for layer in self.seq:
            return self.seq(x) + layer(x)  # the first layer alone


class _ByDunderGetitem(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x) + self.seq.__getitem__(0)(x)


class _ByDunderGetattr(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x) + self.__getattr__("seq")[0](x)


class _BySuperGetattr(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x) + super().__getattr__("seq")[0](x)


class _ByModulesLoop(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        out = self.seq(x)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                out = out + module(x)
        return out


class _ByApply(_Seq):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        outs = []
        self.apply(lambda m: outs.append(m(x)) if type(m) is nn.Linear else None)
        return self.seq(x) + sum(outs)


_STORE = types.SimpleNamespace(held=None)


class _ByStoringOutside(_Blocks):
    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        _STORE.held = self.blocks  # where other code reaches into it
        return self.blocks[0](x)


class _HookClosingOverSelf(_Seq):
    def __init__(self):
        super().__init__()
        self.seq[2].register_forward_hook(lambda module, inputs, output: output + self.seq[0](inputs[0]))


class _ByCheckpointInAMethod(_Blocks):
    def pre_activation(self, x):  # not run by forward
        return checkpoint(self.blocks[0][0], x, use_reentrant=False)


class _ByWithInAMethod(_Blocks):
    def pre_activation(self, x):
        with contextlib.nullcontext(self.blocks) as blocks:
            return blocks[0][0](x)


class _ByWithKeywordInAMethod(_Blocks):
    def pre_activation(self, x):
        with contextlib.nullcontext(enter_result=self.blocks) as blocks:
            return blocks[0][0](x)


class _ByAListInAMethod(_Blocks):
    def pre_activation(self, x):
        held = [self.blocks]
        return held[0][0][0](x)


class _ByMethodUnderAnIf(_Seq):
    if hasattr(nn.Module, "forward"):
        def pre_activation(self, x):
            return self.seq[0](x)


class _ByGetSubmoduleForward(_Seq):
    def pre_activation(self, x):
        return self.get_submodule("seq.0").forward(x)


class _ByNextChild(_Seq):
    def pre_activation(self, x):
        return next(self.children())[0](x)


class _WithAHelper(_Seq):
    def pre_activation(self, x):
        return self.seq[0](x)


class _ByBaseClassMethod(_WithAHelper):
    def forward(self, x):
        return self.seq(x) * 2


def _logged(function):  # a decorator without functools.wraps
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)
    return wrapper


def _first_layer_module(self):
    return self.seq[0]


class _ByMethodWrittenElsewhere(_Seq):
    pre_activation = _first_layer


class _ByUnwrappedDecorator(_Seq):
    pre_activation = _logged(_first_layer)


class _ByLruCache(_Seq):
    pre_activation = functools.lru_cache(_first_layer)


class _ByPropertyWrittenElsewhere(_Seq):
    first = property(_first_layer_module)

    def forward(self, x):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.seq(x) + self.first(x)


_UNREADABLE = {"_Seq": _Seq}
exec("class _Unreadable(_Seq):\n"  # a class whose source inspect cannot find
     "    def forward(self, x):\n"
     "        if x.dim() == 1:\n"
     "            x = x.unsqueeze(0)\n"
     "        return self.seq(x) + self.seq[0](x)\n", _UNREADABLE)


def _by_partial_of_the_model():
    model = _Seq()
    model.pre = functools.partial(_first_layer, model)  # set by the user's code, outside the class
    return model


_PRE = lambda m, x: m.pre(x)  # noqa: E731
_PRE_ACTIVATION = lambda m, x: m.pre_activation(x)  # noqa: E731
_PROBES = {
    _HeldByPartial: _PRE, _BoundToSelfInInit: _PRE, _by_partial_of_the_model: _PRE,
    _HeldBySlots: lambda m, x: m.holder.seq[0](x), _HeldByOneSlot: lambda m, x: m.holder.seq[0](x),
    _HeldInAList: lambda m, x: m.taps[0][0](x), _HeldInADict: lambda m, x: m.taps["seq"][0](x),
    _HeldDeep: lambda m, x: m.stages["encoder"][0][0][0](x),
    _ByStoringOutside: lambda m, x: (m(x), _STORE.held[0][0](x))[1],
    **{cls: _PRE_ACTIVATION for cls in (_ByCheckpointInAMethod, _ByWithInAMethod, _ByWithKeywordInAMethod,
                                        _ByAListInAMethod, _ByMethodUnderAnIf,
                                        _ByGetSubmoduleForward, _ByNextChild, _ByBaseClassMethod,
                                        _ByMethodWrittenElsewhere, _ByUnwrappedDecorator, _ByLruCache)},
}


@pytest.mark.parametrize("make", [
    _HeldByPartial, _HeldBySlots, _HeldByOneSlot, _HeldInAList, _HeldInADict, _HeldDeep, _BoundToSelfInInit,
    _by_partial_of_the_model, _ByPreHook, _ByCallableObjectHook, _ByBoundGrandchild, _ByNestedIndex,
    _ByKeywordArgument, _ByHandingOn, _ByAliasHandedOn, _ByAliasOfAlias, _ByLambdaDefault, _ByReturningHelper,
    _ByHelperHandingOn, _ByMatch, _ByIteration, _ByDunderGetitem, _ByDunderGetattr, _BySuperGetattr, _ByModulesLoop,
    _ByApply, _ByStoringOutside, _ByCheckpointInAMethod, _ByWithInAMethod, _ByWithKeywordInAMethod,
    _ByAListInAMethod, _ByMethodUnderAnIf, _ByGetSubmoduleForward, _ByNextChild,
    _ByBaseClassMethod, _ByMethodWrittenElsewhere, _ByUnwrappedDecorator, _ByLruCache, _ByPropertyWrittenElsewhere,
    _UNREADABLE["_Unreadable"],
], ids=lambda make: make.__name__.strip("_"))
def test_fuse_leaves_a_linear_its_model_reaches_alone_in_any_way(make):
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forwards that would need tracing stay, with a warning
        fused = pyfastnn.fuse(model)
    probe = _PROBES.get(make, lambda m, x: m(x))
    x = torch.randn(3, 8)
    torch.testing.assert_close(probe(fused, x), probe(model, x))
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_in_place_leaves_a_linear_reached_by_functions_the_model_holds():
    # In place, these functions reach the very modules fuse() would replace: a default argument set
    # by the user's code, and a hook closing over self.
    def with_default_argument():
        model = _Seq()
        model.pre = lambda t, seq=model.seq: seq[0](t)
        return model

    x = torch.randn(3, 8)
    for make, probe in ((with_default_argument, _PRE), (_HookClosingOverSelf, lambda m, x: m(x))):
        torch.manual_seed(1)
        model = make()
        torch.manual_seed(1)
        reference = make()
        assert pyfastnn.fuse(model, inplace=True) is model
        torch.testing.assert_close(probe(model, x), probe(reference, x))
        torch.testing.assert_close(model(x), reference(x))


def test_what_fuse_leaves_alone_stays_narrow():
    """A forward looping over its children (each runs its own forward) and an activation or Dropout
    with a setting shared by places that are all absorbed (none is left to differ) still fuse."""
    class WalkChildren(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 2), nn.Sigmoid())

        def forward(self, x):
            for _, child in self.named_children():
                x = child(x)
            return x

    class ByName(WalkChildren):  # each child called by a name the source does not spell: its own forward
        def forward(self, x):
            if x.dim() == 1:  # data-dependent: no trace
                x = x.unsqueeze(0)
            for name in ("body", "head"):
                x = getattr(self, name)(x) if name == "body" else self._modules[name](x)
            return x

    class Blocks(nn.Module):  # enumerate, a comprehension of outputs, init code walking modules()
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
            self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 4), nn.Tanh()) for _ in range(2)])
            self.names = ["layers", "heads"]  # a list of strings: nothing to hold
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            if x.dim() == 1:  # data-dependent: no trace
                x = x.unsqueeze(0)
            for i, layer in enumerate(self.layers):
                x = layer(x) + x
            out = torch.cat([head(x) for head in self.heads], -1)
            return out.view(len(x), -1)

        def reset_biases(self):
            for m in self.modules():
                if isinstance(m, (nn.Linear, FusedLinear)):
                    nn.init.zeros_(m.bias)

    class Helpers(nn.Module):  # a static helper, a method of its own kept, a buffer named like a method
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.register_buffer("values", torch.ones(8))
            self.mix = self._mix_fast  # a bound method of its own: the module itself, held

        @staticmethod
        def scale(t):
            return torch.tanh(t)

        def _mix_fast(self, x):
            return x * self.values

        def forward(self, x):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            return self.scale(self.mix(self.mlp(x)))

    class CheckpointedBlocks(nn.Module):  # as timm's models: checkpointing, helpers forward never runs
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
            self.grad_checkpointing = False

        def forward(self, x):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if self.grad_checkpointing:
                x = checkpoint_sequential(self.blocks, 2, x, use_reentrant=False)
            else:
                x = self.blocks(x)
            return x

        def fix_init_weight(self):
            for layer_id, layer in enumerate(self.blocks):
                layer[0].weight.data.div_(layer_id + 1)

        def forward_intermediates(self, x):
            intermediates = []
            for block in self.blocks[:2]:
                x = block(x)
                intermediates.append(x)
            return intermediates

    class ByProperty(nn.Module):  # an accessor handing out the blocks, looped over whole
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

        @property
        def layers(self):
            return self.blocks

        def forward(self, x):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            for block in self.layers:
                x = block(x)
            return x

    class CountsBlocks(ByProperty):  # a builtin's answer about the blocks holds none of them
        def forward(self, x):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            n = len(self.blocks)
            for i in range(n):
                x = self.blocks[i](x)
            return x

    class ChildrenListed(nn.Module):  # a child called whole: nothing below it reached alone
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())

        def forward(self, x):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            return list(self.children())[0](x)

    gelu, dropout = nn.GELU(), nn.Dropout(0.1)
    from torch.utils.checkpoint import checkpoint_sequential
    for model in (WalkChildren(), ByName(), Blocks(), Helpers(), CheckpointedBlocks(), ByProperty(), CountsBlocks(),
                  ChildrenListed(),
                  nn.Sequential(nn.Linear(8, 16), gelu, nn.Linear(16, 16), gelu, nn.Linear(16, 2)),
                  nn.Sequential(nn.Linear(8, 16), nn.ReLU(), dropout, nn.Linear(16, 16), nn.ReLU(), dropout,
                                nn.Linear(16, 2)),
                  nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), gelu) for _ in range(3)])):
        runs = []
        fused = pyfastnn.fuse(model.eval(), report=runs)
        assert not any(type(m) in (nn.Linear, nn.GELU, nn.Dropout) for m in fused.modules()), runs
        x = torch.randn(3, 8)
        torch.testing.assert_close(fused(x), model(x))


def test_fuse_warns_that_its_copy_drops_parameter_hooks_and_attributes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.register_hook(lambda grad: grad * 0)
    model[2].bias.no_weight_decay = True
    with pytest.warns(UserWarning, match=r"copy of the model .* parameters '0\.weight', '2\.bias': register them"):
        pyfastnn.fuse(model)
    frozen = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = pyfastnn.fuse(model, inplace=True)  # the same parameters: nothing lost
    fused(torch.randn(3, 4)).sum().backward()
    assert fused[0][0].weight is frozen and not frozen.grad.any()


def test_fuse_after_torch_compile_ran_the_model_does_not_warn_of_its_markers():
    # torch.compile leaves _dynamo_* attributes on the parameters of a model it ran; the user set nothing.
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torch._dynamo.reset()  # a frame compiled by an earlier test would be reused without marking these
    torch.compile(model, backend="eager")(torch.randn(3, 4))
    assert any(vars(p) for p in model.parameters()), "torch.compile no longer marks parameters"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfastnn.fuse(model)


def test_concurrent_fuse_calls_leave_nn_module_working():
    # torch.fx patches nn.Module.__call__ and __getattr__ while it traces; interleaved traces in
    # several threads could leave them patched, and every module call in the process would fail.
    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    before, errors = (nn.Module.__call__, nn.Module.__getattr__), []

    def fuse_repeatedly(model):
        try:
            for _ in range(5):
                pyfastnn.fuse(model)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=fuse_repeatedly, args=(Traced().eval(),)) for _ in range(12)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: unserialised traces would interleave
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and (nn.Module.__call__, nn.Module.__getattr__) == before
    assert nn.Linear(4, 4)(torch.randn(2, 4)).shape == (2, 4)
