"""The lesson's models on fused layers, against their numpy / plain-PyTorch twins."""

import numpy as np
import pytest
import torch
from torch import nn

import pyfastnn
from pyfastnn import FusedLinear
from pyfastnn.lesson import models

X = models.XOR_INPUTS


@pytest.mark.parametrize("targets", [models.AND_TARGETS, models.OR_TARGETS], ids=["AND", "OR"])
def test_perceptron_learns_and_or(targets):
    for seed in range(5):
        p = models.Perceptron(2, seed=seed).fit(X, targets, epochs=100, lr=0.1)
        assert p.predict(X).tolist() == targets.tolist()


def test_perceptron_cannot_learn_xor():
    for seed in range(5):
        p = models.Perceptron(2, seed=seed).fit(X, models.XOR_TARGETS, epochs=1000, lr=0.1)
        assert p.predict(X).tolist() != models.XOR_TARGETS.reshape(-1).astype(int).tolist()


def test_perceptron_steps_to_1_only_above_zero():
    # The lesson's step function: 1 if z > 0 else 0, so a weighted sum of exactly 0 is 0.
    p = models.Perceptron(2, seed=0)
    p.weights.fill_(1.0)
    p.bias.fill_(-1.0)
    assert p.predict([[0, 1], [1, 0], [1, 1], [0, 0]]).tolist() == [0, 0, 1, 0]


def test_numpy_net_starts_as_the_lesson_does():
    # The lesson's initialisation: weights drawn from N(0, 1) scaled by 0.01, biases zero.
    net = models.NumpyTwoLayerNet(2, 4, 1, seed=0)
    assert net.W1.shape == (2, 4) and net.W2.shape == (4, 1)
    assert not net.b1.any() and not net.b2.any() and net.b1.shape == (1, 4) and net.b2.shape == (1, 1)
    assert 0 < np.abs(np.concatenate([net.W1.ravel(), net.W2.ravel()])).max() < 0.05


@pytest.mark.parametrize("init_scale", [0.01, 1.0])
def test_fused_two_layer_net_follows_numpy_net_exactly(init_scale):
    scratch = models.NumpyTwoLayerNet(2, 4, 1, seed=0, init_scale=init_scale)
    fused = models.TwoLayerNet.from_numpy(scratch)
    expected = scratch.fit(X, models.XOR_TARGETS, epochs=1000, learning_rate=1.0)
    losses = fused.fit(X, models.XOR_TARGETS, epochs=1000, learning_rate=1.0)
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fused.hidden.weight.detach().numpy(), scratch.W1.T, atol=1e-8)


def test_numpy_net_learns_xor_with_symmetry_broken():
    net = models.NumpyTwoLayerNet(2, 4, 1, seed=0, init_scale=1.0)
    losses = net.fit(X, models.XOR_TARGETS, epochs=5000, learning_rate=1.0)
    assert losses[-1] < 0.01 < losses[0]
    assert ((net.forward(X) > 0.5) == (models.XOR_TARGETS > 0.5)).all()


def test_numpy_net_answers_to_the_lessons_names():
    """The lesson's class name and methods: NeuralNetwork(2, 4, 1), sigmoid, sigmoid_derivative of
    the output (a * (1 - a)), forward, backward, train."""
    from pyfastnn.lesson import NeuralNetwork
    net = NeuralNetwork(2, 4, 1, seed=0, init_scale=1.0)
    z = np.array([-1000.0, -2.0, 0.0, 3.0])
    a = net.sigmoid(z)
    np.testing.assert_allclose(a, 1 / (1 + np.exp(-np.clip(z, -500, 500))))
    np.testing.assert_allclose(net.sigmoid_derivative(a), a * (1 - a))
    before = net.W2.copy()
    net.forward(X)
    net.backward(X, models.XOR_TARGETS, learning_rate=1.0)
    # The output layer's step, by the lesson's formula.
    delta = (net.a2 - models.XOR_TARGETS) * net.a2 * (1 - net.a2)
    np.testing.assert_allclose(net.W2, before - net.a1.T @ delta / len(X))


