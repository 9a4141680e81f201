"""pyfastnn.fused_linear against act(F.linear(...)): values, gradients, opcheck, compile, autocast."""

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

import pyfastnn
from pyfastnn.testing import assert_close, reference
from samples import sample_inputs

ALL = list(sample_inputs())
SMALL_F64 = list(sample_inputs(dtypes=(torch.float64,), small_only=True))


@pytest.mark.parametrize("sample", ALL, ids=repr)
def test_forward_matches_reference(sample):
    with torch.no_grad():
        out = pyfastnn.fused_linear(*sample.tensors()[:2], sample.bias, **sample.kwargs())
        expected = reference(sample.input, sample.weight, sample.bias, **sample.kwargs())
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, sample.dtype)


@pytest.mark.parametrize("sample", ALL, ids=repr)
def test_gradients_match_reference(sample):
    out = pyfastnn.fused_linear(sample.input, sample.weight, sample.bias, **sample.kwargs())
    expected = reference(sample.input, sample.weight, sample.bias, **sample.kwargs())
    assert_close(out, expected, sample.dtype)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, sample.tensors(), grad_out)
    expected_grads = torch.autograd.grad(expected, sample.tensors(), grad_out)
    for name, g, e in zip(("input", "weight", "bias"), grads, expected_grads):
        assert g.shape == e.shape, name
        assert_close(g, e, sample.dtype)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_input_gradient_of_a_wide_layer_is_as_accurate_as_torch_mm(rows):
    """1-4 rows take pyfastnn's own GEMM kernels: their input gradient sums 65,536 products per element
    in blocks, as BLAS does (NOTE [Blocked sums over the output features]); one running sum was ~25x
    further from float64 than torch.mm."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=generator, requires_grad=True)
    w = (torch.randn(65536, 64, generator=generator) * 0.02).requires_grad_()
    grad_out = torch.rand(rows, 65536, generator=generator)
    pyfastnn.fused_linear(x, w, None, None).backward(grad_out)
    exact = grad_out.double() @ w.double()
    error = lambda t: (t.double() - exact).abs().max().item()  # noqa: E731
    assert error(x.grad) <= 3 * max(error(grad_out @ w.detach()), 1e-7 * exact.abs().max().item())


def test_bias_gradient_of_a_tall_layer_is_as_accurate_as_torch_sum():
    """The bias gradient sums a million rows per feature: in blocks of at most 256 rows whose sums
    are added pairwise, as accurate as torch.sum (0.9x its distance from float64 here); 64 blocks
    of 15,625 rows each were 5x further."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, 4, generator=generator)
    w = torch.randn(8, 4, generator=generator)
    b = torch.zeros(8, requires_grad=True)
    grad_out = torch.rand(1_000_000, 8, generator=generator) + 1
    pyfastnn.fused_linear(x, w, b, "identity").backward(grad_out)
    exact = grad_out.double().sum(0)
    error = lambda t: (t.double() - exact).abs().max().item()  # noqa: E731
    assert error(b.grad) <= 2 * max(error(grad_out.sum(0)), 1e-7 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_gradient_holds_no_more_memory_than_its_own(dtype):
    """4,096 rows are summed in 16 blocks of partial sums: the gradient is their total, not a view that
    would keep the whole (16, 64) buffer alive as long as the parameter's .grad."""
    x = torch.randn(4096, 8, dtype=dtype)
    w = torch.randn(64, 8, dtype=dtype)
    b = torch.zeros(64, dtype=dtype, requires_grad=True)
    pyfastnn.fused_linear(x, w, b, "relu").sum().backward()
    assert_close(b.grad, (x @ w.T > 0).to(dtype).sum(0), dtype)
    assert b.grad.untyped_storage().nbytes() == b.grad.numel() * b.grad.element_size()


@pytest.mark.parametrize("sample", SMALL_F64, ids=repr)
def test_gradcheck(sample):
    fn = lambda *t: pyfastnn.fused_linear(*t[:2], t[2] if len(t) > 2 else None, **sample.kwargs())  # noqa: E731
    assert torch.autograd.gradcheck(fn, sample.tensors())


@pytest.mark.parametrize("sample", [s for s in SMALL_F64 if s.name.startswith(("odd-", "nd-"))], ids=repr)
def test_double_backward(sample):
    fn = lambda *t: pyfastnn.fused_linear(*t[:2], t[2] if len(t) > 2 else None, **sample.kwargs())  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, sample.tensors())


