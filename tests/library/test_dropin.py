"""Drop-in behaviour where plain PyTorch users would notice a difference: torch.export (and the
programs decomposed to ATen / converted to ONNX that run without pyfastnn), forward-mode
AD and vmap, fuse() on shared modules / mode-dependent graphs / partial Sequentials / hooks,
in-place ops after identity outputs, live layer attributes and hook-based reparametrizations."""

import copy
import io
import pickle
import random
import re
import subprocess
import sys
import threading
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import pyfastnn
from pyfastnn import FusedLinear, FusedMLP
from pyfastnn.fuse import Absorbed
from pyfastnn.testing import assert_close, reference, reference_mlp
from samples import mlp_sample_inputs, sample_inputs


def _mlp(sizes=(8, 16, 12, 4), **kwargs) -> FusedMLP:
    torch.manual_seed(0)
    return FusedMLP(list(sizes), **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("make", [lambda: _mlp(activation="gelu"),
                                  lambda: FusedLinear(8, 5, activation="tanh")], ids=["FusedMLP", "FusedLinear"])
def test_export_matches_module_and_leaves_it_working(strict, make):
    module = make().eval()
    x = torch.randn(5, 8)
    expected = module(x)
    for _ in range(2):  # a second export of the same module works too
        program = torch.export.export(module, (x,), strict=strict)
        torch.testing.assert_close(program.module()(x), expected)
    out = module(x)
    assert type(out) is torch.Tensor  # not a FakeTensor left behind by export
    torch.testing.assert_close(out, expected)
    module.train()
    module(x).sum().backward()
    first = module[0] if isinstance(module, FusedMLP) else module
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_export_names_parameters_as_named_parameters_and_dynamic_quantization_leaves_fused_layers():
    """README, "Transforms, export and TorchScript": an exported partly fused Sequential names its
    parameters as named_parameters() does (the fused module's own names, not the state dict's
    original keys); quantize_dynamic swaps nn.Linear only, fused layers stay floating point."""
    model = pyfastnn.fuse(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))).eval()
    program = torch.export.export(model, (torch.randn(3, 8),))
    assert "1.2.weight" in program.state_dict and "3.weight" in model.state_dict()
    assert set(program.state_dict) == {name for name, _ in model.named_parameters()} | {"0.weight", "0.bias"}
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear, FusedLinear}, dtype=torch.qint8)
    assert quantized[1][0].weight.dtype == torch.float32


def test_slicing_a_fused_mlp_is_refused_since_it_would_cut_elsewhere_than_the_sequential_it_replaces():
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
    fused = pyfastnn.fuse(plain)  # the whole Sequential: one FusedMLP, indexed by layer
    assert type(fused) is FusedMLP
    with pytest.raises(TypeError, match=r"refuses slices; slice the layers \(FusedMLP.from_layers"):
        fused[:-1]  # plain[:-1] drops the Tanh; by layers it would drop a whole layer
    with pytest.raises(TypeError, match="refuses slices"):
        fused[0:1] = [FusedLinear(8, 8)]
    # Layer positions, as a list takes them; anything else is named.
    assert fused[-2] is fused[0] is fused[torch.tensor(0)] and len(list(fused)) == 2
    with pytest.raises(IndexError, match="FusedMLP index 2 is out of range: it has 2 layers"):
        fused[2]
    with pytest.raises(IndexError, match="index -3 is out of range"):
        fused[-3] = FusedLinear(8, 8)
    with pytest.raises(TypeError, match="FusedMLP indices are integers .* got str; take a layer by name with "
                                        "get_submodule"):
        fused["2"]
    head_off = FusedMLP.from_layers(list(fused)[:-1])  # what the message offers instead
    x = torch.randn(3, 8)
    torch.testing.assert_close(head_off(x), plain[:2](x))
    torch.testing.assert_close(fused.to_sequential()[:-1](x), plain[:-1](x))
    # Partly fused: the run sits at its first index, so a slice ending inside it still runs it whole
    # (README: slice before fusing).
    partly = pyfastnn.fuse(nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval())
    torch.testing.assert_close(partly[:-1](x), partly(x))


def test_from_sequential_keeps_the_sequentials_keys_also_after_a_layers_dropout_changed():
    mlp = _mlp((4, 6, 5, 3), dropout=0.2)
    mlp[0].dropout = 0.0  # the keys stay 0, 3, 6; to_sequential leaves a gap where the Dropout was
    plain = mlp.to_sequential()
    again = FusedMLP.from_sequential(plain)
    assert list(again.state_dict()) == list(plain.state_dict()) == list(mlp.state_dict())
    again.load_state_dict(plain.state_dict())
    named = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 6)), ("act", nn.ReLU()), ("fc2", nn.Linear(6, 3))]))
    assert list(FusedMLP.from_sequential(named).state_dict()) == list(named.state_dict())


@pytest.mark.parametrize("copy", [False, True])
def test_from_sequential_keeps_a_linear_used_twice_and_tied_weights_as_one_parameter(copy):
    torch.manual_seed(0)
    twice = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = twice.weight
    plain = nn.Sequential(twice, nn.ReLU(), twice, nn.Tanh(), tied)
    mlp = FusedMLP.from_sequential(plain, copy=copy)
    assert len(mlp) == 3 and list(mlp.state_dict()) == list(plain.state_dict())
    assert mlp[0].weight is mlp[1].weight is mlp[2].weight and mlp[0].bias is mlp[1].bias
    assert (mlp[0].weight is twice.weight) != copy
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), plain(x))
    (fused_grad,) = torch.autograd.grad(mlp(x).sum(), [mlp[0].weight])
    (plain_grad,) = torch.autograd.grad(plain(x).sum(), [twice.weight])  # summed over its three uses
    torch.testing.assert_close(fused_grad, plain_grad)


def test_copies_keep_a_parameter_subclass_as_deepcopy_does():
    class Sharded(nn.Parameter):  # a subclass carrying metadata, as sharding or quantization libraries use
        pass

    linear = nn.Linear(4, 3)
    linear.weight = Sharded(linear.weight.detach().clone())
    for copied in (FusedLinear.from_linear(linear, copy=True).weight,
                   FusedMLP.from_sequential(nn.Sequential(linear, nn.ReLU()), copy=True)[0].weight):
        assert type(copied) is Sharded and copied is not linear.weight and torch.equal(copied, linear.weight)


def test_replacing_a_layer_is_seen_by_forward():
    mlp = _mlp((8, 6, 3))
    new_layer = FusedLinear(8, 6, activation="tanh")
    setattr(mlp, "0", new_layer)
    x = torch.randn(4, 8)
    expected = F.linear(torch.tanh(F.linear(x, new_layer.weight, new_layer.bias)), mlp[1].weight, mlp[1].bias)
    torch.testing.assert_close(mlp(x), expected)
    mlp[1].weight = nn.Parameter(torch.randn(3, 6))  # a new Parameter is seen as well
    expected = F.linear(torch.tanh(F.linear(x, new_layer.weight, new_layer.bias)), mlp[1].weight, mlp[1].bias)
    torch.testing.assert_close(mlp(x), expected)
    setattr(mlp, "2", nn.Linear(6, 3))  # the second layer's name, as in nn.Sequential (ReLU at 1)
    with pytest.raises(TypeError, match="layer '2' must be a FusedLinear, got Linear"):
        mlp(x)


