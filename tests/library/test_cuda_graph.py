"""pyfastnn.cuda_graph_step: every misuse is named before anything runs (these checks need no GPU),
and on a GPU the captured step equals the eager loop, draws fresh dropout masks per replay, and
fails capture with a hint (skipped without one, like tests/library/test_cuda.py)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyfastnn
from samples import CUDA_READY


def on_gpu(test):
    """A test of the captured graph: needs a GPU; TF32 off keeps graph-vs-eager comparisons tight
    (both run the same kernels)."""
    return pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a CUDA build of pyfastnn")(
        pytest.mark.usefixtures("exact_fp32")(test))


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


def test_numpy_integers_count_as_warmup_steps():
    np = pytest.importorskip("numpy")  # the lesson's dependency, not the library's
    model, optimizer, batch = _setup()
    with pytest.raises(ValueError, match=r"batch\[0\] is on cpu"):  # the device's refusal, not the count's
        pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, batch, warmup_steps=np.int64(3))


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


def test_static_inputs_are_copies_carrying_no_autograd_history(monkeypatch):
    # An example batch that requires grad: the buffers take its values, never a node of its graph
    # (the captured backward would otherwise reach into the user's tensor). And they are copies: each
    # step writes its batch into them, which must never overwrite the user's example tensors.
    model, _, (x, y) = _setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    x = x.clone().requires_grad_()
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x * 2, y))
    assert step.inputs[0].grad_fn is None and not step.inputs[0].requires_grad
    torch.testing.assert_close(step.inputs[0], x.detach() * 2)
    example = (x.detach().clone(), y.clone())
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, example)
    for buffer, tensor in zip(step.inputs, example):
        assert torch.equal(buffer, tensor) and buffer.data_ptr() != tensor.data_ptr()
        buffer.zero_()  # what a step's copy of its batch does to the buffer
    assert torch.equal(example[0], x.detach()) and torch.equal(example[1], y)


# ---------------------------------------------------------------------------------------------
# On a GPU


def _batches(count, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 784, generator=g).cuda(), torch.randint(0, 10, (rows,), generator=g).cuda())
            for _ in range(count)]


def _network(dropout=0.0):
    """The lesson's network shape (784-256-128-10, relu, dropout after the hidden layers)."""
    return pyfastnn.FusedMLP([784, 256, 128, 10], dropout=dropout)


def _adam(params, lr, capturable=False):
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


def _twins(dropout=0.0, plain=False):
    """Two copies of one network on the GPU (plain: as nn.Sequential of nn.Linear / nn.ReLU)."""
    torch.manual_seed(0)
    graphed = _network(dropout)
    graphed = graphed.to_sequential() if plain else graphed
    eager = _network(dropout)
    eager = eager.to_sequential() if plain else eager
    eager.load_state_dict(graphed.state_dict())
    return graphed.cuda(), eager.cuda()


def _eager_step(model, optimizer, x, y):
    """The ordinary loop's step; returns (loss, output)."""
    optimizer.zero_grad(set_to_none=True)
    output = model(x)
    loss = F.cross_entropy(output, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), output.detach()


@on_gpu
@pytest.mark.parametrize("plain", [False, True], ids=["FusedMLP", "plain_twin"])
def test_graph_step_equals_the_eager_loop(plain):
    graphed, eager = _twins(plain=plain)
    graph_optimizer = _adam(graphed.parameters(), 1e-3, capturable=True)
    eager_optimizer = _adam(eager.parameters(), 1e-3)
    batches = _batches(12, 64)
    step = pyfastnn.cuda_graph_step(graphed, F.cross_entropy, graph_optimizer, batches[0])
    for i, (x, y) in enumerate(batches):
        loss = step(x, y)
        assert step.captured == (i >= 3)
        eager_loss, eager_output = _eager_step(eager, eager_optimizer, x, y)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step.output, eager_output, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@on_gpu