@pytest.mark.parametrize("sample", ALL, ids=repr)
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.pyfastnn.fused_linear.default, sample.op_args())


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_needed_gradients(requires):
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    for t, r in zip((x, w, b), requires):
        t.requires_grad_(r)
    out = pyfastnn.fused_linear(x, w, b, "silu")
    out.sum().backward()  # grad_output is an expanded (stride-0) tensor here
    ref_inputs = [t.detach().clone().requires_grad_(r) for t, r in zip((x, w, b), requires)]
    reference(*ref_inputs, activation="silu").sum().backward()
    for t, r in zip((x, w, b), ref_inputs):
        if t.requires_grad:
            assert_close(t.grad, r.grad, torch.float32)
        else:
            assert t.grad is None


def test_inputs_are_not_modified():
    x, w, b = torch.randn(8, 5), torch.randn(4, 5), torch.randn(4)
    copies = [t.clone() for t in (x, w, b)]
    pyfastnn.fused_linear(x, w, b, "gelu")
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t, c)


def test_inference_mode():
    x, w, b = torch.randn(8, 5), torch.randn(4, 5), torch.randn(4)
    with torch.inference_mode():
        out = pyfastnn.fused_linear(x, w, b, "tanh")
    assert_close(out, reference(x, w, b, "tanh"), torch.float32)


def test_none_and_none_string_mean_identity():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    for name in (None, "none", "identity"):
        assert_close(pyfastnn.fused_linear(x, w, None, name), F.linear(x, w), torch.float32)


def test_activations_table():
    assert pyfastnn.ACTIVATIONS == (
        "identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")


def test_nan_and_inf_propagate_like_pytorch():
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), -float("inf")], [-1.0, 2.0]])
    w = torch.eye(2)
    for act in pyfastnn.ACTIVATIONS:
        out = pyfastnn.fused_linear(x, w, None, act)
        torch.testing.assert_close(out, reference(x, w, None, act), equal_nan=True)