class _Call(nn.Module):
    """A module around one functional call, so torch.export sees the tensors as its inputs."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *tensors):
        return self.function(*tensors)


def _decomposed(module: nn.Module, args: tuple, **export_kwargs) -> torch.export.ExportedProgram:
    program = torch.export.export(module, args, **export_kwargs).run_decompositions(pyfastnn.decompositions())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if t.startswith("pyfastnn")], targets
    return program


@pytest.mark.parametrize("sample", list(sample_inputs(dtypes=(torch.float32,), small_only=True, requires_grad=False)),
                         ids=repr)
def test_decomposed_fused_linear_holds_only_aten_ops_and_matches_the_op(sample):
    def call(x, w, *b):
        return pyfastnn.fused_linear(x, w, b[0] if b else None, **sample.kwargs())

    program = _decomposed(_Call(call), sample.tensors())
    assert_close(program.module()(*sample.tensors()), call(*sample.tensors()), sample.dtype)


@pytest.mark.parametrize("sample", list(mlp_sample_inputs(dtypes=(torch.float32,), requires_grad=False)), ids=repr)
def test_decomposed_fused_mlp_holds_only_aten_ops_and_matches_the_op_in_eval(sample):
    def call(*tensors):
        x, weights, biases = sample.rebuild(tensors)
        return pyfastnn.fused_mlp(x, weights, biases, activation=sample.activations[:-1],
                                  output_activation=sample.activations[-1], negative_slope=sample.negative_slope,
                                  dropout=sample.dropout[:-1], training=False)

    program = _decomposed(_Call(call), sample.tensors())
    assert_close(program.module()(*sample.tensors()), call(*sample.tensors()), sample.dtype)


def test_decomposed_modules_keep_a_dynamic_batch_and_their_parameters(tmp_path):
    model = nn.Sequential(FusedLinear(8, 16, activation="gelu"), _mlp((16, 12, 4), activation="leaky_relu",
                                                                       negative_slope=0.2)).eval()
    batch = torch.export.Dim("batch")
    program = _decomposed(model, (torch.randn(5, 8),), dynamic_shapes=({0: batch},))
    assert set(program.state_dict) == set(model.state_dict())
    for rows in (1, 5, 33):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(program.module()(x), model(x))
    # Saved, then loaded and run by a process that never imports pyfastnn.
    path, x = tmp_path / "model.pt2", torch.randn(7, 8)
    torch.export.save(program, str(path))
    torch.save(x, str(tmp_path / "x.pt"))
    script = ("import sys, torch; program = torch.export.load(sys.argv[1]); "
              "torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3]); "
              "assert 'pyfastnn' not in sys.modules")
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(str(tmp_path / "out.pt")), model(x))
    table = torch.export.default_decompositions()  # the rest lowered to core ATen as well
    table.update(pyfastnn.decompositions())
    x = torch.randn(5, 8)
    core = torch.export.export(model, (x,)).run_decompositions(table)
    assert not any(str(node.target).startswith(("pyfastnn", "aten.linear")) for node in core.graph.nodes)
    torch.testing.assert_close(core.module()(x), model(x))


def test_decomposed_dropout_in_training_keeps_nn_dropouts_arithmetic_and_rate():
    # Hidden layer: identity; output layer: the identity matrix, so the output is dropout(x @ w1.T) itself.
    torch.manual_seed(0)
    p, rows, cols = 0.3, 200, 50
    w1, eye = torch.randn(cols, cols), torch.eye(cols)

    def call(x):
        return pyfastnn.fused_mlp(x, [w1, eye], [None, None], activation="identity", dropout=p, training=True)

    x = torch.randn(rows, cols)
    out = _decomposed(_Call(call), (x,)).module()(x)
    hidden = x @ w1.T
    kept = out != 0
    torch.testing.assert_close(out[kept], hidden[kept] / (1 - p))
    n, expected = kept.numel(), kept.numel() * (1 - p)
    assert abs(kept.sum().item() - expected) < 5 * (n * p * (1 - p)) ** 0.5


def test_a_decomposed_program_converts_to_onnx_and_runs_without_pyfastnn(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the test extra installs it)")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    model = nn.Sequential(FusedLinear(8, 16, activation="silu"), _mlp((16, 12, 4), activation="tanh")).eval()
    program = _decomposed(model, (torch.randn(5, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices
        torch.onnx.export(program, dynamo=True, verbose=False).save(str(path))
        with pytest.raises(Exception, match=r"No ONNX function found for .*pyfastnn\.fused_"):  # as README says
            torch.onnx.export(torch.export.export(model, (torch.randn(5, 8),)), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (3, 64):
        x = torch.randn(rows, 8)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_tensors_made_in_inference_mode_are_refused_for_training_with_torchs_error_and_work_cloned():
    # The fused node keeps input, weights and biases for backward; torch refuses to keep inference
    # tensors (no version counter: a change in place under inference_mode would go unseen), where
    # nn.Linear, which keeps no bias, would train beside a frozen one. Cloned outside, they work.
    torch.manual_seed(0)
    with torch.inference_mode():
        frozen_b = torch.randn(7)
    x, w = torch.randn(4, 12), torch.randn(7, 12, requires_grad=True)
    for run in (lambda b: pyfastnn.fused_linear(x, w, b, "tanh"),
                lambda b: pyfastnn.fused_mlp(x, [w], [b], output_activation="tanh")):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            run(frozen_b)
        (grad,) = torch.autograd.grad(run(frozen_b.clone()).pow(2).sum(), w)
        (expected,) = torch.autograd.grad(torch.tanh(F.linear(x, w, frozen_b)).pow(2).sum(), w)
        torch.testing.assert_close(grad, expected)
    with torch.no_grad():  # no graph, nothing kept: inference tensors are fine
        torch.testing.assert_close(pyfastnn.fused_linear(x, w, frozen_b, "tanh"), torch.tanh(F.linear(x, w, frozen_b)))


# ---------------------------------------------------------------------------------------------
# Forward-mode AD and vmap


@pytest.mark.parametrize("activation", pyfastnn.ACTIVATIONS)
def test_forward_ad_of_fused_linear_matches_pytorch(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64), \
        torch.randn(4, dtype=torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))

    def fused(x, w, b):
        return pyfastnn.fused_linear(x, w, b, activation, negative_slope=0.2)

    def plain(x, w, b):
        return reference(x, w, b, activation, 0.2)

    out, tangent = torch.func.jvp(fused, (x, w, b), tangents)
    expected_out, expected_tangent = torch.func.jvp(plain, (x, w, b), tangents)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)
    assert tangent.abs().sum() > 0
    torch.testing.assert_close(torch.func.jacfwd(fused, argnums=(0, 1, 2))(x, w, b),
                               torch.func.jacrev(plain, argnums=(0, 1, 2))(x, w, b))
    torch.testing.assert_close(torch.func.jacrev(fused, argnums=(0, 1, 2))(x, w, b),
                               torch.func.jacrev(plain, argnums=(0, 1, 2))(x, w, b))
    torch.testing.assert_close(torch.func.hessian(lambda w: fused(x, w, b).sum())(w),
                               torch.func.hessian(lambda w: plain(x, w, b).sum())(w))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, tangents[1])  # a tangent on the weight alone
        dual_tangent = fwAD.unpack_dual(fused(x, dual, b)).tangent
    _, expected_w = torch.func.jvp(lambda w: plain(x, w, b), (w,), (tangents[1],))
    torch.testing.assert_close(dual_tangent, expected_w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_ad_keeps_the_forwards_dropout_arithmetic_in_half_precision(dtype):
    # The reference behind forward-mode AD drops out as the kernels do (in float, rounded once):
    # its primal is the plain call's output bit for bit. Identity weights keep every rounding visible.
    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=dtype)
    weights = [torch.eye(64, dtype=dtype), torch.eye(64, dtype=dtype)]

    def call(t):
        return pyfastnn.fused_mlp(t, weights, activation="identity", dropout=0.3, training=True)

    torch.manual_seed(3)
    plain = call(x)
    torch.manual_seed(3)
    primal, _ = torch.func.jvp(call, (x,), (torch.ones_like(x),))
    assert torch.equal(primal, plain)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_forward_ad_of_fused_mlp(dropout):
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    weights = [torch.randn(9, 5, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64),
               torch.randn(3, 7, dtype=torch.float64)]
    biases = [torch.randn(9, dtype=torch.float64), None, torch.randn(3, dtype=torch.float64)]
    acts = ["gelu", "tanh"]

    def fused(x, *weights):
        torch.manual_seed(7)  # the same dropout masks on every call
        return pyfastnn.fused_mlp(x, list(weights), biases, acts, "sigmoid", dropout, training=True)

    if dropout == 0.0:  # against the layers run one by one in PyTorch
        def plain(x, *weights):
            return reference_mlp(x, list(weights), biases, acts + ["sigmoid"])

        tangents = tuple(torch.randn_like(t) for t in (x, *weights))
        out, tangent = torch.func.jvp(fused, (x, *weights), tangents)
        expected_out, expected_tangent = torch.func.jvp(plain, (x, *weights), tangents)
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(tangent, expected_tangent)
    # Forward mode (the reference with the kernel's masks) against reverse mode (the fused backward):
    forward_jacobian = torch.func.jacfwd(fused, argnums=(0, 1, 2, 3))(x, *weights)
    reverse_jacobian = torch.func.jacrev(fused, argnums=(0, 1, 2, 3))(x, *weights)
    torch.testing.assert_close(forward_jacobian, reverse_jacobian)
    assert all(j.abs().sum() > 0 for j in forward_jacobian)
    torch.testing.assert_close(fused(x, *weights), torch.func.jvp(fused, (x, *weights),
                                                                  tuple(torch.zeros_like(t) for t in (x, *weights)))[0])


def test_torch_func_through_dropout_in_a_module_with_trainable_parameters():
    torch.manual_seed(0)
    mlp = FusedMLP([4, 8, 3], dropout=0.5).train()  # its parameters require grad, as in any model
    x, v = torch.randn(5, 4), torch.randn(5, 4)

    def run(x):
        torch.manual_seed(3)  # the same masks on every call
        return mlp(x)

    out, tangent = torch.func.jvp(run, (x,), (v,))
    torch.testing.assert_close(out, run(x))
    torch.testing.assert_close(torch.einsum("oibj,bj->oi", torch.func.jacfwd(run)(x), v), tangent)
    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(run(leaf).sum(), leaf)  # the fused backward
    torch.testing.assert_close(torch.func.grad(lambda x: run(x).sum())(x), want)


@pytest.mark.parametrize("make", ["layer", "mlp"])
def test_tangents_and_batches_entering_backward_through_the_gradient(make):
    """Forward-over-reverse and batched gradients on a graph the fused op built: a tangent on the
    incoming gradient (torch.autograd.forward_ad) comes out of backward as J^T t, as through
    nn.Linear; batched gradients (torch.func.vmap, is_grads_batched) give each sample's; inside
    torch.func.jvp, which records no graph to differentiate the layers by, backward refuses."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    module = (FusedLinear(4, 5, activation="tanh") if make == "layer" else _mlp((4, 6, 5), activation="gelu")).double()
    plain = module.to_linear() if make == "layer" else module.to_sequential()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v, t = torch.randn(2, 3, 5, dtype=torch.float64)
    y = module(x)
    (expected,) = torch.autograd.grad(plain(x), x, t)
    with fwAD.dual_level():
        (grad,) = torch.autograd.grad(y, x, fwAD.make_dual(v, t), retain_graph=True)
        primal, tangent = fwAD.unpack_dual(grad)
    assert tangent is not None and not grad.requires_grad
    torch.testing.assert_close(tangent, expected)
    torch.testing.assert_close(primal, torch.autograd.grad(plain(x), x, v)[0])
    batch = torch.randn(4, 3, 5, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(plain(x), x, g)[0] for g in batch])
    (batched,) = torch.autograd.grad(y, x, batch, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(torch.func.vmap(lambda g: torch.autograd.grad(y, x, g, retain_graph=True)[0])(batch),
                               expected)
    with pytest.raises(NotImplementedError, match="cannot run inside torch.func.jvp when the graph was built outside"):
        torch.func.jvp(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0], (v,), (t,))


def test_forward_ad_through_the_layers():
    mlp = _mlp((4, 6, 2), activation="silu").double()
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    plain = mlp.to_sequential()
    _, tangent = torch.func.jvp(mlp, (x,), (v,))
    _, expected = torch.func.jvp(plain, (x,), (v,))
    torch.testing.assert_close(tangent, expected)


def test_vmap_over_the_batch_and_over_weights():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 3, 7), torch.randn(4, 7), torch.randn(4)
    out = torch.vmap(lambda x: pyfastnn.fused_linear(x, w, b, "gelu"))(x)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)))
    ws = torch.randn(5, 4, 7)
    out = torch.vmap(lambda w: pyfastnn.fused_linear(x[0], w, b, "relu"))(ws)
    torch.testing.assert_close(out, torch.stack([F.relu(F.linear(x[0], wi, b)) for wi in ws]))
    bs = torch.randn(5, 4)  # a bias per sample, inputs batched as rows or not
    out = torch.vmap(lambda x, b: pyfastnn.fused_linear(x, w, b, "tanh"))(x, bs)
    torch.testing.assert_close(out, torch.stack([torch.tanh(F.linear(xi, w, bi)) for xi, bi in zip(x, bs)]))
    out = torch.vmap(lambda b: pyfastnn.fused_linear(x[0], w, b, "tanh"))(bs)
    torch.testing.assert_close(out, torch.stack([torch.tanh(F.linear(x[0], w, bi)) for bi in bs]))
    weights = [torch.randn(6, 7), torch.randn(2, 6)]
    out = torch.vmap(lambda x: pyfastnn.fused_mlp(x, weights, None, "tanh"))(x)
    torch.testing.assert_close(out, F.linear(torch.tanh(F.linear(x, weights[0])), weights[1]))
    # Batched biases and weights of a whole MLP (an ensemble), and dropout, which must say how masks vary.
    ensemble = [torch.randn(5, 6, 7), torch.randn(5, 2, 6)]
    out = torch.vmap(lambda ws, x: pyfastnn.fused_mlp(x, list(ws), None, "relu"), in_dims=(0, None))(ensemble, x[0])
    expected = torch.stack([F.linear(F.relu(F.linear(x[0], a)), b) for a, b in zip(*ensemble)])
    torch.testing.assert_close(out, expected)

    def with_dropout(x):
        return pyfastnn.fused_mlp(x, weights, None, "tanh", dropout=0.5, training=True)

    with pytest.raises(RuntimeError, match="randomness='different'"):
        torch.vmap(with_dropout)(x)
    out = torch.vmap(with_dropout, randomness="different")(torch.ones(64, 3, 7))
    hidden_kept = out.std(dim=0)  # different masks per sample: the outputs vary across the batch
    assert (hidden_kept > 0).all()
    # Per-sample gradients (vmap of grad), the usual reason for vmap.
    grads = torch.vmap(torch.func.grad(lambda w, x: pyfastnn.fused_linear(x, w, b, "tanh").sum()),
                       in_dims=(None, 0))(w, x[:, 0])
    expected = torch.stack([torch.func.grad(lambda w: torch.tanh(F.linear(xi, w, b)).sum())(w) for xi in x[:, 0]])
    torch.testing.assert_close(grads, expected)


def test_batched_gradients_of_every_fused_module():
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True): each sample's gradient, also
    through fused_mlp and fused dropout (the forward's masks)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    for module in (FusedLinear(8, 4, activation="tanh"), _mlp((8, 6, 4)).eval(), FusedLinear(8, 4, dropout=0.2).train()):
        y = module(x)
        grads = torch.randn(5, *y.shape)
        (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
        one_by_one = torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in grads])
        torch.testing.assert_close(batched, one_by_one)
    mlp, x = _mlp((8, 6, 4)), torch.randn(2, 8)
    torch.testing.assert_close(torch.autograd.functional.jacobian(mlp, x, vectorize=True),
                               torch.autograd.functional.jacobian(mlp, x))


