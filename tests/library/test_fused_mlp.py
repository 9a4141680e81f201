"""pyfastnn.fused_mlp and FusedMLP against the layers run one by one in PyTorch: values, gradients,
gradcheck, opcheck, compile, autocast, fused dropout (masks, statistics, reproducibility)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastnn
from pyfastnn.benchmark import saved_for_backward_bytes
from pyfastnn.testing import assert_close, reference_mlp
from samples import assert_dropout_statistics, mlp_sample_inputs

ops = torch.ops.pyfastnn
NO_DROPOUT = list(mlp_sample_inputs(with_dropout=False))
WITH_DROPOUT = [s for s in mlp_sample_inputs() if any(s.dropout)]
SMALL_F64 = list(mlp_sample_inputs(dtypes=(torch.float64,), small_only=True))


def run(sample, training, tensors=None):
    return ops.fused_mlp(*sample.op_args(training, tensors))


def masks_of(sample, seed):
    """The keep masks fused_mlp draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return ops.fused_mlp_forward(*sample.op_args(True))[3]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("sample", NO_DROPOUT, ids=repr)
def test_values_and_gradients_match_layer_by_layer(sample, training):
    out = run(sample, training)
    expected = reference_mlp(sample.input, sample.weights, sample.biases, sample.activations, sample.negative_slope)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, sample.dtype)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, sample.tensors(), grad_out)
    expected_grads = torch.autograd.grad(expected, sample.tensors(), grad_out)
    for g, e in zip(grads, expected_grads):
        assert g.shape == e.shape and g.stride() == e.stride()
        assert_close(g, e, sample.dtype)


@pytest.mark.parametrize("sample", WITH_DROPOUT, ids=repr)
def test_dropout_matches_reference_with_the_same_masks(sample):
    masks = masks_of(sample, seed=7)
    torch.manual_seed(7)
    out = run(sample, training=True)
    expected = reference_mlp(sample.input, sample.weights, sample.biases, sample.activations,
                             sample.negative_slope, masks, sample.dropout)
    assert_close(out, expected, sample.dtype)
    grad_out = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(out, sample.tensors(), grad_out),
                    torch.autograd.grad(expected, sample.tensors(), grad_out)):
        assert_close(g, e, sample.dtype)


def test_relu_dropout_gradients_at_inf_and_nan_pre_activations():
    """A dropped inf output is saved as NaN (inf * 0, as nn.Dropout computes it) and must pass no
    gradient, while a kept inf passes it scaled, as in PyTorch; a NaN pre-activation passes none
    (the README's documented difference from threshold_backward)."""
    x = torch.zeros(64, 3)
    w1, b1 = torch.zeros(4, 3), torch.tensor([float("inf"), float("nan"), 1.0, -1.0], requires_grad=True)
    w2, b2 = torch.ones(2, 4), torch.zeros(2)
    codes = [pyfastnn.ACTIVATIONS.index("relu"), pyfastnn.ACTIVATIONS.index("identity")]
    args = (x, [w1, w2], [b1, b2], codes, 0.01, [0.5, 0.0], True)
    torch.manual_seed(3)
    with torch.no_grad():
        masks = ops.fused_mlp_forward(*args)[3]
    grad_out = torch.randn(64, 2)
    torch.manual_seed(3)
    (grad_b1,) = torch.autograd.grad(ops.fused_mlp(*args), [b1], grad_out)
    expected = reference_mlp(x, [w1, w2], [b1, b2], ["relu", "identity"], 0.01, masks, [0.5, 0.0])
    (expected_b1,) = torch.autograd.grad(expected, [b1], grad_out)
    assert 0 < masks[0][:, 0].sum() < 64  # some rows dropped the inf unit, some kept it
    torch.testing.assert_close(grad_b1[[0, 2, 3]], expected_b1[[0, 2, 3]])
    assert grad_b1[1] == 0 and expected_b1[1].isfinite()


@pytest.mark.parametrize("sample", SMALL_F64, ids=repr)
def test_gradcheck_and_gradgradcheck(sample):
    def fn(*tensors):
        torch.manual_seed(3)  # the same dropout masks on every evaluation
        return run(sample, training=True, tensors=tensors)

    assert torch.autograd.gradcheck(fn, sample.tensors())
    assert torch.autograd.gradgradcheck(fn, sample.tensors())