def test_numpy_net_stays_on_the_saddle_from_the_lessons_small_initialisation():
    # The lesson's randn * 0.01: every hidden unit starts nearly the same, the network predicts 0.5
    # for every input and the MSE stays at 0.25 (README, the lesson's models).
    net = models.NumpyTwoLayerNet(2, 4, 1, seed=0, init_scale=0.01)
    losses = net.fit(X, models.XOR_TARGETS, epochs=5000, learning_rate=1.0)
    assert abs(losses[0] - 0.25) < 1e-3 and abs(losses[-1] - 0.25) < 1e-3
    assert np.allclose(net.forward(X), 0.5, atol=0.01)


def _train_xor(model, steps=1000):
    x = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(models.XOR_TARGETS, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model(x).detach()


def test_simple_nn_solves_xor_and_matches_plain_twin_step_by_step():
    torch.manual_seed(0)
    fused = models.SimpleNN(2, 4, 1)
    twin = fused.to_torch()
    assert [type(m) for m in twin] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    fused_losses, predictions = _train_xor(fused)
    twin_losses, _ = _train_xor(twin)
    np.testing.assert_allclose(fused_losses, twin_losses, rtol=1e-4, atol=1e-5)
    assert ((predictions > 0.5).float() == torch.tensor(models.XOR_TARGETS, dtype=torch.float32)).all()


def test_simple_nn_solves_xor_from_some_seeds_only_as_the_lessons_nn_linear_version_does():
    """Four hidden ReLU units: from some initial weights units die and XOR stays unsolved (4 of
    seeds 0-9), for the lesson's plain nn.Linear model from the same weights just the same."""
    def solves(model) -> bool:
        _, predictions = _train_xor(model)
        return bool(((predictions > 0.5).float() == torch.tensor(models.XOR_TARGETS, dtype=torch.float32)).all())

    solved = []
    for seed in range(10):
        torch.manual_seed(seed)
        fused = models.SimpleNN(2, 4, 1)
        plain = fused.to_torch()  # the same initial weights
        fused_solves = solves(fused)
        assert fused_solves == solves(plain), seed
        if fused_solves:
            solved.append(seed)
    assert solved == [0, 1, 3, 5, 7, 8]


def test_mnist_classifier_shapes_twin_and_dropout():
    model = models.MNISTClassifier()
    assert [m.out_features for m in model.modules() if isinstance(m, FusedLinear)] == [256, 128, 10]
    images = torch.randn(5, 1, 28, 28)
    assert model(images).shape == (5, 10)
    model.eval()
    twin = model.to_torch().eval()
    torch.testing.assert_close(twin(images), model(images.reshape(5, 784)))
    assert sum(isinstance(m, nn.Dropout) for m in twin.modules()) == 2
    twin.layers[0].weight.data.add_(1.0)  # the twin owns its weights
    assert not torch.equal(twin.layers[0].weight, model.layers[0].weight)
    with pytest.raises(ValueError, match="dropout"):
        models.MNISTClassifier(dropout=1.0)


class LessonMNISTClassifier(nn.Module):
    """The lesson's own class, as it is written there (a Dropout after each hidden ReLU)."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(nn.Linear(28 * 28, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 128), nn.ReLU(),
                                    nn.Dropout(p), nn.Linear(128, 10))

    def forward(self, x):
        return self.layers(self.flatten(x))


@pytest.mark.parametrize("p", [0.2, 0.0])
def test_mnist_classifier_and_its_twin_load_the_lessons_state_dicts_whatever_the_dropout(p):
    lesson = LessonMNISTClassifier(p).eval()
    model, images = models.MNISTClassifier(dropout=p).eval(), torch.randn(3, 1, 28, 28)
    model.load_state_dict(lesson.state_dict())  # strict: the very same keys
    twin = model.to_torch()
    assert repr(twin.layers) == repr(lesson.layers) and not any(m.training for m in twin.modules())
    lesson.load_state_dict(twin.state_dict())
    torch.testing.assert_close(model(images), lesson(images))
    torch.testing.assert_close(twin(images), lesson(images))
    assert [layer.dropout for layer in model.layers] == [p, p, 0.0]


def test_two_layer_nets_refuse_targets_of_another_shape():
    """A 1-D y would broadcast (4, 1) - (4,) into a (4, 4) error that never trains."""
    scratch = models.NumpyTwoLayerNet(2, 4, 1, seed=0)
    fused = models.TwoLayerNet.from_numpy(scratch)
    for net in (scratch, fused):
        with pytest.raises(ValueError, match=r"y must have shape \(4, 1\).*got \(4,\); reshape it"):
            net.fit(X, models.XOR_TARGETS.reshape(-1), epochs=1)
        with pytest.raises(ValueError, match=r"y must have shape \(4, 1\)"):
            net.fit(X, models.XOR_TARGETS[:3], epochs=1)
        with pytest.raises(ValueError, match="epochs must be >= 0, got -1"):
            net.fit(X, models.XOR_TARGETS, epochs=-1)
        with pytest.raises(ValueError, match="learning_rate must be a finite number, got nan"):
            net.fit(X, models.XOR_TARGETS, epochs=1, learning_rate=float("nan"))
        for rate in (0.0, -1.0):  # never learns, or climbs the loss
            with pytest.raises(ValueError, match=f"learning_rate must be > 0, got {rate}"):
                net.fit(X, models.XOR_TARGETS, epochs=1, learning_rate=rate)
        weights = [w.copy() for w in (scratch.W1, scratch.b1, scratch.W2, scratch.b2)]
        with pytest.raises(ValueError, match="X holds no samples to train on"):  # its mean would be NaN
            net.fit(np.zeros((0, 2)), np.zeros((0, 1)), epochs=1)
        with pytest.raises(ValueError, match="3 features.*(network takes |expects in_features=)2"):
            net.fit(np.ones((4, 3)), models.XOR_TARGETS, epochs=1)
        for bad in (np.nan, np.inf):  # one step would make every weight NaN, without a word
            with pytest.raises(ValueError, match="X holds NaN or infinite values"):
                net.fit(np.where(X == 0, bad, X), models.XOR_TARGETS, epochs=1)
            with pytest.raises(ValueError, match="y holds NaN or infinite values"):
                net.fit(X, np.where(models.XOR_TARGETS == 0, bad, models.XOR_TARGETS), epochs=1)
        assert all(np.array_equal(w, v) for w, v in zip(weights, (scratch.W1, scratch.b1, scratch.W2, scratch.b2)))


def test_lesson_models_name_a_bad_seed_and_take_numpy_integers():
    torch.testing.assert_close(models.Perceptron(2, seed=np.int64(3)).weights, models.Perceptron(2, seed=3).weights)
    np.testing.assert_array_equal(models.NumpyTwoLayerNet(2, 4, 1, seed=np.int64(3)).W1,
                                  models.NumpyTwoLayerNet(2, 4, 1, seed=3).W1)
    for make in (models.Perceptron, lambda n, seed: models.NumpyTwoLayerNet(n, 4, 1, seed=seed)):
        with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
            make(2, seed=-1)
    with pytest.raises(ValueError, match="seed must be <= 4294967295"):  # it would repeat seed 0's weights
        models.Perceptron(2, seed=2 ** 32)


@pytest.mark.parametrize("n_inputs,problem", [(-1, "must be >= 1, got -1"), (0, "must be >= 1, got 0"),
                                               (2.5, "must be an integer, got 2.5"), ("2", "must be an integer")])
def test_perceptron_names_a_number_of_inputs_it_cannot_have(n_inputs, problem):
    with pytest.raises(ValueError, match=f"n_inputs {problem}"):
        models.Perceptron(n_inputs, seed=0)
    assert models.Perceptron(np.int64(2), seed=0).weights.shape == (1, 2)


@pytest.mark.parametrize("sizes,kwargs,problem", [
    ((0, 4, 1), {}, "input_size must be >= 1, got 0"),
    ((2, -1, 1), {}, "hidden_size must be >= 1, got -1"),
    ((2, 4, 1.5), {}, "output_size must be an integer, got 1.5"),
    ((2, 4, 1), {"init_scale": float("nan")}, "init_scale must be a finite number, got nan"),  # NaN losses
    ((2, 4, 1), {"init_scale": float("inf")}, "init_scale must be a finite number, got inf"),
    ((2, 4, 1), {"init_scale": -1.0}, "init_scale must be >= 0, got -1.0"),
    ((2, 4, 1), {"init_scale": "1"}, "init_scale must be a finite number, got '1'"),
])
def test_numpy_net_refuses_sizes_and_initial_scales_it_cannot_train_with(sizes, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        models.NumpyTwoLayerNet(*sizes, seed=0, **kwargs)


def test_numpy_net_takes_a_zero_initial_scale_whose_hidden_units_stay_alike():
    # All weights 0: the symmetry the lesson's 0.01 nearly has, exactly; every hidden unit learns the same.
    net = models.NumpyTwoLayerNet(2, 4, 1, seed=0, init_scale=0.0)
    losses = net.fit(X, models.XOR_TARGETS, epochs=100, learning_rate=1.0)
    assert np.isfinite(losses).all() and np.allclose(net.W1, net.W1[:, :1]) and np.allclose(net.W2, net.W2[0])


def test_numpy_net_backward_before_any_forward_says_to_run_forward_first():
    net = models.NumpyTwoLayerNet(2, 4, 1, seed=0)
    with pytest.raises(RuntimeError, match=r"call forward\(X\) first"):
        net.backward(X, models.XOR_TARGETS)
    net.forward(X)
    net.backward(X, models.XOR_TARGETS)  # the lesson's order


@pytest.mark.parametrize("kwargs,problem", [
    ({"hidden_sizes": (0,)}, "hidden_sizes must be >= 1, got 0"),  # no hidden unit: the train command refuses it too
    ({"hidden_sizes": (256, -3)}, "hidden_sizes must be >= 1, got -3"),
    ({"hidden_sizes": (2.5,)}, "hidden_sizes must be an integer, got 2.5"),
    ({"hidden_sizes": ()}, r"hidden_sizes must be the widths of one or more hidden layers, got \(\)"),
    ({"hidden_sizes": 256}, "hidden_sizes must be the widths of one or more hidden layers, got 256"),
    ({"in_features": 0}, "in_features must be >= 1, got 0"),
    ({"num_classes": 0}, "num_classes must be >= 1, got 0"),
])
def test_mnist_classifier_refuses_widths_as_the_train_command_does(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        models.MNISTClassifier(**kwargs)
    from pyfastnn.lesson.train import TrainConfig, check_config

    if "hidden_sizes" in kwargs:  # the same words for the same setting
        with pytest.raises(ValueError, match=problem):
            check_config(TrainConfig(data="mnist", **kwargs))


@pytest.mark.parametrize("y,kwargs,problem", [
    (models.AND_TARGETS[:3], {}, "X has 4 rows but y has 3 labels"),
    (np.append(models.AND_TARGETS, 1), {}, "X has 4 rows but y has 5 labels"),
    (np.array([0, 0, 0, 2]), {}, r"y must hold labels 0 and 1, got \[2\]"),
    (models.AND_TARGETS, {"epochs": -1}, "epochs must be >= 0, got -1"),
    (models.AND_TARGETS, {"lr": float("inf")}, "lr must be a finite number, got inf"),
    (models.AND_TARGETS, {"lr": -1}, "lr must be > 0, got -1"),
    (np.array([0, 0, 0, np.nan]), {}, r"y must hold labels 0 and 1, got \[nan\]"),
    (models.AND_TARGETS, {"X": np.where(X == 0, np.nan, X)}, "X holds NaN or infinite values"),
])
def test_perceptron_refuses_what_it_cannot_learn_from(y, kwargs, problem):
    inputs, kwargs = kwargs.get("X", X), {key: value for key, value in kwargs.items() if key != "X"}
    with pytest.raises(ValueError, match=problem):
        models.Perceptron(2, seed=0).fit(inputs, y, **kwargs)
    assert models.Perceptron(2, seed=0).fit(X, models.AND_TARGETS, epochs=0, lr=np.float32(0.1)) is not None


@pytest.mark.parametrize("activation", pyfastnn.ACTIVATIONS)
def test_the_classifiers_twin_has_its_keys_and_outputs_for_every_activation(activation):
    """The exercises' activations, identity (no activation module, as a Sequential without one) included."""
    model = models.MNISTClassifier(hidden_sizes=(32, 16), activation=activation).eval()
    twin = model.to_torch()
    assert list(twin.state_dict()) == list(model.state_dict())
    images = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(twin(images), model(images))