def test_a_tensor_in_several_slots_gets_its_gradient_once_on_every_backward_path():
    """Tied layers (one weight in every slot of fused_mlp, the README's `[nn.Linear, nn.Tanh()] * 3`
    fused), fused_linear(W, W), a layer applied to its own output and a weight made from the input:
    the plain backward, create_graph=True (gradient penalties, MAML), batched gradients and the
    Hessian all give eager's gradient, each slot's own derivative counted once."""
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    cases = [(lambda w, b: pyfastnn.fused_linear(w, w, b, "tanh"), lambda w, b: torch.tanh(F.linear(w, w, b))),
             (lambda w, b: pyfastnn.fused_mlp(x, [w, w, w], [b, None, b], "tanh"),
              lambda w, b: F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, w, b)), w)), w, b))]
    for fused, eager in cases:
        expected = torch.autograd.grad(eager(w, b).pow(2).sum(), (w, b))
        for create_graph in (False, True):
            got = torch.autograd.grad(fused(w, b).pow(2).sum(), (w, b), create_graph=create_graph)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)
        y, y_eager = fused(w, b), eager(w, b)
        grads = torch.randn(3, *y.shape, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(y, w, grads, is_grads_batched=True)[0],
                                   torch.autograd.grad(y_eager, w, grads, is_grads_batched=True)[0])
        torch.testing.assert_close(torch.autograd.functional.hessian(lambda w: fused(w, b).sum(), w),
                                   torch.autograd.functional.hessian(lambda w: eager(w, b).sum(), w))
    # A slot's tensor reaching another slot's through its own history: a layer applied to its own
    # output, a hypernetwork's weight made from the input; and tied layers whose saved tensors come
    # back through saved-tensor hooks (each unpacking a new tensor).
    a = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    xg = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    cases = [(lambda w: pyfastnn.fused_linear(pyfastnn.fused_linear(xg, w, None, "relu"), w, None, "tanh"),
              lambda w: torch.tanh(F.linear(torch.relu(F.linear(xg, w)), w)), (w,)),
             (lambda w: pyfastnn.fused_linear(xg, a * xg.mean(0), b, "tanh"),
              lambda w: torch.tanh(F.linear(xg, a * xg.mean(0), b)), (xg, a))]
    for fused, eager, wrt in cases:
        expected = torch.autograd.grad(eager(w).pow(2).sum(), wrt)
        for create_graph in (False, True):
            got = torch.autograd.grad(fused(w).pow(2).sum(), wrt, create_graph=create_graph)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)
        grads = torch.randn(3, *eager(w).shape, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(fused(w), wrt[0], grads, is_grads_batched=True)[0],
                                   torch.autograd.grad(eager(w), wrt[0], grads, is_grads_batched=True)[0])
    with torch.autograd.graph.save_on_cpu():
        y = pyfastnn.fused_mlp(x, [w, w, w], None, "tanh")
    expected = torch.autograd.grad(F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, w)), w)), w).pow(2).sum(), w)
    torch.testing.assert_close(torch.autograd.grad(y.pow(2).sum(), w, create_graph=True)[0], expected[0])
    seq = nn.Sequential(*[nn.Linear(6, 6, dtype=torch.float64), nn.Tanh()] * 3)
    fused_seq = pyfastnn.fuse(seq)
    expected = torch.autograd.grad(seq(x).pow(2).sum(), list(seq.parameters()))
    got = torch.autograd.grad(fused_seq(x).pow(2).sum(), list(fused_seq.parameters()), create_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_a_sparse_incoming_gradient_counts_as_its_dense_tensor():
    """y.backward(sparse_grad), which eager F.linear takes: the same gradients as the dense one."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w, w2 = torch.randn(5, 4, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    for run, width in ((lambda: pyfastnn.fused_linear(x, w, None, "gelu"), 5),
                       (lambda: pyfastnn.fused_mlp(x, [w, w2], None, "relu"), 2)):
        grad = torch.randn(3, width)
        grad[1] = 0
        dense = torch.autograd.grad(run(), (x, w), grad)
        for create_graph in (False, True):  # the fused backward and the reference's
            sparse = torch.autograd.grad(run(), (x, w), grad.to_sparse(), create_graph=create_graph)
            for got, expected in zip(sparse, dense):
                torch.testing.assert_close(got, expected)


def test_vmap_over_one_dimensional_samples_refuses_them_like_the_op():
    """Mapped over a 1-D tensor, each sample is 0-d: the op must refuse it as outside vmap, not read
    the mapped dimension as the features."""
    w, b = torch.randn(3, 4), torch.randn(3)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        torch.vmap(lambda t: pyfastnn.fused_linear(t, w, b, None))(torch.randn(4))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        torch.vmap(lambda t: pyfastnn.fused_mlp(t, [w], [b]))(torch.randn(4))


def test_vmap_over_an_empty_stack_of_weights_gives_an_empty_result_and_still_checks_shapes():
    x = torch.randn(5, 3)
    out = torch.vmap(lambda w, b: pyfastnn.fused_linear(x, w, b, "relu"))(torch.randn(0, 4, 3), torch.randn(0, 4))
    assert out.shape == (0, 5, 4) and out.dtype == x.dtype
    out = torch.vmap(lambda ws: pyfastnn.fused_mlp(x, list(ws), None, "relu"))([torch.randn(0, 4, 3),
                                                                                torch.randn(0, 2, 4)])
    assert out.shape == (0, 5, 2)
    with pytest.raises(ValueError, match="in_features=2"):
        torch.vmap(lambda w: pyfastnn.fused_linear(x, w, None, "relu"))(torch.randn(0, 4, 2))
    weights = torch.randn(0, 4, 3, requires_grad=True)  # gradients of an empty ensemble: empty, as eager's
    out = torch.vmap(lambda w: pyfastnn.fused_linear(x, w, None, "relu"))(weights)
    (grad,) = torch.autograd.grad(out.sum(), weights)
    assert grad.shape == weights.shape


# ---------------------------------------------------------------------------------------------
# fuse(): shared modules, train/eval-dependent graphs, partial Sequentials, hooks, inplace


def test_fuse_leaves_a_linear_called_at_several_sites_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(8, 4)
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    torch.testing.assert_close(fused(x), model(x))
    assert runs == []


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), 0.5, self.training))


class BranchOnTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        if self.training:
            x = self.drop(x)
        return self.fc2(x)


@pytest.mark.parametrize("model_type", [FunctionalDropout, BranchOnTraining])
def test_fuse_follows_train_and_eval_after_fusion(model_type):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    for fused_in_train in (True, False):
        model = model_type().train(fused_in_train)
        fused = pyfastnn.fuse(model)
        fused.eval(), model.eval()
        torch.testing.assert_close(fused(x), model(x))  # fused in train(): no dropout left in eval()
        fused.train()
        outs = torch.stack([fused(x) for _ in range(4)])
        assert not torch.allclose(outs[0], outs[1])  # fused in eval(): dropout back in train()


def test_fuse_keeps_the_state_dict_keys_of_partly_fused_sequentials():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
    fused = pyfastnn.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict()) == \
        ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    assert len(fused) == len(model) and type(fused[1]) is Absorbed and type(fused[2]) is nn.LayerNorm
    x = torch.randn(5, 6)
    torch.testing.assert_close(fused(x), model(x))
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
    fused.load_state_dict(other.state_dict())
    torch.testing.assert_close(fused(x), other(x))
    model.load_state_dict(fused.state_dict())
    torch.testing.assert_close(model(x), other(x))


def test_fuse_keeps_keys_when_a_fused_mlp_sits_inside_a_larger_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 8), nn.GELU(),
                          nn.Linear(8, 3))
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert [str(r) for r in runs] == [
        "1: Linear(12, 16) -> ReLU -> Dropout(0.2) -> Linear(16, 8) -> GELU -> Linear(8, 3) => FusedMLP"]
    assert type(fused[1]) is FusedMLP and all(type(m) is Absorbed for m in list(fused)[2:])
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, 4)
    fused.eval(), model.eval()
    torch.testing.assert_close(fused(x), model(x))
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        nn.init.normal_(p)
    fused.load_state_dict(fresh.state_dict())  # strict: every original key is accepted
    torch.testing.assert_close(fused(x), fresh.eval()(x))
    model.load_state_dict(fused.state_dict())
    torch.testing.assert_close(model(x), fresh(x))
    # The key mapping survives copies, pickling and a nesting level.
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert list(clone.state_dict()) == list(model.state_dict())
    wrapped = pyfastnn.fuse(nn.Sequential(nn.LayerNorm(3, elementwise_affine=False), copy.deepcopy(model)))
    assert list(wrapped.state_dict()) == ["1." + k for k in model.state_dict()]
    # Keys missing or unexpected are named as the user wrote them, not by the fused layer's names.
    partial = {k: v for k, v in wrapped.state_dict().items() if k != "1.4.weight"}
    for clone in (wrapped, copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert clone.load_state_dict({**partial, "1.6.extra": torch.ones(1)}, strict=False) == \
            (["1.4.weight"], ["1.6.extra"])
        with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "1.4.weight"'):
            clone.load_state_dict(partial)


class ReluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_fuse_inplace_changes_the_sequential_itself():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    plain = copy.deepcopy(seq)
    keys = list(seq.state_dict())
    result = pyfastnn.fuse(seq, inplace=True)
    assert result is seq and type(seq[0]) is FusedMLP and list(seq.state_dict()) == keys
    x = torch.randn(3, 5)
    torch.testing.assert_close(seq(x), plain(x))

    model = ReluBlock()
    with pytest.warns(UserWarning, match="inplace=True.*left the forward of the top-level ReluBlock unfused"):
        assert pyfastnn.fuse(model, inplace=True) is model
    assert type(model.fc) is nn.Linear


def test_fuse_leaves_hooked_modules_alone_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Tanh())
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with pytest.warns(UserWarning, match="left '0' unfused: they have hooks"):
        fused = pyfastnn.fuse(model)
    assert type(fused[0]) is nn.Linear and type(fused[2]) is FusedLinear
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x), model(x))
    assert len(seen) == 2  # the hook fired for the fused copy too
    # A hooked activation is not absorbed either.
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    model[1].register_forward_pre_hook(lambda module, args: seen.append("relu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = pyfastnn.fuse(model)
    assert [type(m) for m in fused] == [nn.Linear, nn.ReLU]


class _SigmoidOfLinear(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.fc = nn.Linear(6, 3, dtype=dtype)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


def test_fuse_leaves_linears_in_dtypes_the_kernels_lack_as_they_are():
    torch.manual_seed(0)
    complex_mlp = nn.Sequential(nn.Linear(8, 6, dtype=torch.complex64), nn.Tanh(),
                                nn.Linear(6, 2, dtype=torch.complex64))
    x = torch.randn(4, 8, dtype=torch.complex64)
    traced = _SigmoidOfLinear(torch.complex128)
    for model, inputs in ((complex_mlp, x), (traced, torch.randn(4, 6, dtype=torch.complex128))):
        runs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused = pyfastnn.fuse(model, report=runs)
        assert runs == [] and not any(isinstance(m, (FusedLinear, FusedMLP)) for m in fused.modules())
        torch.testing.assert_close(fused(inputs), model(inputs))
    # Beside a float32 run, which still fuses.
    mixed = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2, dtype=torch.complex64))
    assert [type(m) for m in pyfastnn.fuse(mixed)] == [FusedMLP, Absorbed, Absorbed, nn.Linear]
    with pytest.raises(TypeError, match="its weight is torch.complex64; the fused kernels compute in float32"):
        FusedLinear.from_linear(complex_mlp[0])
    with pytest.raises(ValueError, match=r"stopped at module 0: .*its weight is torch.complex64"):
        FusedMLP.from_sequential(complex_mlp)
    # A hooked complex Linear is not one that its hooks kept from fusing: no warning about them.
    complex_mlp[0].register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfastnn.fuse(complex_mlp)
    # A Linear without a weight tensor is left alone too (it cannot run, fused or not).
    for remove in (lambda linear: setattr(linear, "weight", None), lambda linear: delattr(linear, "weight")):
        weightless = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh())
        remove(weightless[0])
        assert [type(m) for m in pyfastnn.fuse(weightless)] == [nn.Linear, nn.ReLU, FusedLinear, Absorbed]


def _stochastic(module: nn.Module, x: torch.Tensor) -> bool:
    return not torch.equal(module(x), module(x))


class ReluDropoutNet(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear written out in forward (the traced path of fuse)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.drop, self.out = nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.drop(self.act(self.fc(x))))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)),
                                  ReluDropoutNet], ids=["Sequential", "traced"])
def test_fuse_keeps_each_dropouts_own_mode(make):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    # A Dropout switched off in a training model stays off; one switched on in an evaluating model
    # (Monte Carlo dropout) stays on: such a Dropout is not absorbed by a layer of the other mode.
    for model_mode, dropout_mode in ((True, False), (False, True)):
        model = make().train(model_mode)
        dropout = next(m for m in model.modules() if isinstance(m, nn.Dropout))
        dropout.train(dropout_mode)
        fused = pyfastnn.fuse(model)
        assert any(isinstance(m, FusedLinear) for m in fused.modules())
        assert _stochastic(fused, x) == dropout_mode == _stochastic(model, x)
        if not dropout_mode:
            torch.testing.assert_close(fused(x), model(x))


def test_fused_mlp_layers_follow_their_own_mode():
    mlp = _mlp(dropout=0.5).eval()
    x = torch.randn(32, 8)
    assert not _stochastic(mlp, x)
    mlp[0].train()  # Monte Carlo dropout on the first layer only, like one nn.Dropout in train()
    assert _stochastic(mlp, x)
    plain = mlp.to_sequential()
    assert [m.training for m in plain] == [True, True, True, False, False, False, False]
    assert _stochastic(plain, x)


def test_fuse_keeps_the_hooks_of_modules_it_would_replace():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    seq.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    seq.register_forward_hook(lambda module, args, out: out + 1)
    fused = pyfastnn.fuse(seq)
    assert isinstance(fused, nn.Sequential) and isinstance(fused[0], FusedMLP)  # fused in place
    torch.testing.assert_close(fused(x), seq(x))
    net = ReluDropoutNet().eval()
    net.register_forward_hook(lambda module, args, out: out * 0)
    with pytest.warns(UserWarning, match="left 'ReluDropoutNet' unfused: they have hooks"):
        fused = pyfastnn.fuse(net)
    assert type(fused) is ReluDropoutNet and len(fused._forward_hooks) == 1
    torch.testing.assert_close(fused(x), net(x))


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class NamedBlock(nn.Sequential):
    def depth(self):
        return len(self)


def test_fuse_sequential_subclasses_keep_what_they_compute_and_their_class():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = nn.Sequential(Residual(nn.Linear(8, 8), nn.ReLU()), NamedBlock(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    fused = pyfastnn.fuse(model).eval()
    torch.testing.assert_close(fused(x), model.eval()(x))
    assert isinstance(fused[1], NamedBlock) and fused[1].depth() == 3  # fused in place, not replaced
    # With its own forward it is left as it is: a traced GraphModule would lose its indexing and methods.
    assert type(fused[0]) is Residual and len(fused[0]) == 2 and type(fused[0][0]) is nn.Linear


def test_fuse_leaves_modules_called_from_outside_their_owner_alone():
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())

        def forward(self, x):
            return self.seq(x) + self.seq[0](x) + self.seq[3](x)  # the first Linear and the Tanh, bare

    torch.manual_seed(0)
    model, x = Outside(), torch.randn(4, 8)
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    torch.testing.assert_close(fused(x), model(x))
    assert runs == [] and type(fused.seq[0]) is nn.Linear and type(fused.seq[3]) is nn.Tanh


class Remembers(nn.Module):
    """Stores what forward saw and counts calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.norm, self.last = nn.LayerNorm(4), None
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.last, self.calls, self.fresh = x.detach(), self.calls + 1, x
        return self.norm(x)


class RemembersThenFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.memo, self.seq, self.fc = Remembers(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)

    def forward(self, x):
        self.seen = x
        return torch.sigmoid(self.fc(self.seq(self.memo(x))))


def test_a_forward_that_assigns_to_its_module_is_left_alone_and_the_trace_leaves_nothing():
    torch.manual_seed(0)
    model = RemembersThenFc()
    fused = pyfastnn.fuse(model)
    # The traced graph could not replay `self.seen = x`: the module keeps its own forward.
    assert type(fused) is RemembersThenFc and type(fused.fc) is nn.Linear
    assert not hasattr(model, "seen") and not hasattr(fused, "seen")
    for module in (model, fused):  # the traces ran forward on proxies: nothing of them stayed
        assert module.memo.last is None and module.memo.calls.item() == 0 and not hasattr(module.memo, "fresh")
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x), model(x))
    assert fused.seen is x