@pytest.mark.parametrize("sample", NO_DROPOUT + WITH_DROPOUT[:3], ids=repr)
def test_opcheck(sample):
    if any(sample.dropout):
        # Random masks differ between the runs opcheck compares; everything else is checked.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(ops.fused_mlp.default, sample.op_args(True), test_utils=utils)
        torch.library.opcheck(ops.fused_mlp.default, sample.op_args(False))
    else:
        torch.library.opcheck(ops.fused_mlp.default, sample.op_args(True))


def test_opcheck_forward_and_backward_ops():
    sample = next(s for s in mlp_sample_inputs(requires_grad=False) if s.name == "mixed_acts-float32-dropout")
    args = sample.op_args(False)
    torch.library.opcheck(ops.fused_mlp_forward.default, args)
    with torch.no_grad():
        out, hidden, preacts, masks = ops.fused_mlp_forward(*args)
    layers = len(sample.weights)
    for training in (False, True):
        torch.manual_seed(0)
        out, hidden, preacts, masks = ops.fused_mlp_forward(*sample.op_args(training))
        # Every gradient, then only some (frozen layers): the empty placeholders must not alias.
        for output_mask in ([True] * (1 + 2 * layers), [False, True] + [False] * (2 * layers - 1),
                            [False] * (1 + layers) + [True] * layers):
            backward_args = (torch.randn_like(out), sample.input, sample.weights, out, hidden, preacts, masks,
                             args[3], args[4], args[5], output_mask)
            torch.library.opcheck(ops.fused_mlp_backward.default, backward_args)


def test_only_needed_layers_are_visited():
    sample = next(s for s in NO_DROPOUT if s.name == "mixed_acts-float32")
    x, weights, biases = sample.rebuild([t.detach() for t in sample.tensors()])
    weights[2].requires_grad_()  # only the last layer's weight: nothing below it is differentiated
    out = pyfastnn.fused_mlp(x, weights, biases, ["gelu", "sigmoid"], "tanh")
    (grad,) = torch.autograd.grad(out.sum(), [weights[2]])
    weights[2].requires_grad_(False)
    w = weights[2].clone().requires_grad_()
    expected = reference_mlp(x, weights[:2] + [w], biases, ["gelu", "sigmoid", "tanh"])
    (expected_grad,) = torch.autograd.grad(expected.sum(), [w])
    assert_close(grad, expected_grad, torch.float32)


def test_lazily_negated_tensors_are_read_negated():
    # Views with the negative bit (conj().imag of a complex tensor) are resolved for Tensor arguments
    # by torch, but not inside fused_mlp's list of optional biases: the kernels must resolve them.
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(4, 16), torch.randn(8, 16), torch.randn(1, 8)
    for bias in (torch.tensor([2.0 + 3.0j]).conj().imag, torch._neg_view(torch.randn(1))):
        assert bias.is_neg() and bias.is_contiguous()
        b1 = torch._neg_view(torch.randn(8))
        expected = reference_mlp(x, [w1, w2], [b1.resolve_neg(), bias.resolve_neg()], ["tanh", "identity"])
        torch.testing.assert_close(pyfastnn.fused_mlp(x, [w1, w2], [b1, bias], "tanh"), expected)
        w = w2 @ w1
        torch.testing.assert_close(pyfastnn.fused_linear(x, w, bias, None), F.linear(x, w, bias.resolve_neg()))
        negated = [torch._neg_view(t.neg()) for t in (x, w1, w2)]  # the same values, as negative views
        torch.testing.assert_close(pyfastnn.fused_mlp(negated[0], negated[1:], [b1, bias], "tanh"), expected)


def test_dropout_statistics_match_nn_dropout():
    torch.manual_seed(0)
    assert_dropout_statistics("cpu", 1000, 1000)