def test_graph_step_with_sgd_equals_the_eager_loop():
    # SGD has no capturable option and needs none: its momentum buffers are made in the warm-up.
    graphed, eager = _twins()
    graph_optimizer = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(8, 64)
    step = pyfastnn.cuda_graph_step(graphed, F.cross_entropy, graph_optimizer, batches[0])
    for x, y in batches:
        torch.testing.assert_close(step(x, y), _eager_step(eager, eager_optimizer, x, y)[0], rtol=1e-5, atol=1e-6)
    assert step.captured
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@on_gpu
def test_two_graphs_share_model_and_optimizer_for_the_smaller_last_batch():
    graphed, eager = _twins()
    graph_optimizer = _adam(graphed.parameters(), 1e-3, capturable=True)
    eager_optimizer = _adam(eager.parameters(), 1e-3)
    full, tail = _batches(1, 64)[0], _batches(1, 32, seed=1)[0]
    steps = {64: pyfastnn.cuda_graph_step(graphed, F.cross_entropy, graph_optimizer, full)}
    for epoch in range(4):  # as in an epoch: full batches, then the smaller last one
        for x, y in (full, full, tail):
            if x.shape[0] not in steps:
                steps[x.shape[0]] = pyfastnn.cuda_graph_step(graphed, F.cross_entropy, graph_optimizer, (x, y),
                                                             warmup_steps=1)
            torch.testing.assert_close(steps[x.shape[0]](x, y), _eager_step(eager, eager_optimizer, x, y)[0],
                                       rtol=1e-5, atol=1e-6)
    assert steps[64].captured and steps[32].captured
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@on_gpu
def test_graph_replays_draw_fresh_dropout_masks_and_learn():
    # The lesson's network, dropout 0.2 on the GPU, inside the graph.
    torch.manual_seed(0)
    model = _network(dropout=0.2).cuda()
    optimizer = _adam(model.parameters(), 0.0, capturable=True)  # lr 0: outputs differ by the masks alone
    x, y = _batches(1, 64)[0]
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x, y), warmup_steps=1)
    outputs = []
    for _ in range(4):
        step(x, y)
        outputs.append(step.output.clone())
    assert step.captured
    assert not torch.equal(outputs[2], outputs[3]), "two replays drew the same dropout masks"
    model.eval()
    with torch.no_grad():
        clean = model(x)
    for out in outputs:
        assert not torch.equal(out, clean)
    model.train()
    learner = pyfastnn.cuda_graph_step(model, F.cross_entropy, _adam(model.parameters(), 1e-3, capturable=True),
                                       (x, y))
    losses = [learner(x, y).item() for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


@on_gpu
def test_misuse_on_the_gpu_is_named():
    model, _ = _twins()
    x, y = _batches(1, 16)[0]
    with pytest.raises(ValueError, match="not capturable"):
        pyfastnn.cuda_graph_step(model, F.cross_entropy, _adam(model.parameters(), 1e-3), (x, y))
    with pytest.raises(ValueError, match="is on cpu"):
        pyfastnn.cuda_graph_step(model.cpu(), F.cross_entropy, _adam(model.parameters(), 1e-3, capturable=True),
                                 (x, y))
    model.cuda()
    step = pyfastnn.cuda_graph_step(model, F.cross_entropy, _adam(model.parameters(), 1e-3, capturable=True),
                                    (x, y), warmup_steps=1)
    step(x, y)
    step(x, y)
    with pytest.raises(ValueError, match="a graph replays fixed shapes"):
        step(x[:8], y[:8])
    with pytest.raises(ValueError, match="is on cpu, the graph runs on cuda"):
        step(x.cpu(), y.cpu())


@on_gpu
def test_a_step_that_syncs_with_the_cpu_fails_capture_with_a_hint():
    # In a child process: a failed capture may leave the CUDA context unusable for later tests.
    script = """
import torch, torch.nn.functional as F, pyfastnn
model = pyfastnn.FusedMLP([8, 4]).cuda()
opt = torch.optim.Adam(model.parameters(), fused=True, capturable=True)
x, y = torch.randn(4, 8, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
step = pyfastnn.cuda_graph_step(model, lambda out, t: F.cross_entropy(out, t) * float(t.sum().item() > -1), opt,
                                (x, y), warmup_steps=1)
step(x, y)
try:
    step(x, y)
except RuntimeError as e:
    print("RAISED", e, flush=True)
print("DEFAULT STREAM", torch.cuda.current_stream() == torch.cuda.default_stream(), flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "RAISED cuda_graph_step: capturing the step failed" in result.stdout, result.stdout + result.stderr
    assert "no .item(), .cpu()" in result.stdout and "restart the process before training again" in result.stdout
    assert "DEFAULT STREAM True" in result.stdout  # the failed capture's side stream is not left current