class Distills(nn.Module):
    def __init__(self):
        super().__init__()
        self.student, self.teacher = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():  # a graph does not record grad mode
            target = torch.relu(self.teacher(x))
        return torch.relu(self.student(x)) - target


class FullPrecisionHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        with torch.autocast("cpu", enabled=False):  # nor autocast
            return self.head(h.float())


class ReadsAChildsFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(torch.relu(self.fc(x)), 0.5, self.drop.training)


def test_fuse_leaves_forwards_that_switch_modes_a_graph_cannot_record_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 8, requires_grad=True)
    model = Distills()
    fused = pyfastnn.fuse(model)
    assert type(fused) is Distills
    fused(x).sum().backward()
    assert fused.teacher.weight.grad is None and fused.student.weight.grad is not None

    model = FullPrecisionHead()
    fused = pyfastnn.fuse(model)
    assert type(fused) is FullPrecisionHead
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(x).dtype == model(x).dtype == torch.float32


def test_fuse_leaves_a_forward_reading_a_childs_training_flag_alone():
    torch.manual_seed(0)
    model = ReadsAChildsFlag()  # in train mode
    fused = pyfastnn.fuse(model)
    assert type(fused) is ReadsAChildsFlag
    x = torch.randn(4, 8)
    torch.testing.assert_close(fused.eval()(x), model.eval()(x))


class MaybeHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.return_hidden, self.num_classes = False, 2

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return h if self.return_hidden else self.out(h)


def test_a_traced_module_refuses_calls_after_an_attribute_its_forward_read_changed():
    torch.manual_seed(0)
    model, x = MaybeHidden(), torch.randn(4, 8)
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.fc, FusedLinear)
    fused.num_classes = 3  # forward never reads it
    torch.testing.assert_close(fused(x), model(x))
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), fused):
        torch.testing.assert_close(clone(x), model(x))
        clone.return_hidden = True  # the graph took the other branch
        with pytest.raises(RuntimeError, match="traced while return_hidden was False; it is now True"):
            clone(x)
        clone.return_hidden = False
        torch.testing.assert_close(clone(x), model(x))


def test_a_traced_module_saved_by_an_earlier_version_still_loads():
    """Its pickle names the function that rebuilds it, its tracer and (in its generated code) the
    check of frozen values by the module that held them then, pyfastnn.fuse."""
    torch.manual_seed(0)
    model, x = MaybeHidden(), torch.randn(4, 8)
    saved = pickle.dumps(pyfastnn.fuse(model), protocol=0)  # text: a global is "module\nname", a string its text
    for now, then in [(b"pyfastnn._tracing\nunpickle_keeping_graph_module", b"pyfastnn.fuse\n_unpickle_keeping_graph_module"),
                      (b"pyfastnn._tracing\nShallowTracer", b"pyfastnn.fuse\n_ShallowTracer"),
                      (b"from pyfastnn._tracing import check_unchanged as", b"from pyfastnn.fuse import _check_unchanged as")]:
        assert saved.count(now) == 1, now
        saved = saved.replace(now, then)
    loaded = pickle.loads(saved)
    torch.testing.assert_close(loaded(x), model(x))
    loaded.return_hidden = True
    with pytest.raises(RuntimeError, match="traced while return_hidden was False; it is now True"):
        loaded(x)


def test_a_traced_forward_reading_an_absorbed_activations_setting_refuses_calls_after_it_changes():
    class ReadsTheSlope(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.act(self.fc(x)) / self.act.negative_slope

    torch.manual_seed(0)
    model, x = ReadsTheSlope().eval(), torch.randn(2, 4)
    runs = []
    fused = pyfastnn.fuse(model, report=runs)
    assert [str(run) for run in runs] == ["fc: Linear(4, 4) -> act => FusedLinear"]
    torch.testing.assert_close(fused(x), model(x))  # the absorbed module stays: forward reads it
    fused.act.negative_slope = 0.3
    with pytest.raises(RuntimeError, match="traced while act.negative_slope was 0.2; it is now 0.3"):
        fused(x)


def test_a_frozen_number_changed_to_an_equal_value_of_another_type_is_refused():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.offset = nn.Linear(4, 4), 1

        def forward(self, x):
            return torch.relu(self.fc(x)) + torch.full((4,), self.offset).bitwise_not()

    fused = pyfastnn.fuse(Offset())
    assert isinstance(fused.fc, FusedLinear)
    fused.offset = True  # == 1, yet ~True is False where ~1 is -2
    with pytest.raises(RuntimeError, match="traced while offset was 1; it is now True"):
        fused(torch.randn(2, 4))


def _Scaled(name, value, read) -> nn.Module:
    """A module whose forward reads its attribute `name` (set to `value`) through `read`."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            setattr(self, name, value)

        def forward(self, x):
            return read(self, torch.relu(self.fc(x)))

    return Scaled()


@pytest.mark.parametrize("name, value, read, fused", [
    ("_scale", 2.0, lambda self, h: h * self._scale, True),           # private names are frozen and guarded too
    ("eps", float("nan"), lambda self, h: h + (self.eps != self.eps), True),
    ("scales", [2.0], lambda self, h: h * self.scales[0], False),      # mutable: changed in place unseen
    ("history", [], lambda self, h: (self.history.append(1), h)[1], False),
    ("mask", torch.full((4,), 2.0), lambda self, h: h * self.mask, False),  # a tensor that is no buffer
    ("meta", {"scale": 2.0}, lambda self, h: h * self.meta["scale"], False),  # GraphModule's own name
    ("gain", None, lambda self, h: (setattr(self, "gain", nn.Parameter(torch.ones(4))), h)[1], False),
])
def test_fuse_freezes_only_immutable_attributes_and_leaves_other_forwards_alone(name, value, read, fused):
    torch.manual_seed(0)
    model, x = _Scaled(name, value, read), torch.randn(3, 4)
    result = pyfastnn.fuse(model)
    assert isinstance(result.fc, FusedLinear) is fused and isinstance(result, torch.fx.GraphModule) is fused
    assert sorted(vars(model)) == sorted(vars(_Scaled(name, value, read)))  # tracing left nothing behind
    torch.testing.assert_close(result(x), model(x))
    if fused and name == "_scale":
        result._scale = 3.0
        with pytest.raises(RuntimeError, match="traced while _scale was 2.0; it is now 3.0"):
            result(x)
    if fused and name == "eps":
        result.eps = float("nan")  # NaN again: unchanged
        torch.testing.assert_close(result(x), model(x))


class Normalizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mean", torch.full((4,), 0.5))
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        return torch.relu(self.fc(x - self.mean)) * self.scale


def test_traced_fuse_keeps_the_buffers_and_parameters_forward_reads_in_the_state_dict():
    torch.manual_seed(0)
    model, x = Normalizes(), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.fc, FusedLinear) and list(fused.state_dict()) == list(model.state_dict())
    assert "mean" in fused.state_dict() and dict(fused.named_parameters()).keys() == {"scale", "fc.weight", "fc.bias"}
    torch.testing.assert_close(fused(x), model(x))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = 1.0

    def forward(self, x):
        return x


class ReadsAround(nn.Module):
    """forward reads, by `how`, something a graph would freeze."""
    CLASS_SCALE = 2.0

    def __init__(self, how):
        super().__init__()
        self.fc, self.head, self.how, self._config = nn.Linear(4, 4), Head(), how, {"scale": 1.0}
        self.register_buffer("slope", torch.tensor(0.3))
        self.register_buffer("flip", torch.tensor(True))
        self.register_buffer("cache", torch.zeros(3))

    def __getattr__(self, name):
        if name == "config_scale":
            return self.__dict__["_config"]["scale"]
        return super().__getattr__(name)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.how == "class attribute":
            return h * self.CLASS_SCALE
        if self.how == "__dict__":
            return h * self.config_scale
        if self.how == "child attribute":
            return self.head(h) / self.head.temperature
        if self.how == "training-dependent constant":
            return h * torch.tensor(0.5 if self.training else 1.0)
        if self.how == "grad-dependent constant":
            return h * torch.tensor(2.0 if torch.is_grad_enabled() else 1.0)
        if self.how == "random constant":
            return h + torch.randn(4)
        if self.how == "torch random branch":
            return h.flip(0) if torch.rand(()) < 0.5 else h
        if self.how == "Python random branch":
            return h.flip(0) if random.random() < 0.5 else h
        if self.how == "numpy random number":
            return h * float(sys.modules["numpy"].random.rand())
        if self.how == "buffer as a number":
            return F.leaky_relu(h, float(self.slope))
        if self.how == "buffer as a branch":
            return h.flip(0) if self.flip else h
        if self.how == "buffer's data assigned":
            self.cache.data = self.cache.data + h.detach().sum()
        if self.how == "buffer item assigned":
            self.cache[0] = h.detach().sum()
        if self.how == "inference-mode branch":
            return h * 3.0 if torch.is_inference_mode_enabled() else h
        return h


@pytest.mark.parametrize("how", ["class attribute", "__dict__", "training-dependent constant",
                                 "grad-dependent constant", "random constant", "torch random branch",
                                 "Python random branch", "numpy random number", "buffer as a number",
                                 "buffer as a branch", "buffer's data assigned", "buffer item assigned",
                                 "inference-mode branch"])
def test_fuse_leaves_forwards_alone_that_a_graph_would_freeze_unseen(how):
    torch.manual_seed(0)
    model = ReadsAround(how)
    # numpy is the lesson's dependency, not the library's: its generator is checked where it is loaded.
    np = pytest.importorskip("numpy") if how == "numpy random number" else sys.modules.get("numpy")
    generators = torch.get_rng_state(), random.getstate(), np.random.get_state() if np else ()
    fused = pyfastnn.fuse(model)
    assert type(fused) is ReadsAround and type(fused.fc) is nn.Linear
    # Its traces drew random numbers (every time a draw is seen, not only where two traces' draws
    # differ: a branch on one would often be taken alike twice); the caller's generators are where
    # they were.
    assert torch.equal(torch.get_rng_state(), generators[0]) and random.getstate() == generators[1]
    assert np is None or all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), generators[2]))
    assert model.slope.item() == pytest.approx(0.3) and bool(model.flip) and not model.cache.any()


class KeepsRunningStatistics(nn.Module):
    """Updates buffers in place in forward, as running statistics do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = torch.relu(self.fc(x))
        self.running_mean.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        self.seen.add_(x.shape[0])
        return h


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1  # an assignment to the module too (the result of += is stored back)
        return torch.relu(self.fc(x))


def test_traced_fuse_records_a_forwards_in_place_buffer_updates_and_runs_none_of_them():
    torch.manual_seed(0)
    for child in (KeepsRunningStatistics, CountsCalls):
        model = nn.Sequential(nn.LayerNorm(4), child())
        eager = copy.deepcopy(model)
        for fused in (pyfastnn.fuse(model), pyfastnn.fuse(model, inplace=True)):
            # The traces ran no update: the buffers are as they were, in the model and in the result.
            assert all(not buffer.any() for m in (model, fused) for buffer in m[1].buffers())
        # The updates are in the graph: the fused model's buffers follow the original's call by call.
        # (`self.calls += 1` stores into the module, which no graph does: that module is left alone.)
        assert isinstance(fused[1].fc, FusedLinear if child is KeepsRunningStatistics else nn.Linear)
        for _ in range(3):
            x = torch.randn(5, 4)
            torch.testing.assert_close(fused(x), eager(x))
        for (name, got), want in zip(fused[1].named_buffers(), eager[1].buffers()):
            assert got.any(), name
            torch.testing.assert_close(got, want)


def test_a_childs_attribute_forward_reads_is_guarded_also_under_torch_compile():
    torch.manual_seed(0)
    model, x = ReadsAround("child attribute"), torch.randn(3, 4)
    outer = nn.Sequential(nn.LayerNorm(4), model)
    fused = pyfastnn.fuse(outer)
    assert isinstance(fused[1].fc, FusedLinear)
    torch.testing.assert_close(fused(x), outer(x))
    fused[1].head.temperature = 4.0
    with pytest.raises(RuntimeError, match="traced while head.temperature was 1.0; it is now 4.0"):
        fused(x)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="head.temperature"):  # the check is inside the nested forward
        torch.compile(fused, backend="eager")(x)


def test_a_changed_number_is_named_also_when_a_warm_fullgraph_compile_recompiles():
    # The recompile after the change may make the number symbolic: the check must still trace and raise.
    torch.manual_seed(0)
    model, x = ReadsAround("child attribute"), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    fused.head.temperature = 4.0
    with pytest.raises(RuntimeError, match="traced while head.temperature was 1.0; it has changed since"):
        compiled(x)


def test_fuse_traces_only_forwards_of_one_input():
    class Signed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, negate):
            h = torch.relu(self.fc(x))
            return -h if negate is True else h  # a proxy is never True: tracing would freeze one branch

    model, x = Signed(), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    assert type(fused) is Signed
    torch.testing.assert_close(fused(x, True), model(x, True))