def test_dropout_is_reproducible_and_fresh_per_call():
    sample = next(s for s in WITH_DROPOUT if s.name == "lesson-float32-dropout")
    first = masks_of(sample, seed=11)
    again = masks_of(sample, seed=11)
    other = masks_of(sample, seed=12)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        if a.numel():
            assert not torch.equal(a, c)
    torch.manual_seed(11)
    with torch.no_grad():
        ops.fused_mlp_forward(*sample.op_args(True))
        next_call = ops.fused_mlp_forward(*sample.op_args(True))[3]
    assert not torch.equal(first[0], next_call[0])


def test_dropout_does_not_depend_on_thread_count(torch_threads):
    sample = next(s for s in WITH_DROPOUT if s.name == "lesson-float32-dropout")
    results, masks = [], []
    for n in (1, 4):
        torch_threads(n)
        masks.append(masks_of(sample, seed=5))
        torch.manual_seed(5)
        out = run(sample, training=True)
        results.append((out, torch.autograd.grad(out.sum(), sample.tensors())))
    assert all(torch.equal(a, b) for a, b in zip(*masks))  # the very same units dropped
    # Values equal up to rounding: ATen's GEMM may sum in another order with another thread count.
    (out1, grads1), (out4, grads4) = results
    torch.testing.assert_close(out1, out4)
    for a, b in zip(grads1, grads4):
        torch.testing.assert_close(a, b)


def test_eval_mode_has_no_dropout_and_train_mode_does():
    torch.manual_seed(0)
    mlp = pyfastnn.FusedMLP([20, 30, 5], dropout=0.5)
    x = torch.randn(8, 20)
    plain = mlp.to_sequential()
    mlp.eval(), plain.eval()
    torch.testing.assert_close(mlp(x), plain(x))
    mlp.train()
    assert not torch.allclose(mlp(x), mlp(x))


