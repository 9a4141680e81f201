"""pyfastnn.cuda_graph_step: every misuse is named before anything runs (these checks need no GPU;
the graph itself is tested in tests/lesson/test_cuda_train.py, where a GPU is)."""

import pytest
import torch
import torch.nn.functional as F

import pyfastnn


def _setup():
    model = pyfastnn.FusedMLP([6, 5, 3])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), (torch.randn(4, 6), torch.randint(0, 3, (4,)))


def test_exported_from_the_package():
    assert pyfastnn.cuda_graph_step.__module__ == "pyfastnn.cuda_graph"
    assert {"cuda_graph_step", "CUDAGraphStep"} <= set(pyfastnn.__all__)


def test_cpu_batch_is_refused():
    model, optimizer, batch = _setup()
    with pytest.raises(ValueError, match=r"batch\[0\] is on cpu; a CUDA graph needs the batch on a CUDA device"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch)


@pytest.mark.parametrize("model, loss_fn, optimizer, batch, error, message", [
    ("not a module", F.cross_entropy, None, None, TypeError, "model must be an nn.Module, got str"),
    (None, "not callable", None, None, TypeError, "loss_fn must be callable, got str"),
    (None, F.cross_entropy, "adam", None, TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
    (None, F.cross_entropy, None, torch.randn(4, 6), TypeError, "example_batch must be a non-empty tuple"),
    (None, F.cross_entropy, None, (), TypeError, "example_batch must be a non-empty tuple"),
    (None, F.cross_entropy, None, (torch.randn(4, 6), [0, 1]), TypeError, r"batch\[1\] must be a tensor, got list"),
])
def test_wrong_argument_types_are_named(model, loss_fn, optimizer, batch, error, message):
    default_model, default_optimizer, default_batch = _setup()
    with pytest.raises(error, match=message):
        pyfastnn.cuda_graph_step(default_model if model is None else model, loss_fn,
                                 default_optimizer if optimizer is None else optimizer,
                                 default_batch if batch is None else batch)


@pytest.mark.parametrize("warmup_steps", [0, -1, 1.5, True, "3"])
def test_warmup_steps_must_be_a_positive_int(warmup_steps):
    model, optimizer, batch = _setup()
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch, warmup_steps=warmup_steps)


def _on_fake_cuda(monkeypatch, tensors):
    """The checks after the device check, reached without a GPU: these tensors' ``.device`` reads
    as CUDA (the checks look at nothing else, and raise before any tensor is used)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: cuda if any(t is x for x in tensors) else
                                                         torch.device("cpu")))


def test_model_left_on_the_cpu_is_named(monkeypatch):
    model, optimizer, batch = _setup()
    _on_fake_cuda(monkeypatch, batch)
    with pytest.raises(ValueError, match=r"model parameter '0.weight' is on cpu, the batch on cuda:0; "
                                         r"move the model there first"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch)


def test_batch_split_over_devices_is_named(monkeypatch):
    model, optimizer, batch = _setup()
    _on_fake_cuda(monkeypatch, batch[:1])
    with pytest.raises(ValueError, match=r"batch\[1\] is on cpu, batch\[0\] on cuda:0"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch)


def test_optimizer_that_is_not_capturable_is_named(monkeypatch):
    model, optimizer, batch = _setup()
    _on_fake_cuda(monkeypatch, (*batch, *model.parameters()))
    with pytest.raises(ValueError, match=r"param group 0 is not capturable; make it with capturable=True, "
                                         r"e.g. Adam\(params, fused=True, capturable=True\)"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch)
    with pytest.raises(ValueError, match="LBFGS cannot be captured in a CUDA graph"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, torch.optim.LBFGS(model.parameters()), batch)


def test_sgd_needs_no_capturable_option(monkeypatch):
    model, _, batch = _setup()
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                    batch)
    assert not step.captured


def test_optimizer_parameters_off_the_batch_device_are_named(monkeypatch):
    model, _, batch = _setup()
    stray = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([*model.parameters(), stray], capturable=True)
    _on_fake_cuda(monkeypatch, (*batch, *model.parameters()))
    with pytest.raises(ValueError, match="an optimizer parameter is on cpu, the batch on cuda:0"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch)


def test_step_object_checks_each_batch_before_touching_the_graph(monkeypatch):
    # The per-call checks, on a step made by the public constructor without a GPU: every tensor's
    # device reads as CUDA, and the side stream (made by the constructor, used only by the steps
    # these checks stop before) is a stand-in. Nothing here reaches a kernel or the graph.
    model, _, (x, y) = _setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x, y))
    assert isinstance(step, pyfastnn.CUDAGraphStep) and not step.captured
    with pytest.raises(ValueError, match="got 1 tensors, the example batch had 2"):
        step(x)
    with pytest.raises(TypeError, match=r"batch\[1\] must be a tensor, got list"):
        step(x, [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"batch\[0\] is \(3, 6\) torch.float32, but the graph was made for "
                                         r"\(4, 6\) torch.float32; a graph replays fixed shapes"):
        step(x[:3], y[:3])
    with pytest.raises(ValueError, match=r"batch\[1\] is \(4,\) torch.int32"):
        step(x, y.int())
    model.eval()
    with pytest.raises(RuntimeError, match="the model was in train mode when the step was made"):
        step.replay()
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"called under torch.no_grad\(\)"):
        step.replay()


def test_static_inputs_carry_no_autograd_history(monkeypatch):
    # An example batch that requires grad: the buffers take its values, never a node of its graph
    # (the captured backward would otherwise reach into the user's tensor).
    model, _, (x, y) = _setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    x = x.clone().requires_grad_()
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x * 2, y))
    assert step.inputs[0].grad_fn is None and not step.inputs[0].requires_grad
    torch.testing.assert_close(step.inputs[0], x.detach() * 2)