class Keeps(nn.Module):
    """forward writes into a list and into a child: side effects tracing must not leave behind."""

    def __init__(self):
        super().__init__()
        self.fc, self.block, self.seen = nn.Linear(4, 4), Head(), []

    def forward(self, x):
        h = torch.relu(self.fc(x))
        self.seen.append(1)
        self.block.last = h
        return h


def test_tracing_writes_nothing_into_the_users_objects_even_in_place():
    model = Keeps()
    fused = pyfastnn.fuse(model, inplace=True)
    assert fused is model and model.seen == [] and not hasattr(model.block, "last")
    pickle.dumps(model)  # no proxy left inside it
    model(torch.randn(2, 4))
    assert model.seen == [1]


class Optional(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.act, self.how = nn.Linear(4, 4), nn.LeakyReLU(0.1), how
        self.register_buffer("mean", None)
        self.gate = torch.sigmoid  # a function attribute: frozen by identity

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.how == "shared activation":
            return self.act(h)
        if self.how == "probe":
            return h * getattr(self, "scale", 1.0)
        if self.mean is not None:
            h = h - self.mean
        return self.gate(h)


def test_optional_buffers_are_guarded_probes_refused_and_shared_activations_kept_whole():
    torch.manual_seed(0)
    model, x = Optional("optional buffer"), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.fc, FusedLinear)
    torch.testing.assert_close(fused(x), model(x))
    fused.mean = torch.ones(4)  # an optional buffer set after fusion: the graph skipped `h - self.mean`
    with pytest.raises(RuntimeError, match="traced while mean was None"):
        fused(x)
    # `act` called twice: absorbing it at one call would split it in two; `scale` probed: the default is frozen
    for how in ("shared activation", "probe"):
        assert type(pyfastnn.fuse(Optional(how))) is Optional


class Untraceable(nn.Module):
    """A data-dependent branch (untraceable) that calls into its children's children."""

    def __init__(self, how):
        super().__init__()
        self.block, self.mlp, self.how = ReluBlock(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), how

    def forward(self, x):
        if x.sum() > 0:  # a tensor decides: torch.fx cannot trace this
            x = x * 2
        if self.how == "grandchild":
            return self.block(x) + self.block.fc(x)  # the bare Linear, without the block's relu
        return self.mlp(x) + self.mlp[0](x) + self.mlp[:2](x)


@pytest.mark.parametrize("how", ["grandchild", "indexing"])
def test_calls_past_the_owner_in_an_untraceable_forward_are_read_from_its_source(how):
    torch.manual_seed(0)
    model, x = Untraceable(how), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    torch.testing.assert_close(fused(x), model(x))
    torch.testing.assert_close(fused(-x), model(-x))


class PastTheOwner(nn.Module):
    """Reaches block.fc or mlp[0] past their owners in ways one trace does not show."""

    def __init__(self, how):
        super().__init__()
        self.block, self.mlp, self.how = ReluBlock(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), how
        self.return_preact = False

    def first_linear(self):
        return self.block.fc  # a helper method

    def forward(self, x):
        if self.how == "training only" and self.training:
            return self.block.fc(x)  # the pre-activation, for an auxiliary loss
        if self.how == "flag" and self.return_preact:
            return self.block.fc(x)
        if self.how == "helper":
            return self.first_linear()(x) + self.block(x)
        if self.how == "alias":
            block = self.block
            return block.fc(x) + block(x)
        if self.how == "getattr":
            return getattr(self.block, "fc")(x) + self.block(x)
        if self.how == "iteration":
            for layer in self.mlp:
                return layer(x) + self.mlp(x)
        return self.block(x) + self.mlp(x)


@pytest.mark.parametrize("how", ["training only", "flag", "helper", "alias", "getattr", "iteration"])
def test_calls_past_the_owner_that_one_trace_does_not_show_keep_their_targets(how):
    torch.manual_seed(0)
    model, x = PastTheOwner(how).eval(), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(fused, mode)()
        model.return_preact = fused.return_preact = mode == "train"
        torch.testing.assert_close(fused(x), model(x))


class MakesTensors(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how, self.keep = nn.Linear(4, 2), how, nn.Identity()

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.how == "accumulates":
            total = torch.zeros(2)
            total += h.sum(0)  # in place into a tensor forward made: a fresh one each call
            return total
        if self.how == "handed to a module":
            return h, self.keep(torch.zeros(2))  # nn.Identity hands it back: the caller may change it
        if self.how == "written by out=":
            total = torch.zeros(2)
            torch.add(total, h.detach().sum(0), out=total)
            return h + total
        if self.how == "a row picked by the data written":
            counts = torch.zeros(2, 2)
            counts[h.argmax() % 2].add_(1.0)  # indexed by a tensor: a graph node, its result a view
            return h + counts.sum(0)
        if self.how == "a view written":
            total = torch.zeros(3, 2)
            total.view_as(h)[0].add_(h[0])
            return h + total
        if self.how == "a row assigned":
            counts = torch.zeros(2, 2)
            counts[0] = h.sum().detach()  # traced as counts.__setitem__: the read below saw no write
            return h + counts.sum(0)
        out = torch.zeros(x.shape[0], 3)
        out[:, :2] = h
        return out  # returned: each call's output its own tensor


@pytest.mark.parametrize("how", ["accumulates", "fills", "handed to a module", "written by out=",
                                 "a row picked by the data written", "a view written", "a row assigned"])
def test_tensors_forward_creates_and_changes_in_place_are_never_shared_between_calls(how):
    torch.manual_seed(0)
    model, x = MakesTensors(how), torch.randn(3, 4)
    fused = pyfastnn.fuse(model)
    first = fused(x)
    if how == "handed to a module":
        first[1].add_(1.0)  # the caller changes what it got
    torch.testing.assert_close(fused(x), model(x))
    if how != "handed to a module":
        torch.testing.assert_close(first, model(x))  # not changed by the second call


class _HandsOutItsLinear(ReluBlock):
    def linear(self):
        return self.fc


class _CallsAChildsLinear(nn.Module):  # traceable: only the graph shows block.fc called past its owner
    def __init__(self):
        super().__init__()
        self.block = _HandsOutItsLinear()

    def forward(self, x):
        return self.block(x) + self.block.linear()(x)


class _LeakyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.act(self.fc(x))


class _ReadsAGrandchildsSetting(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _LeakyBlock()

    def forward(self, x):
        return self.block(x) * self.block.act.negative_slope


class _ReadsASettingBySubmodulePath(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.LayerNorm(4))

    def forward(self, x):
        return self.seq(x) * self.get_submodule("seq.1").negative_slope


class _DefaultedInput(ReluBlock):
    def __init__(self):
        super().__init__()
        self.register_buffer("default_input", torch.randn(3, 4))

    def forward(self, x=None):
        return super().forward(self.default_input if x is None else x)


class _KeywordInputs(ReluBlock):
    def forward(self, **inputs):
        h = super().forward(inputs["x"])
        return h * inputs["scale"] if inputs.get("scale") is not None else h


class _DtypeByMode(ReluBlock):
    def forward(self, x):
        return super().forward(x) * torch.ones(4, dtype=torch.float64 if self.training else torch.float32)


@pytest.mark.parametrize("model_class, call", [
    (_CallsAChildsLinear, lambda m, x: m(x)),
    (_ReadsAGrandchildsSetting, lambda m, x: m(x)),
    (_ReadsASettingBySubmodulePath, lambda m, x: m(x)),
    (_DefaultedInput, lambda m, x: m()),
    (_KeywordInputs, lambda m, x: m(x=x)),
    (_KeywordInputs, lambda m, x: m(x=x, scale=2.0)),
    (_DtypeByMode, lambda m, x: m.train()(x)),
], ids=["a child's linear called past it", "a grandchild's setting read", "a setting read by its path",
        "a defaulted input", "keyword inputs",
        "keyword inputs given", "a dtype picked by the mode"])
def test_fuse_keeps_what_forward_reaches_reads_or_is_called_with(model_class, call):
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forwards left untraced say so
        fused = pyfastnn.fuse(model)
    expected = call(model, x)
    got = call(fused, x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)


class _MigratesOldKeys(ReluBlock):
    def _load_from_state_dict(self, state_dict, prefix, *args):  # checkpoints of its older versions
        for key in [k for k in state_dict if k.startswith(prefix + "linear.")]:
            state_dict[prefix + "fc." + key[len(prefix + "linear."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


class _KeepsItsScaleInFloat32(ReluBlock):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return super().forward(x) * self.scale

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.scale = self.scale.float()
        return self


class _SavesNoBias(ReluBlock):
    def state_dict(self, *args, **kwargs):
        return {key: value for key, value in super().state_dict(*args, **kwargs).items() if not key.endswith("bias")}


class _Versioned(ReluBlock):
    _version = 2


class _WithExtraState(ReluBlock):
    def get_extra_state(self):
        return {"classes": 4}

    def set_extra_state(self, state):
        pass


def test_fuse_leaves_a_module_whose_class_overrides_what_torch_calls_on_modules():
    """Loading, saving and converting run the class's own code; a traced copy would not."""
    old_checkpoint = {"linear.weight": torch.ones(4, 4), "linear.bias": torch.zeros(4)}
    for model_class in (_MigratesOldKeys, _KeepsItsScaleInFloat32, _SavesNoBias, _Versioned, _WithExtraState):
        model = model_class()
        fused = pyfastnn.fuse(model)
        assert type(fused) is model_class, model_class.__name__
        assert list(fused.state_dict()) == list(model.state_dict()), model_class.__name__
        assert (getattr(fused.state_dict(), "_metadata", {}).get("", {}).get("version") ==
                getattr(model.state_dict(), "_metadata", {}).get("", {}).get("version")), model_class.__name__
    original = _MigratesOldKeys()
    for model in (original, pyfastnn.fuse(original)):
        model.load_state_dict(dict(old_checkpoint))
        torch.testing.assert_close(model.fc.weight, torch.ones(4, 4))
    assert pyfastnn.fuse(_KeepsItsScaleInFloat32()).double().scale.dtype == torch.float32


def test_fuse_keeps_what_a_linears_extra_attribute_or_an_own_call_would_lose():
    class Doubles(ReluBlock):
        def __call__(self, x):
            return super().__call__(x * 2)

    tagged = ReluBlock()
    tagged.fc.scale = 2.0  # an attribute of the Linear itself: FusedLinear would not have it
    for model in (Doubles(), tagged):
        fused = pyfastnn.fuse(model)
        assert type(fused.fc) is nn.Linear and (not hasattr(model.fc, "scale") or fused.fc.scale == 2.0)
        x = torch.randn(3, 4)
        torch.testing.assert_close(fused(x), model(x))


def test_a_shared_activation_module_without_settings_is_absorbed_at_each_call():
    class SharedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.relu = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4), nn.ReLU()

        def forward(self, x):
            return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))

    torch.manual_seed(0)
    model, runs, x = SharedRelu(), [], torch.randn(3, 8)
    fused = pyfastnn.fuse(model, report=runs)
    assert [str(run) for run in runs] == ["fc1: Linear(8, 16) -> relu => FusedLinear",
                                          "fc2: Linear(16, 16) -> relu => FusedLinear"]
    torch.testing.assert_close(fused(x), model(x))

    class AlsoElsewhere(SharedRelu):
        def forward(self, x):
            h = self.relu(self.fc2(self.relu(self.fc1(x))))
            return self.fc3(self.relu(h - 0.1))  # a third call, after no Linear

    model = AlsoElsewhere()
    fused = pyfastnn.fuse(model)  # absorbing it at some calls only: replacing it later would reach the rest
    assert type(fused) is AlsoElsewhere
    model.relu = fused.relu = nn.Tanh()
    torch.testing.assert_close(fused(x), model(x))


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class Stages(nn.Module):
    """Blocks called in a loop (transformer- and ResNet-style), and a property that raises."""

    def __init__(self):
        super().__init__()
        self.blocks, self._seen = nn.ModuleList(Stage() for _ in range(3)), None

    @property
    def seen(self):
        if self._seen is None:
            raise RuntimeError("call forward first")  # reading the source must never run this
        return self._seen

    def summary(self):
        return self.seen.shape

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class PreActivation(nn.Sequential):
    def pre_activation(self, x):
        return self[0](x)  # the first Linear alone: fusing it with the ReLU would change this


def test_looped_blocks_fuse_and_methods_that_index_a_sequential_keep_it():
    torch.manual_seed(0)
    model, x, runs = Stages(), torch.randn(3, 8), []
    fused = pyfastnn.fuse(model, report=runs)
    assert len(runs) == 6 and all(isinstance(block.fc1, FusedLinear) for block in fused.blocks)
    torch.testing.assert_close(fused(x), model(x))
    seq = PreActivation(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    fused = pyfastnn.fuse(seq)
    torch.testing.assert_close(fused.pre_activation(x), seq.pre_activation(x))


def test_the_report_names_functional_activations():
    runs = []
    pyfastnn.fuse(SimpleFunctional(), report=runs)
    assert [str(run) for run in runs] == ["fc: Linear(4, 4) -> relu => FusedLinear"]


class SimpleFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(4, 4), torch.relu

    def forward(self, x):
        return F.relu(self.fc(x)) + self.gate(x)


def test_fuse_is_unaffected_by_other_threads_grad_mode_and_keeps_later_hooks_through_copies():
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            with torch.no_grad():
                pass

    thread = threading.Thread(target=toggle)
    thread.start()
    try:  # the modes tracing watches are each thread's own
        assert all(isinstance(pyfastnn.fuse(MaybeHidden()).fc, FusedLinear) for _ in range(20))
    finally:
        stop.set()
        thread.join()
    fused, calls = pyfastnn.fuse(MaybeHidden()), []
    fused.register_forward_hook(lambda *args: calls.append(1))
    for clone in (copy.deepcopy(fused), copy.copy(fused), fused):
        clone(torch.randn(2, 8))
    assert len(calls) == 3


def test_fuse_keeps_a_linears_state_dict_hooks():
    def from_legacy_names(module, state_dict, prefix, *args):
        for old, new in (("W", "weight"), ("b", "bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].register_load_state_dict_pre_hook(from_legacy_names)
    with pytest.warns(UserWarning, match="left '0' unfused: they have hooks"):
        fused = pyfastnn.fuse(model)
    assert type(fused[0]) is nn.Linear
    legacy = {"0.W": torch.ones(4, 4), "0.b": torch.ones(4), "2.weight": torch.ones(2, 4), "2.bias": torch.ones(2)}
    assert str(fused.load_state_dict(legacy)) == "<All keys matched successfully>"


def test_traced_fuse_keeps_unused_submodules_buffers_and_attributes():
    class WithExtras(ReluDropoutNet):
        def __init__(self):
            super().__init__()
            self.aux_head = nn.Linear(16, 2)  # used by another method only
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
            self.register_buffer("cache", torch.ones(3), persistent=False)
            self.num_classes = 4

    torch.manual_seed(0)
    model = WithExtras().eval()
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.fc, FusedLinear) and not hasattr(fused, "act") and not hasattr(fused, "drop")
    x = torch.randn(4, 8)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    # GraphModule by itself rebuilds from what its graph uses when copied or unpickled
    for clone in (fused, copy.deepcopy(fused), copy.copy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(buffer, weights_only=False)):
        assert clone.num_classes == 4 and isinstance(clone.aux_head, nn.Linear) and type(clone).__name__ == "WithExtras"
        assert list(clone.state_dict()) == list(model.state_dict())
        assert dict(clone.named_buffers()).keys() == {"step", "cache"} and "cache" not in clone.state_dict()
        assert str(clone.load_state_dict(model.state_dict())) == "<All keys matched successfully>"
        torch.testing.assert_close(clone(x), model(x))
    clone = copy.deepcopy(fused)
    assert clone.aux_head.weight is not fused.aux_head.weight and clone.step is not fused.step


class ScalesByAConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) * torch.tensor([1.0, 2.0, 3.0])  # a tensor made by forward: a trace constant


def test_traced_fuse_keeps_a_forwards_tensor_constants_out_of_the_state_dict():
    torch.manual_seed(0)
    model, x = ScalesByAConstant(), torch.randn(2, 4)
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.fc, FusedLinear) and not hasattr(model, "_tensor_constant0")
    assert list(fused.state_dict()) == list(model.state_dict()) == ["fc.weight", "fc.bias"]
    for clone in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        torch.testing.assert_close(clone(x), model(x))
    # The constant stays as forward made it, float32: a half model's output is promoted as the original's.
    assert fused.half()(x.half()).dtype == model.half()(x.half()).dtype == torch.float32
    traced_before = ScalesByAConstant()
    torch.fx.symbolic_trace(traced_before)  # leaves _tensor_constant0 on it; fuse's traces number theirs on
    assert isinstance(pyfastnn.fuse(traced_before).fc, FusedLinear)


def test_fuse_leaves_a_forward_with_optional_arguments_alone():
    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, scale=None):
            h = torch.relu(self.fc(x))
            return h if scale is None else h * scale  # tracing would keep only one branch

    model, x = Optional(), torch.randn(4, 8)
    fused = pyfastnn.fuse(model)
    torch.testing.assert_close(fused(x), model(x))
    torch.testing.assert_close(fused(x, scale=2.0), model(x, scale=2.0))


def test_conversions_keep_the_train_and_eval_modes():
    mlp = _mlp(dropout=0.5).eval()
    x = torch.randn(32, 8)
    for plain in (mlp.to_sequential(), mlp[0].to_linear()):
        assert not plain.training and not any(m.training for m in plain.modules())
    torch.testing.assert_close(mlp.to_sequential()(x), mlp(x))
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)).eval()
    assert not FusedMLP.from_sequential(seq).training
    seq[2].train()  # Monte Carlo dropout: no fused layer has two modes
    with pytest.raises(ValueError, match=r"stopped at module 2: .*a Dropout in train mode after a Linear in eval mode"):
        FusedMLP.from_sequential(seq)
    assert not FusedLinear.from_linear(seq[0]).training