def test_dropout_never_reaches_the_output_layer():
    # The output is the last Linear's: hidden units are dropped, never the outputs themselves.
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(64, 8), torch.randn(16, 8), torch.zeros(4, 16)
    y = pyfastnn.fused_mlp(x, [w1, w2], [torch.zeros(16), torch.full((4,), 10.0)], activation="relu", dropout=0.5,
                           training=True)
    assert torch.equal(y, torch.full((64, 4), 10.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_saturated_outputs_after_dropout_never_turn_the_gradient_sign(activation, dtype):
    """Backward takes sigmoid's and tanh's derivative from the output saved after dropout, scaled
    back by (1 - p); rounded in half precision, a saturated output could land past 1 and give a
    derivative of the wrong sign. Every kept unit's gradient has the float64 gradient's sign (or is 0)."""
    x = torch.zeros(256, 1, dtype=dtype)
    w = torch.zeros(8, 1, dtype=dtype)
    b = torch.linspace(3, 12, 8).to(dtype).requires_grad_()
    head = torch.ones(1, 8, dtype=dtype)
    torch.manual_seed(0)
    out = pyfastnn.fused_mlp(x, [w, head], [b, None], activation, dropout=0.3, training=True)
    (grad_b,) = torch.autograd.grad(out.sum(), [b])
    expected = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
    b64 = b.detach().double().requires_grad_()
    (grad_b64,) = torch.autograd.grad(expected(b64).sum(), [b64])
    assert (grad_b.double() * grad_b64 >= 0).all(), (grad_b, grad_b64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_reduced_precision_dropout_gradients_against_eager(activation, dtype):
    """The README's bound: from the kept output y / (1 - p), rounded in the dtype, the bias gradient
    is within the dtype's tolerance of eager's (Linear, activation, Dropout with the same mask) at
    p = 0.5, and at p = 0.97 no further than 8x eager's distance from float64 (7.3x at most in 20
    seeds)."""
    code = pyfastnn.ACTIVATIONS.index(activation)
    f = getattr(torch, activation)
    for p in (0.5, 0.97):
        for seed in range(5):
            generator = torch.Generator().manual_seed(seed)
            x, w, g, b = (torch.randn(shape, generator=generator).to(dtype) for shape in ((64, 16), (48, 16),
                                                                                           (64, 48), (48,)))
            x = x * 3
            b.requires_grad_()
            torch.manual_seed(seed)
            y, _, _, (keep,) = ops.fused_mlp_forward(x, [w], [b], [code], 0.01, [p], True)
            torch.manual_seed(seed)
            (ours,) = torch.autograd.grad(ops.fused_mlp(x, [w], [b], [code], 0.01, [p], True), [b], g)
            gradients = []
            for b_ in (b.detach().clone().requires_grad_(), b.detach().double().requires_grad_()):
                y_ = f(F.linear(x.to(b_.dtype), w.to(b_.dtype), b_)) * keep.to(b_.dtype) / (1 - p)
                gradients.append(torch.autograd.grad(y_, [b_], g.to(b_.dtype))[0])
            eager, exact = gradients
            if p == 0.5:
                assert_close(ours, eager, dtype)
            else:
                assert (ours.double() - exact).abs().max() <= 8 * (eager.double() - exact).abs().max()


@pytest.mark.parametrize("training", ["no", 1, None])
def test_training_must_be_a_bool(training):
    with pytest.raises(TypeError, match="training must be True or False"):
        pyfastnn.fused_mlp(torch.randn(2, 4), [torch.randn(2, 4)], training=training)


@pytest.mark.parametrize("p", ["0.5", True, [0.5]])
def test_dropout_probability_must_be_a_number(p):
    with pytest.raises(TypeError, match="dropout probability must be a real number"):
        pyfastnn.FusedLinear(4, 4, dropout=p)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_bad_dropout_probability(p):
    with pytest.raises(ValueError, match="dropout"):
        pyfastnn.FusedMLP([4, 4, 2], dropout=p)
    with pytest.raises(ValueError, match="dropout"):
        pyfastnn.FusedLinear(4, 4, dropout=p)
    with pytest.raises(ValueError, match="dropout"):
        pyfastnn.fused_mlp(torch.randn(2, 4), [torch.randn(4, 4), torch.randn(2, 4)], dropout=p, training=True)


BAD_MLP_CALLS = [
    # (id, kwargs for fused_mlp, exception, message pattern)
    ("widths_do_not_chain", dict(weights=[torch.randn(6, 4), torch.randn(2, 5)]), ValueError,
     r"layer 0's output has 6 features but weights\[1\] expects in_features=5"),
    ("input_width", dict(input=torch.randn(3, 5)), ValueError, r"has 5 features but weights\[0\] expects in_features=4"),
    ("dtype_in_layer_1", dict(weights=[torch.randn(6, 4), torch.randn(2, 6).double()]), TypeError,
     r"weights\[1\] dtype"),
    ("bias_shape", dict(biases=[torch.randn(6), torch.randn(3)]), ValueError, r"biases\[1\] must have shape"),
    ("bias_count", dict(biases=[torch.randn(6)]), ValueError, "got 1 biases for 2 weights"),
    ("no_weights", dict(weights=[]), ValueError, "at least one weight"),
    ("weights_not_list", dict(weights=torch.randn(6, 4)), TypeError, "weights must be a list"),
    ("weight_not_tensor", dict(weights=[torch.randn(6, 4), "w"]), TypeError, r"weights\[1\] must be a torch.Tensor"),
    ("activation_count", dict(activation=["relu", "relu"]), ValueError, "expected 1"),
    ("too_few_activations", dict(weights=[torch.randn(6, 4), torch.randn(6, 6), torch.randn(2, 6)], activation=["relu"]),
     ValueError, r"got 1 values for activation, expected 2 \(one per hidden layer\)"),
    ("dropout_count", dict(dropout=[0.1, 0.2], training=True), ValueError, "got 2 values for dropout, expected 1"),
    ("unknown_activation", dict(activation="swish"), ValueError, "unknown activation"),
    ("integer_input", dict(input=torch.ones(3, 4, dtype=torch.long)), TypeError, "floating-point"),
]


@pytest.mark.parametrize("name,kwargs,exc,pattern", BAD_MLP_CALLS, ids=[c[0] for c in BAD_MLP_CALLS])
def test_bad_mlp_arguments(name, kwargs, exc, pattern):
    args = dict(input=torch.randn(3, 4), weights=[torch.randn(6, 4), torch.randn(2, 6)], biases=None)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        pyfastnn.fused_mlp(**args)


def test_bad_arguments_to_the_backward_op():
    x, w = torch.randn(3, 4), [torch.randn(6, 4), torch.randn(2, 6)]
    out, hidden, preacts, masks = ops.fused_mlp_forward(x, w, [None, None], [1, 0], 0.01, [0.0, 0.0], True)
    with pytest.raises(ValueError, match="output_mask needs 5 entries"):
        ops.fused_mlp_backward(torch.ones_like(out), x, w, out, hidden, preacts, masks, [1, 0], 0.01, [0.0, 0.0], [True])
    with pytest.raises(ValueError, match="grad_output has shape"):
        ops.fused_mlp_backward(torch.ones(3, 3), x, w, out, hidden, preacts, masks, [1, 0], 0.01, [0.0, 0.0],
                               [True] * 5)
    with pytest.raises(ValueError, match="hidden output has shape"):
        ops.fused_mlp_backward(torch.ones_like(out), x, w, out, [torch.ones(3, 5)], preacts, masks, [1, 0], 0.01,
                               [0.0, 0.0], [True] * 5)
    # A mask in any other form than the layer's 2-D mask or the empty placeholder must not pass for "no dropout".
    for bad_mask in (torch.ones(18, dtype=torch.uint8), torch.ones(1, 3, 6, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"keep_masks\[0\] must be the layer's 2-D dropout mask"):
            ops.fused_mlp_backward(torch.ones_like(out), x, w, out, hidden, preacts, [bad_mask, masks[1]], [1, 0], 0.01,
                                   [0.5, 0.0], [True] * 5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_fullgraph(backend, train):
    torch.manual_seed(0)
    model = nn.Sequential(pyfastnn.FusedMLP([12, 16, 8, 3], activation="gelu", dropout=0.0), nn.LogSoftmax(-1))
    model.train(train)
    x = torch.randn(5, 12)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    expected = model(x)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    if train:
        params = list(model.parameters())
        torch.testing.assert_close(torch.autograd.grad(out.sum(), params), torch.autograd.grad(expected.sum(), params))


def test_torch_compile_fullgraph_of_the_functions_with_changing_slopes_and_dropout():
    # Floats that change between calls become symbolic: the argument checks must trace.
    torch.manual_seed(0)
    x, w = torch.randn(4, 3), [torch.randn(5, 3), torch.randn(2, 5)]
    one_layer = torch.compile(lambda x, s: pyfastnn.fused_linear(x, w[0], None, "leaky_relu", negative_slope=s),
                              fullgraph=True)
    mlp = torch.compile(lambda x, s, p: pyfastnn.fused_mlp(x, w, None, "leaky_relu", dropout=p, training=False,
                                                           negative_slope=s), fullgraph=True)
    for slope, p in ((0.2, 0.1), (0.3, 0.2), (0.4, 0.3)):
        torch.testing.assert_close(one_layer(x, slope), F.leaky_relu(F.linear(x, w[0]), slope))
        torch.testing.assert_close(mlp(x, slope, p), F.linear(F.leaky_relu(F.linear(x, w[0]), slope), w[1]))


def test_torch_compile_with_dropout_is_seeded_like_eager():
    mlp = pyfastnn.FusedMLP([12, 16, 3], dropout=0.5)
    x = torch.randn(5, 12)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    expected = mlp(x)
    torch.manual_seed(1)
    torch.testing.assert_close(compiled(x), expected)


def test_autocast_bfloat16_like_nn_linear():
    torch.manual_seed(0)
    mlp = pyfastnn.FusedMLP([16, 32, 4], activation="relu")
    plain = mlp.to_sequential()
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
        expected = plain(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)


def test_saved_activations_are_no_larger_than_eager():
    """What a training step keeps for backward beyond the parameters and the input: fused = hidden
    outputs + byte masks, never more than eager (which also keeps each activation's output and a byte
    mask per dropout)."""
    torch.manual_seed(0)
    fused = pyfastnn.FusedMLP([784, 256, 128, 10], dropout=0.2)
    x = torch.randn(64, 784)
    fused_bytes, eager_bytes = saved_for_backward_bytes(fused, x), saved_for_backward_bytes(fused.to_sequential(), x)
    assert fused_bytes <= eager_bytes, (fused_bytes, eager_bytes)


@pytest.mark.parametrize("negative_slope", [0.01, 0.0, -0.0, -0.5])
def test_hidden_leaky_relu_layers_keep_their_preactivation_only_where_the_output_cannot_stand_for_it(
        negative_slope):
    """A hidden layer's output, which only the layer above reads, gives leaky_relu's derivative for a
    slope >= 0: such a network keeps what a relu one keeps. Under a negative slope (both signs map to
    positive outputs) and at the output layer (which the caller may change in place, as after
    F.leaky_relu) the pre-activation is kept, one float per output element."""
    torch.manual_seed(0)
    x = torch.randn(64, 784)

    def saved(activation, output_activation):
        mlp = pyfastnn.FusedMLP([784, 256, 128, 10], activation, output_activation, dropout=0.2,
                                negative_slope=negative_slope)
        return saved_for_backward_bytes(mlp, x)

    relu, leaky = saved("relu", None), saved("leaky_relu", None)  # -0.0 counts as 0
    assert leaky == relu + (4 * 64 * (256 + 128) if negative_slope < 0 else 0), (leaky, relu)
    assert saved("leaky_relu", "leaky_relu") == leaky + 4 * 64 * 10


def test_saved_bytes_count_each_storage_once_and_views_of_parameters_free():
    class SlicedWeight(nn.Module):  # keeps only a view (at an offset) of its parameter and the input
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.w[4:].t()

    assert saved_for_backward_bytes(SlicedWeight(), torch.randn(2, 4, requires_grad=True)) == 0


def test_benchmark_arguments_are_checked_before_timing():
    from pyfastnn.benchmark import run, time_interleaved

    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        run(shapes=((2, 3, 4),), activations=("tanh", "swish"), threads=(1,), with_compile=False, log=lambda line: None)
    with pytest.raises(ValueError, match="target_s must be a finite number of seconds > 0"):
        time_interleaved({"f": lambda: None}, target_s=float("inf"))


def test_cuda_kernels_lists_each_kernel_once_per_call_or_says_it_needs_a_gpu():
    from pyfastnn.benchmark import cuda_kernels

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda_kernels needs a CUDA GPU"):
            cuda_kernels(lambda: None)
        return
    with pytest.raises(ValueError, match="iters must be at least 1"):
        cuda_kernels(lambda: None, iters=0)
    x = torch.randn(1 << 20, device="cuda")
    kernels = cuda_kernels(lambda: (x.neg(), x.neg(), x.exp()), iters=3)  # two kernels, one launched twice
    assert sorted(k["launches"] for k in kernels) == [1, 2] and all(k["us"] > 0 for k in kernels), kernels
    assert kernels[0]["us"] >= kernels[1]["us"]


def test_reference_mlp_applies_masks_of_any_shape_and_names_bad_arguments():
    torch.manual_seed(0)
    x, weights = torch.randn(2, 3, 4), [torch.randn(8, 4), torch.randn(3, 8)]
    args = (x, weights, [None, None], ["relu", "identity"])
    dropped = [torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, 3, dtype=torch.uint8)]
    assert not reference_mlp(*args, keep_masks=dropped, dropout=[0.5, 0.5]).any()  # N-D masks apply too
    rows = [mask.reshape(6, -1) for mask in dropped]  # the ops' rows x features layout: the same result
    assert not reference_mlp(*args, keep_masks=rows, dropout=[0.5, 0.5]).any()
    none = [torch.empty(0, dtype=torch.uint8)] * 2  # layers without dropout
    assert torch.equal(reference_mlp(*args, keep_masks=none, dropout=[0.5, 0.5]), reference_mlp(*args))
    with pytest.raises(ValueError, match="keep_masks need the dropout probabilities"):
        reference_mlp(*args, keep_masks=dropped)
    with pytest.raises(ValueError, match=r"a keep mask of shape \(5,\) for a layer output of shape \(2, 3, 8\)"):
        reference_mlp(*args, keep_masks=[torch.ones(5, dtype=torch.uint8)] * 2, dropout=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"dropout probabilities are in \[0, 1\), got 1.0"):
        reference_mlp(*args, keep_masks=dropped, dropout=[1.0, 0.5])
    with pytest.raises(TypeError, match="biases and activations take one entry per layer"):
        reference_mlp(x, weights, None, ["relu", "identity"])