@pytest.mark.parametrize("activation", pyfastnn.ACTIVATIONS)
def test_nan_and_inf_gradients_like_pytorch(activation):
    """Pre-activations from the bias alone (zero input and weight keep the GEMM finite), then an
    upstream gradient with inf and NaN: the bias gradient of a one-row batch is the pre-activation's
    gradient itself. relu passes nothing where its output is <= 0, even an inf, as torch's
    threshold_backward does; at a NaN pre-activation it passes nothing either (the README's one
    documented difference, test_nan_and_inf_differences_from_pytorch_are_as_documented)."""
    pre = torch.tensor([float("nan"), -1.0, 2.0, 0.0, -float("inf"), float("inf"), -3.0, 0.5])
    grad_out = torch.tensor([[float("inf"), float("inf"), 1.0, float("inf"), float("nan"), 2.0, -float("inf"), 1.0]])
    x, w = torch.zeros(1, 3), torch.zeros(8, 3)
    grads = []
    for fn in (pyfastnn.fused_linear, reference):
        b = pre.clone().requires_grad_()
        fn(x, w, b, activation).backward(grad_out)
        grads.append(b.grad)
    if activation == "relu":
        assert grads[0][0] == 0 and grads[1][0] == float("inf")
        grads = [g[1:] for g in grads]
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_matches_linear(dtype):
    x, layer = torch.randn(16, 32, dtype=dtype), torch.nn.Linear(32, 8).to(dtype)
    fused = pyfastnn.FusedLinear.from_linear(layer, activation="gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        expected = F.gelu(layer(x))
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == layer.weight.dtype


def _mlp(backend):
    layers = [pyfastnn.FusedLinear(20, 32, activation="gelu"), pyfastnn.FusedLinear(32, 16, activation="relu"),
              pyfastnn.FusedLinear(16, 4, activation=None)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
# Compile for real: a graph cached by an earlier build would not exercise today's fake kernels.
@torch._inductor.config.patch(fx_graph_cache=False)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _mlp(backend)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(8, 20)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    torch.testing.assert_close(out, eager_out)
    out.square().sum().backward()
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_compile_with_a_dynamic_batch_trains_like_eager():
    """Symbolic batch sizes reach every fake kernel, backward ones included (their argument checks
    compare symbolic shapes)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(pyfastnn.FusedMLP([20, 32, 16], activation="gelu", dropout=0.3),
                                pyfastnn.FusedLinear(16, 4, activation="sigmoid"))
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (3, 7, 12):
        x = torch.randn(batch, 2, 20)
        model.zero_grad()
        torch.manual_seed(batch)  # the same masks: compiled, the op draws as it does eagerly
        model(x).square().sum().backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch.manual_seed(batch)
        compiled(x).square().sum().backward()
        for p, g in zip(model.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g)


def test_compiled_dropout_gradients_belong_to_the_output_at_default_recomputation():
    # README: with dropout in training, the compiler's partitioner must not recompute the fused
    # forward in backward (it would draw new masks). At its defaults it does not; with an activation
    # memory budget below 1 it does. If the second half starts to fail, torch treats custom random
    # ops as random: drop the README's caveat.
    import torch._functorch.config as functorch_config

    def gradient_follows_the_outputs_mask(budget: float) -> bool:
        torch._dynamo.reset()
        torch.manual_seed(0)
        mlp = pyfastnn.FusedMLP([8, 8, 8], activation="identity", dropout=0.5).train()
        with torch.no_grad():  # the output is the dropped-out hidden layer itself
            mlp[1].weight.copy_(torch.eye(8))
            mlp[1].bias.zero_()
        with functorch_config.patch(activation_memory_budget=budget):
            out = torch.compile(mlp, fullgraph=True, backend="aot_eager_decomp_partition")(torch.randn(64, 8))
            (bias_grad,) = torch.autograd.grad(out, [mlp[0].bias], torch.ones_like(out))
        return torch.allclose(bias_grad, ((out != 0).float() * 2.0).sum(0))  # kept / (1 - p), summed

    assert gradient_follows_the_outputs_mask(1.0)
    assert not gradient_follows_the_outputs_mask(0.0)


def _keeps_preactivation(activation: str, negative_slope: float) -> bool:
    """Whether fused_linear's autograd keeps the pre-activation for backward (else the output it
    returns is all it keeps), seen through the tensors the public op saves."""
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pyfastnn.fused_linear(x, w, torch.randn(5), activation=activation, negative_slope=negative_slope)
    output_shaped = [t for t in saved if t.shape == out.shape]
    assert len(output_shaped) <= 1, [t.shape for t in saved]
    return any(t.data_ptr() != out.data_ptr() for t in output_shaped)


@pytest.mark.parametrize("activation, negative_slope, keeps", [
    ("relu", 0.01, False), ("sigmoid", 0.01, False), ("tanh", 0.01, False), ("identity", 0.01, False),
    # As torch's: leaky_relu keeps its pre-activation (the output may then be changed in place).
    ("leaky_relu", 0.01, True), ("leaky_relu", -0.5, True),
    ("gelu", 0.01, True), ("gelu_tanh", 0.01, True), ("silu", 0.01, True),
])
def test_backward_keeps_what_torchs_activations_keep(activation, negative_slope, keeps):
    assert _keeps_preactivation(activation, negative_slope) is keeps


@pytest.mark.parametrize("sample", list(sample_inputs(small_only=True, requires_grad=False)), ids=repr)
def test_opcheck_training_ops(sample):
    """The forward/backward ops the autograd kernel calls, checked on their own, with what it passes them."""
    x, w, b, code, slope = sample.op_args()
    keep_preact = _keeps_preactivation(sample.activation, slope)
    torch.library.opcheck(torch.ops.pyfastnn.fused_linear_forward.default, (x, w, b, code, slope, keep_preact))
    out, preact = torch.ops.pyfastnn.fused_linear_forward(x, w, b, code, slope, keep_preact)
    saved = preact if keep_preact else out
    masks = [[True, True, b is not None]]
    if sample.dtype == torch.float32:  # some gradients only (frozen parameters): the others come back as None
        masks += [[False, True, False], [True, False, b is not None]]
    for mask in masks:
        torch.library.opcheck(torch.ops.pyfastnn.fused_linear_backward.default,
                              (torch.randn_like(out), x, w, saved, code, slope, mask))