@pytest.mark.parametrize("change", ["activation off", "activation on", "dropout on"])
def test_to_sequential_keeps_the_keys_after_a_layer_changes(change):
    mlp = _mlp(sizes=(8, 16, 12, 4))  # keys 0.*, 2.*, 4.*
    layer = mlp[1] if change != "activation on" else mlp[2]
    if change == "activation off":
        layer.activation = None
    elif change == "activation on":
        layer.activation = "relu"
    else:
        layer.dropout = 0.25
    plain = mlp.to_sequential()
    assert list(plain.state_dict()) == list(mlp.state_dict())
    mlp.eval(), plain.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(plain(x), mlp(x))


def test_fuse_leaves_a_linear_with_extra_state_alone_and_explains_a_failed_copy():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    model[0].register_buffer("calibration", torch.ones(8))
    fused = pyfastnn.fuse(model)
    assert type(fused[0]) is nn.Linear and list(fused.state_dict()) == list(model.state_dict())
    pruned = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    torch.nn.utils.prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(RuntimeError, match="could not copy the model.*inplace=True"):
        pyfastnn.fuse(pruned)


# ---------------------------------------------------------------------------------------------
# In-place ops after identity outputs


def test_changing_saved_inputs_or_biases_in_place_raises_instead_of_a_wrong_gradient():
    # The fused node keeps its input and biases (backward(create_graph=True) recomputes from them):
    # changing one before backward is refused by autograd's version check, never silently used.
    layer, mlp = FusedLinear(8, 4, activation="relu"), _mlp((8, 6, 2))
    for module, change in ((layer, lambda x: layer.bias.add_(0.1)), (mlp, lambda x: x.mul_(0))):
        leaf = torch.randn(3, 8, requires_grad=True)
        x = leaf * 1.0
        y = module(x)
        with torch.no_grad():
            change(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


class _LeakyResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)  # legal after nn.LeakyReLU, which keeps its input


def test_fuse_keeps_a_model_changing_a_leaky_relu_output_in_place_trainable():
    torch.manual_seed(0)
    model = _LeakyResidual()
    fused = pyfastnn.fuse(model)
    assert any(isinstance(m, (FusedLinear, FusedMLP)) for m in fused.modules())
    x = torch.randn(4, 8)
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (model, fused)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


class _DroppedResidual(nn.Module):
    """Blocks that change their dropped-out output in place: legal in training after torch's Dropout,
    whose output is a tensor of its own, whatever the activation before it kept for backward."""

    def __init__(self, activation: type, traced: bool) -> None:
        super().__init__()
        self.traced = traced
        self.body = nn.Sequential(nn.Linear(8, 8), activation(), nn.Dropout(0.25), nn.Linear(8, 8), activation(),
                                  nn.Dropout(0.25))
        self.fc1, self.fc2, self.act1, self.act2 = nn.Linear(8, 8), nn.Linear(8, 8), activation(), activation()
        self.drop1, self.drop2 = nn.Dropout(0.25), nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.traced:
            h = self.drop2(self.act2(self.fc2(self.drop1(self.act1(self.fc1(x))))))
        else:
            h = self.body(x)
        h += x
        return h


@pytest.mark.parametrize("traced", [False, True], ids=["sequential", "traced"])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU])
def test_fuse_keeps_a_block_changing_its_dropped_out_output_in_place_trainable(activation, traced):
    # The fused layer keeps relu's, sigmoid's and tanh's output for backward: the Dropout whose
    # output leaves the Sequential for a forward that may change it stays a Dropout after it (NOTE
    # [A Dropout ending a fused layer]); one feeding the next Linear, and any after gelu (whose
    # backward reads its pre-activation), joins its layer. A traced forward records `h += x` out of
    # place (a graph value has no in-place add): there the Dropout joins its layer too.
    torch.manual_seed(0)
    model = _DroppedResidual(activation, traced).train()
    fused = pyfastnn.fuse(model)
    mlp = fused.body if isinstance(fused.body, FusedMLP) else fused.body[0]
    first, last = (fused.fc1, fused.fc2) if traced else mlp.children()
    assert first.dropout == 0.25
    assert last.dropout == (0.25 if traced or activation is nn.GELU else 0.0)
    if not traced and activation is not nn.GELU:
        assert type(fused.body[5]) is nn.Dropout
    x = torch.randn(4, 8)
    for module in (model, fused):
        module(x).square().sum().backward()  # a fused layer reading the changed output would raise here
        assert all(p.grad is not None for name, p in module.named_parameters() if traced == name.startswith("fc"))


def _dropout_block(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.2))


class _DroppedHead(nn.Module):
    def __init__(self, classifier: nn.Module, in_place: bool = False) -> None:
        super().__init__()
        self.fc, self.drop, self.classifier, self.in_place = nn.Linear(8, 8), nn.Dropout(0.2), classifier, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc(x)))
        return self.classifier(F.relu(h, inplace=True) if self.in_place else h)


class _ChangesItsDataInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc(x)))
        h.data.mul_(2)  # unseen by autograd: a fused layer's backward would read the changed values
        return self.head(h)


class _CallsItsBlock(nn.Module):
    """Calls the first module of its Sequential itself and changes its output in place (not traced:
    forward takes two inputs)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        first = _dropout_block(8) if depth == 1 else nn.Sequential(nn.Linear(8, 8), _dropout_block(8))
        self.outer = nn.Sequential(first, nn.Linear(8, 2))

    def forward(self, x: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        h = self.outer[0](x)
        h += shift
        return self.outer(x).sum() + h.sum()


def test_a_dropout_ending_a_relu_run_is_fused_where_only_layers_keeping_their_input_read_its_output():
    # NOTE [A Dropout ending a fused layer]: blocks built as Sequentials (the usual MLP builder) keep
    # their dropout fused when a Linear, a fused layer or a Sequential starting with one reads them.
    torch.manual_seed(0)
    dropouts = lambda model: [m.dropout for m in model.modules() if isinstance(m, FusedLinear)]
    builder = nn.Sequential(_dropout_block(8), nn.Sequential(_dropout_block(8), _dropout_block(8)), nn.Linear(8, 2))
    assert dropouts(pyfastnn.fuse(builder)) == [0.2, 0.2, 0.2]
    # What the caller gets, what any other module reads, or what one changes in place: a Dropout.
    for model in (_dropout_block(8), nn.Sequential(_dropout_block(8), nn.LayerNorm(8)),
                  _DroppedHead(nn.Identity()), _DroppedHead(nn.Linear(8, 2), in_place=True)):
        fused = pyfastnn.fuse(model)
        assert dropouts(fused) == [0.0] and sum(type(m) is nn.Dropout for m in fused.modules()) == 1, fused
    for classifier in (nn.Linear(8, 2), nn.Sequential(nn.Linear(8, 2), nn.ReLU())):
        assert pyfastnn.fuse(_DroppedHead(classifier)).fc.dropout == 0.2
    assert pyfastnn.fuse(_ChangesItsDataInPlace()).fc.dropout == 0.0
    x = torch.randn(4, 8)
    for model in (builder, _DroppedHead(nn.Linear(8, 2))):  # in eval, the same values
        torch.testing.assert_close(pyfastnn.fuse(model).eval()(x), model.eval()(x))
    # Whatever else gets a Sequential's output, a hook or a forward calling it, keeps it a Dropout:
    # all of these train after fuse as before.
    hooked = nn.Sequential(_dropout_block(8), nn.Linear(8, 2))
    hooked[0].register_forward_hook(lambda module, args, output: output.mul_(2))
    for model in (hooked, _CallsItsBlock(depth=1), _CallsItsBlock(depth=2)):
        fused = pyfastnn.fuse(model.train())
        assert dropouts(fused)[0] == 0.0, fused
        for module in (model, fused):
            module(x).sum().backward()  # a fused layer reading the changed output would raise here


def test_inplace_op_after_identity_output_like_nn_linear():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    linear = nn.Linear(6, 6)
    layer = FusedLinear.from_linear(linear, activation=None, copy=True)
    mlp = _mlp((6, 8, 6))
    plain = mlp.to_sequential()
    for module, twin in ((layer, linear), (mlp, plain)):
        grads = []
        for m in (module, twin):
            y = m(x)
            y += x  # legal after nn.Linear: its backward needs only input and weight
            y.square().sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            m.zero_grad()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    weights = [torch.randn(8, 6, requires_grad=True), torch.randn(6, 8, requires_grad=True)]
    y = pyfastnn.fused_mlp(x, weights, None, "relu", dropout=0.3, training=True)
    y.mul_(2)
    y.sum().backward()
    assert all(w.grad is not None for w in weights)
    # gelu, gelu_tanh, silu and leaky_relu differentiate from their pre-activation, as torch's do: the
    # output may be changed in place (sigmoid, tanh and relu read it, and refuse like torch's).
    for act, torch_act in (("gelu", F.gelu), ("silu", F.silu), ("leaky_relu", F.leaky_relu)):
        for kind in ("mlp", "one layer in training"):
            ws = [w.detach().requires_grad_() for w in weights]
            if kind == "mlp":
                y, want = pyfastnn.fused_mlp(x, ws, None, "tanh", act), torch_act(torch.tanh(x @ ws[0].t()) @ ws[1].t())
            else:
                y, want = pyfastnn.fused_mlp(x, ws[:1], None, [], act, training=True), torch_act(x @ ws[0].t())
            y.mul_(2)
            (got,) = torch.autograd.grad(y.sum(), ws[0])
            torch.testing.assert_close(got, torch.autograd.grad((want * 2).sum(), ws[0])[0])
    y = pyfastnn.fused_mlp(x, weights, None, "relu", "sigmoid")
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # A layer whose own output is dropped out in training: identity, gelu, silu and leaky_relu outputs
    # still take in-place ops (the same masks with and without: gradients twice as large); relu's refuses.
    for act in ("identity", "gelu", "silu", "leaky_relu", "relu"):
        layer = FusedLinear(6, 5, activation=act, dropout=0.3).train()
        torch.manual_seed(1)
        (plain_grad,) = torch.autograd.grad(layer(x).sum(), layer.weight)
        torch.manual_seed(1)
        y = layer(x)
        y.mul_(2)
        if act == "relu":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(y.sum(), layer.weight)
        else:
            torch.testing.assert_close(torch.autograd.grad(y.sum(), layer.weight)[0], 2 * plain_grad)


# ---------------------------------------------------------------------------------------------
# Layer attributes mean what they say


def test_assigning_layer_attributes_changes_the_computation():
    torch.manual_seed(0)
    layer = FusedLinear(5, 4, activation="relu")
    x = torch.randn(3, 5)
    layer.activation = "tanh"
    torch.testing.assert_close(layer(x), torch.tanh(F.linear(x, layer.weight, layer.bias)))
    assert "activation=tanh" in repr(layer)
    layer.activation = None
    assert layer.activation == "identity"
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="unknown activation 'softmax'"):
        layer.activation = "softmax"
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        layer.dropout = 1.5
    assert layer.activation == "identity" and layer.dropout == 0.0  # unchanged by the refused values

    mlp = _mlp((5, 6, 2))
    mlp[0].activation = "leaky_relu"
    mlp[0].negative_slope = 0.3
    expected = F.linear(F.leaky_relu(F.linear(x, mlp[0].weight, mlp[0].bias), 0.3), mlp[1].weight, mlp[1].bias)
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.negative_slope == 0.3
    mlp[1].activation, mlp[1].negative_slope = "leaky_relu", 0.1
    with pytest.raises(ValueError, match="same negative_slope"):
        mlp(x)
    mlp[1].negative_slope = 0.3
    mlp[0].dropout = 0.5  # now read by the fused op in train(): about half the hidden units drop
    mlp[1].activation = None
    mlp.train()
    x = torch.randn(512, 5)
    mlp[1].weight.data = torch.eye(2, 6)
    mlp[1].bias.data.zero_()
    hidden = F.leaky_relu(F.linear(x, mlp[0].weight, mlp[0].bias), 0.3)[:, :2]
    out = mlp(x)
    kept = out != 0
    assert 0.35 < 1 - kept.float().mean().item() < 0.65
    torch.testing.assert_close(out[kept], (hidden * 2)[kept])


# ---------------------------------------------------------------------------------------------
# Hook-based utilities and parametrizations on FusedMLP layers


def _reference_of(mlp: FusedMLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP computed layer by layer from each layer's current `weight` attribute."""
    return reference_mlp(x, [layer.weight for layer in mlp], [layer.bias for layer in mlp],
                         [layer.activation for layer in mlp], mlp.negative_slope)


@pytest.mark.parametrize("utility", ["spectral_norm", "weight_norm", "prune"])
def test_hook_based_reparametrizations_train_on_fused_mlp_layers(utility):
    torch.manual_seed(0)
    mlp = _mlp((6, 10, 3), activation="tanh").double()
    if utility == "spectral_norm":
        nn.utils.spectral_norm(mlp[0])
    elif utility == "weight_norm":
        nn.utils.weight_norm(mlp[1])
    else:
        torch.nn.utils.prune.l1_unstructured(mlp[0], "weight", amount=0.5)
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    x = torch.randn(7, 6, dtype=torch.float64)
    for _ in range(3):  # the second step failed when the weight was computed only once
        optimizer.zero_grad()
        out = mlp(x)
        expected = _reference_of(mlp, x)  # the weights the pre-hooks computed for this call
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(expected.sum(), list(mlp.parameters()), retain_graph=True)
        out.sum().backward()
        for p, g in zip(mlp.parameters(), grads):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g)
        optimizer.step()
    with pytest.raises(RuntimeError, match="computed by a forward pre-hook"):
        mlp.to_sequential()


def test_parametrized_layers_convert_to_sequential():
    torch.manual_seed(0)
    mlp = _mlp((6, 10, 3))
    nn.utils.parametrizations.weight_norm(mlp[0])
    plain = mlp.to_sequential()
    x = torch.randn(4, 6)
    torch.testing.assert_close(plain(x), mlp(x))
    assert list(plain.state_dict()) == list(mlp.state_dict())
    plain(x).sum().backward()
    assert mlp[0].parametrizations.weight.original0.grad is not None  # shared, not copied


class _Double(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrizations_of_to_sequential_are_its_own_on_shared_parameters():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    mlp = _mlp((4, 8, 2))
    nn.utils.parametrize.register_parametrization(mlp[0], "weight", _Double())
    expected = mlp(x)
    plain = mlp.to_sequential()
    nn.utils.parametrize.register_parametrization(plain[0], "weight", _Double())  # on the copy only
    torch.testing.assert_close(mlp(x), expected)
    assert len(mlp[0].parametrizations.weight) == 1 and len(plain[0].parametrizations.weight) == 2
    assert plain[0].parametrizations.weight.original is mlp[0].parametrizations.weight.original

    mlp = _mlp((4, 8, 2))
    nn.utils.parametrizations.spectral_norm(mlp[0])
    plain = mlp.to_sequential().eval()  # the copy's mode is its own: the layer's power iteration goes on
    u = mlp[0].parametrizations.weight[0]._u.clone()
    mlp(x)
    assert mlp.training and not torch.equal(u, mlp[0].parametrizations.weight[0]._u)
    # ... on one state: the iteration's vectors are shared, so the two compute one weight ...
    torch.testing.assert_close(plain(x), mlp.eval()(x))
    # ... and a state dict loaded into the copy is the layer's too.
    state = {name: torch.randn_like(t) if t.is_floating_point() else t for name, t in plain.state_dict().items()}
    plain.load_state_dict(state)
    torch.testing.assert_close(mlp(x), plain(x))
    assert all(torch.equal(mlp.state_dict()[name], t) for name, t in state.items())


def test_forward_and_backward_hooks_on_layers_are_refused_clearly():
    mlp = _mlp((4, 5, 2))
    mlp[1].register_forward_hook(lambda module, args, out: None)
    with pytest.raises(RuntimeError, match="layer '2' has forward or backward hooks"):
        mlp(torch.randn(2, 4))
    mlp = _mlp((4, 5, 2))
    mlp[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(RuntimeError, match="returned a replacement input"):
        mlp(torch.randn(2, 4))
    mlp = _mlp((4, 5, 2))
    mlp[1].register_forward_pre_hook(lambda module, args, kwargs: (args, {"scale": 2}), with_kwargs=True)
    with pytest.raises(RuntimeError, match="layer '2' returned a replacement input"):
        mlp(torch.randn(2, 4))


def test_fsdp2_shards_a_whole_fused_mlp_and_its_layers_alone_are_refused_by_name(tmp_path):
    """fully_shard registers forward hooks on the module it shards: on a whole FusedMLP they gather
    its parameters around the fused op; on its layers they would never run (refused, naming FSDP)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        reference, x = _mlp((16, 32, 24, 5)), torch.randn(7, 16)
        sharded = copy.deepcopy(reference)
        fully_shard(sharded)
        sharded(x).square().sum().backward()
        reference(x).square().sum().backward()
        for name, parameter in reference.named_parameters():
            gathered = dict(sharded.named_parameters())[name].grad.full_tensor()
            torch.testing.assert_close(gathered, parameter.grad, msg=name)
        per_layer = copy.deepcopy(reference)
        for layer in per_layer:
            fully_shard(layer)
        fully_shard(per_layer)
        with pytest.raises(RuntimeError, match="layer '0' has forward or backward hooks.*fully_shard registers such "
                                               "hooks: shard the whole FusedMLP, not its layers"):
            per_layer(x)
    finally:
        dist.destroy_process_group()


def test_forward_pre_hooks_that_return_their_input_unchanged_are_accepted():
    # nn.Module accepts a pre-hook that hands back the input it got (the same tensors).
    mlp, x = _mlp((4, 5, 2)), torch.randn(2, 4)
    expected = mlp(x)
    mlp[0].register_forward_pre_hook(lambda module, args: args)
    mlp[0].register_forward_pre_hook(lambda module, args: args[0])
    mlp[1].register_forward_pre_hook(lambda module, args: args)  # a hidden layer's (empty) input
    mlp[1].register_forward_pre_hook(lambda module, args, kwargs: (args, kwargs), with_kwargs=True)
    torch.testing.assert_close(mlp(x), expected)


def test_process_wide_forward_hooks_see_the_fused_mlp_not_its_layers():
    mlp, seen = _mlp((4, 5, 2)), []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        mlp(torch.randn(2, 4))
    finally:
        handle.remove()
    assert seen == [FusedMLP]


def test_layers_with_a_forward_of_their_own_are_refused():
    """A FusedMLP never calls its layers' forward: a layer that brings its own would be computed as a
    plain layer (its extra parameters untrained), so it is refused, when added and when called."""

    class LowRank(FusedLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.delta = nn.Parameter(torch.zeros(self.out_features, self.in_features))

        def forward(self, x):
            return pyfastnn.fused_linear(x, self.weight + self.delta, self.bias, self.activation)

    with pytest.raises(TypeError, match="LowRank.* has a forward of its own"):
        FusedMLP.from_layers([LowRank(4, 5, activation="relu"), FusedLinear(5, 2)])
    mlp = _mlp((4, 5, 2))
    with pytest.raises(TypeError, match="has a forward of its own"):
        mlp[1] = LowRank(5, 2)
    plain_forward = mlp[0].forward
    mlp[0].forward = lambda x: plain_forward(x) * 0  # an instance's own forward
    with pytest.raises(TypeError, match="layer '0' .* has a forward of its own"):
        mlp(torch.randn(2, 4))
    # Subclasses that keep FusedLinear's forward stay layers: parametrize makes one.
    mlp = _mlp((4, 5, 2))
    nn.utils.parametrizations.weight_norm(mlp[0])
    assert type(mlp[0]) is not FusedLinear and mlp(torch.randn(2, 4)).shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# Smaller checks


def test_fused_linear_sizes_are_checked_as_named_arguments():
    # nn.Linear leaves these to torch.empty ("argument 'size' failed to unpack", "negative dimension").
    for args, error, message in ((("3", 4), TypeError, "in_features must be an integer, got '3' (str)"),
                                 ((4, 2.0), TypeError, "out_features must be an integer, got 2.0 (float)"),
                                 ((True, 4), TypeError, "in_features must be an integer, got True"),
                                 ((4, -1), ValueError, "out_features must be >= 0, got -1"),
                                 ((10 ** 20, 2), ValueError, "in_features must be < 2**63, got an integer of 21 digits")):
        with pytest.raises(error, match=re.escape(message)):
            FusedLinear(*args)
    layer = FusedLinear(torch.tensor(3), torch.tensor(2))  # integer types torch takes as sizes
    assert (layer.in_features, layer.out_features) == (3, 2) and type(layer.in_features) is int


def test_fused_mlp_argument_checks():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        pyfastnn.fused_mlp(x, [w], activation="swish")
    with pytest.raises(ValueError, match="dropout probability"):
        pyfastnn.fused_mlp(x, [w], dropout=2.0)
    with pytest.raises(TypeError, match=re.escape("sizes[1] must be an integer, got 3.7 (float)")):
        FusedMLP([8, 3.7, 2])
    with pytest.raises(ValueError, match=re.escape("sizes[2] must be >= 0, got -2")):
        FusedMLP([8, 3, -2])
    with pytest.raises(TypeError, match="sizes must be a sequence of integers, got str"):
        FusedMLP("82")
    with pytest.raises(ValueError, match=re.escape("sizes[1] must be < 2**63, got an integer of 21 digits")):
        FusedMLP([8, 10 ** 20, 2])  # torch's own message would carry a C++ backtrace
    for settings in ({"activation": ["relu", "tanh"]}, {"dropout": (0.1, 0.2)}):  # fused_mlp takes lists
        with pytest.raises(TypeError, match=r"FusedMLP takes one \w+ for every hidden layer.*FusedMLP.from_layers"):
            FusedMLP([4, 5, 5, 3], **settings)
    assert FusedMLP(torch.Size([3, 4, 2]))[1].out_features == 2
    params = nn.ParameterList([nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(2, 5))])
    biases = nn.ParameterList([nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))])
    out = pyfastnn.fused_mlp(x, params, biases, "relu")
    torch.testing.assert_close(out, F.linear(F.relu(F.linear(x, params[0], biases[0])), params[1], biases[1]))
    out.sum().backward()
    assert params[0].grad is not None and biases[1].grad is not None


def test_from_linear_refuses_an_uninitialized_lazy_linear():
    with pytest.raises(ValueError, match="uninitialized nn.LazyLinear"):
        FusedLinear.from_linear(nn.LazyLinear(6))
    lazy = nn.LazyLinear(6)
    lazy(torch.randn(2, 3))
    assert FusedLinear.from_linear(lazy).in_features == 3


class _AdapterLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _linear_with_weight_norm():
    return nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))


def _linear_with_prune():
    return torch.nn.utils.prune.random_unstructured(nn.Linear(4, 3), "weight", amount=0.5)


def _linear_with_forward_hook():
    linear = nn.Linear(4, 3)
    linear.register_forward_hook(lambda module, args, out: out * 2)
    return linear


@pytest.mark.parametrize("make", [lambda: _AdapterLinear(4, 3), _linear_with_weight_norm, _linear_with_prune,
                                  _linear_with_forward_hook],
                         ids=["subclass", "weight_norm", "prune", "forward_hook"])
@pytest.mark.parametrize("copy_parameters", [False, True])
def test_from_linear_refuses_what_the_fused_layer_would_drop(make, copy_parameters):
    """As from_sequential and fuse() leave them: converting would silently lose what they add."""
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        FusedLinear.from_linear(make(), copy=copy_parameters)


def test_pre_hooks_of_hidden_fused_mlp_layers_never_see_the_network_input():
    """Only the first layer's input is a tensor of its own; the others' hooks get none (a hook that
    reads it fails loudly instead of recording the network's input as the layer's)."""
    mlp = _mlp((4, 5, 2))
    seen = []
    for layer in mlp:
        layer.register_forward_pre_hook(lambda module, args: seen.append(tuple(a.shape for a in args)))
    mlp(torch.randn(3, 4))
    assert seen == [((3, 4),), ()]


@pytest.mark.parametrize("name", ["dropout", "activation", "output_activation", "negative_slope", "weight", "bias"])
def test_layer_settings_assigned_on_the_fused_mlp_raise(name):
    mlp = _mlp((4, 5, 2))
    with pytest.raises(AttributeError, match=f"reads '{name}' from its layers"):
        setattr(mlp, name, 0.0)
    with pytest.raises(AttributeError, match=f"reads '{name}' from its layers"):
        setattr(mlp, name, nn.Dropout(0.5))  # a module would be taken for a layer
    if name == "negative_slope":
        return  # a read-only property of the FusedMLP itself
    with pytest.raises(AttributeError, match=f"reads '{name}' from its layers"):
        setattr(mlp, name, nn.Parameter(torch.zeros(2)))  # its forward would never read it

    class Scaled(pyfastnn.FusedMLP):  # a subclass whose own forward may read a parameter of that name
        def forward(self, x):
            return super().forward(x)

    scaled = Scaled.from_sequential(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    setattr(scaled, name, nn.Parameter(torch.zeros(2)))
    # Registered explicitly, a parameter or a buffer of that name may be reassigned.
    other = _mlp((4, 5, 2))
    other.register_buffer(name, torch.zeros(2))
    setattr(other, name, torch.ones(2))
    torch.testing.assert_close(getattr(other, name), torch.ones(2))
    third = _mlp((4, 5, 2))
    third.register_parameter(name, nn.Parameter(torch.zeros(2)))
    setattr(third, name, nn.Parameter(torch.ones(2)))
    assert scaled(torch.randn(3, 4)).shape == other(torch.randn(3, 4)).shape == third(torch.randn(3, 4)).shape == (3, 2)


def test_nan_and_inf_differences_from_pytorch_are_as_documented():
    """The README's list of the few special values where the kernels differ from PyTorch."""
    x = torch.tensor([[float("nan"), 3e38, float("inf"), -float("inf"), 1.0]]).t()
    w = torch.ones(1, 1)
    for activation in pyfastnn.ACTIVATIONS:
        out = pyfastnn.fused_linear(x, w, None, activation)
        expected = reference(x, w, None, activation)
        if activation == "gelu":  # x * Phi(x) = x at huge inputs
            assert out[1].item() == torch.tensor(3e38).item() and out[2].item() == float("inf")
            # PyTorch's answer there depends on the CPU kernel it runs: its AVX-512 one overflows to inf
            # at 3e38 and gives NaN at +inf; its AVX2 and scalar ones agree with ours.
            theirs = (expected[1].item(), expected[2].item())
            assert theirs == (out[1].item(), out[2].item()) or (theirs[0] == float("inf") and expected[2].isnan())
            out, expected = out[[0, 3, 4]], expected[[0, 3, 4]]
        torch.testing.assert_close(out, expected, equal_nan=True)
    # relu's gradient at a NaN pre-activation: 0 here; PyTorch's threshold_backward passes the gradient.
    xr = torch.tensor([[float("nan")], [2.0]], requires_grad=True)
    pyfastnn.fused_linear(xr, w, None, "relu").sum().backward()
    assert xr.grad.tolist() == [[0.0], [1.0]]
    xt = xr.detach().clone().requires_grad_()
    torch.relu(xt).sum().backward()
    assert xt.grad.tolist() == [[1.0], [1.0]]
    # ... except under create_graph=True, whose backward differentiates the ATen reference.
    (second_order,) = torch.autograd.grad(pyfastnn.fused_linear(xr, w, None, "relu").sum(), xr, create_graph=True)
    assert second_order.tolist() == [[1.0], [1.0]]
    # relu followed by fused dropout: a dropped element passes no gradient, also an inf one (its zero
    # output stands for the mask); PyTorch's dropout backward makes inf * 0 = NaN there.
    torch.manual_seed(0)
    layer = FusedLinear(1, 16, activation="relu", dropout=0.5).train()
    nn.init.ones_(layer.weight)
    nn.init.zeros_(layer.bias)
    ones = torch.ones(8, 1)
    y = layer(ones)  # every unit is active: the zeros are exactly the dropped elements
    keep = (y != 0).float()
    inf = torch.full_like(y, float("inf"))
    (ours,) = torch.autograd.grad(y, layer.bias, inf)
    bias = layer.bias.detach().clone().requires_grad_()
    (theirs,) = torch.autograd.grad(torch.relu(F.linear(ones, layer.weight.detach(), bias)) * keep / 0.5, bias, inf)
    dropped_in_column = (keep == 0).any(0)
    assert dropped_in_column.any() and theirs[dropped_in_column].isnan().all()
    assert not ours.isnan().any()


def test_full_model_save_and_load_after_fuse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fused = pyfastnn.fuse(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x))
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_torchscript_support_is_as_documented():
    """TorchScript is deprecated upstream; the README states what works: jit.trace of FusedLinear."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    layer = FusedLinear(4, 5, activation="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, (x,))
        torch.testing.assert_close(traced(x), layer(x))
        with pytest.raises(RuntimeError, match="unsupported input list type"):
            torch.jit.trace(_mlp((4, 6, 2)), (x,))
        for model in (layer, layer, _mlp((4, 6, 2)), nn.Sequential(nn.Flatten(), layer)):  # every attempt alike
            with pytest.raises(torch.jit.frontend.NotSupportedError, match="cannot be compiled by torch.jit.script"):
                torch.jit.script(model)
        # The TorchScript-based ONNX exporter traces the same way and knows no pyfastnn op.
        with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="namespace pyfastnn::fused_linear"):
            torch.onnx.export(layer.eval(), (x,), io.BytesIO(), dynamo=False)
        with pytest.raises(RuntimeError, match="unsupported input list type"):
            torch.onnx.export(_mlp((4, 6, 2)).eval(), (x,), io.BytesIO(), dynamo=False)


@pytest.mark.parametrize("input_grad", [False, True])
def test_flop_counter_counts_the_gemms_like_eager(input_grad):
    """FlopCounterMode counts each fused op's GEMMs as it counts eager's aten.mm / addmm."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(run):
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    torch.manual_seed(0)
    x = torch.randn(8, 2, 5, requires_grad=input_grad)
    w1, w2 = torch.randn(6, 5, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    b1 = torch.randn(6, requires_grad=True)
    cases = [
        (lambda: pyfastnn.fused_linear(x, w1, b1, "relu"), lambda: F.relu(F.linear(x, w1, b1))),
        (lambda: pyfastnn.fused_mlp(x, [w1, w2], [b1, None]), lambda: F.linear(F.relu(F.linear(x, w1, b1)), w2)),
    ]
    for fused, eager in cases:
        assert flops(lambda: fused().sum().backward()) == flops(lambda: eager().sum().backward()) > 0
        with torch.no_grad():
            assert flops(fused) == flops(eager) > 0


def test_fuse_absorbs_no_module_with_a_forward_or_state_of_its_own():
    # A forward set on the instance computes something else; a buffer or attribute would be lost.
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    overridden = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    overridden[1].forward = torch.sigmoid
    quiet_dropout = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2)).eval()
    quiet_dropout[2].forward = torch.neg
    with_state = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    with_state[1].register_buffer("calls", torch.zeros(()))
    whole = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    whole.forward = lambda t: -t  # the Sequential's own forward, set on it
    traced = ReluDropoutNet().eval()
    traced.act.forward = torch.tanh
    for model in (overridden, quiet_dropout, with_state, whole, traced):
        keys = list(model.state_dict())
        fused = pyfastnn.fuse(model)
        torch.testing.assert_close(fused(x), model(x))
        assert list(fused.state_dict()) == keys
    with pytest.raises(ValueError, match=r"stopped at module 1: ReLU\(\) \(it has hooks, or a forward"):
        FusedMLP.from_sequential(overridden)
    # A Sequential that is one run, with an attribute of its own: fused in place, not replaced.
    tagged = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    tagged.tag = "encoder"
    fused = pyfastnn.fuse(tagged)
    assert type(fused) is nn.Sequential and fused.tag == "encoder" and isinstance(fused[0], FusedMLP)


def test_fuse_leaves_a_sequential_that_iterates_its_own_way_alone():
    class WithoutRelus(nn.Sequential):
        def __iter__(self):  # Sequential's forward runs what this yields
            return (m for m in self._modules.values() if not isinstance(m, nn.ReLU))

    torch.manual_seed(0)
    model = WithoutRelus(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()).eval()
    x = torch.randn(3, 8)
    fused = pyfastnn.fuse(model)
    torch.testing.assert_close(fused(x), model(x))
    assert list(fused.state_dict()) == list(model.state_dict())


def test_modules_torch_compile_or_jit_script_saw_still_fuse():
    # Both leave markers on the modules they saw (even a compiled model never run): not the user's state.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model)
    runs = []
    fused = pyfastnn.fuse(compiled._orig_mod, report=runs)
    assert isinstance(fused, FusedMLP) and [run.path for run in runs] == [""]
    relu = nn.ReLU()
    torch.compile(relu)
    assert isinstance(pyfastnn.fuse(nn.Sequential(nn.Linear(8, 8), relu, nn.Linear(8, 2))), FusedMLP)


def test_fuse_leaves_a_leaky_relu_it_cannot_take_unfused_instead_of_raising():
    model = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(1e39), nn.Linear(8, 2)).double()  # beyond float32
    x = torch.randn(3, 8, dtype=torch.float64)
    fused = pyfastnn.fuse(model)
    assert type(fused[1]) is nn.LeakyReLU
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_takes_only_true_or_false_for_its_flags_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="fuse: inplace must be True or False, got 'False'"):
        pyfastnn.fuse(model, "False")
    with pytest.raises(TypeError, match="fuse: verbose must be True or False"):
        pyfastnn.fuse(model, verbose=1)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_module_found_at_two_places_is_fused_once_and_stays_one_module():
    class Twice(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.a = self.b = block

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model, x = Twice(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), torch.randn(3, 8)
    fused = pyfastnn.fuse(model)
    assert isinstance(fused.a, FusedMLP) and fused.a is fused.b
    torch.testing.assert_close(fused(x), model(x))
    assert list(fused.state_dict(keep_vars=True)) == list(model.state_dict(keep_vars=True))


def test_a_childs_output_read_in_forward_does_not_keep_looped_blocks_unfused():
    class Embedded(Stages):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)

        def forward(self, x):
            h = self.embed(x)  # a child's output: reading h.mean reaches no module
            for block in self.blocks:
                h = block(h)
            return h.mean(0)

    torch.manual_seed(0)
    model, runs, x = Embedded(), [], torch.randn(3, 4)
    fused = pyfastnn.fuse(model, report=runs)
    assert len(runs) == 6, runs
    torch.testing.assert_close(fused(x), model(x))
