"""Bad arguments raise a clear Python exception naming the problem, never a crash or a wrong answer."""

import contextlib
import fractions
import warnings

import pytest
import torch

import pyfastnn

X, W, B = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)

CASES = [
    # (id, args, kwargs, exception, message pattern)
    ("dtype_mismatch", (X, W.double(), None), {}, TypeError, "weight dtype .*Double.* does not match input dtype .*Float"),
    ("bias_dtype_mismatch", (X, W, B.double()), {}, TypeError, "bias dtype"),
    ("integer_input", (X.long(), W.long(), None), {}, TypeError, "input must be a floating-point tensor"),
    ("complex_input", (X.cfloat(), W.cfloat(), None), {}, TypeError, "input must be a floating-point tensor"),
    ("weight_not_2d", (X, W.reshape(15), None), {}, ValueError, "weight must be 2-D"),
    ("weight_3d", (X, W.reshape(1, 3, 5), None), {}, ValueError, "weight must be 2-D"),
    ("scalar_input", (torch.tensor(1.0), W, None), {}, ValueError, "at least 1 dimension"),
    ("wrong_in_features", (torch.randn(4, 6), W, None), {}, ValueError, "has 6 features but weight expects in_features=5"),
    ("wrong_bias_shape", (X, W, torch.randn(4)), {}, ValueError, r"bias must have shape \(out_features,\)"),
    ("bias_2d", (X, W, B.reshape(1, 3)), {}, ValueError, "bias must have shape"),
    ("unknown_activation", (X, W, None), {"activation": "swish"}, ValueError, "unknown activation 'swish'.*valid: identity, relu"),
    ("activation_not_a_string", (X, W, None), {"activation": 3}, ValueError, "unknown activation 3"),
    ("activation_unhashable", (X, W, None), {"activation": ["relu"]}, ValueError,
     r"unknown activation \['relu'\]; valid: identity, relu"),
    ("input_not_a_tensor", ([[1.0] * 5], W, None), {}, TypeError, "input must be a torch.Tensor, got list"),
    ("weight_on_other_device", (X, W.to("meta"), None), {}, TypeError, "weight is on meta but input is on cpu"),
    ("bias_on_other_device", (X, W, B.to("meta")), {}, TypeError, "bias is on meta but input is on cpu"),
    ("bias_not_a_tensor", (X, W, 1.0), {}, TypeError, "bias must be a torch.Tensor, got float"),
    ("slope_a_string", (X, W, None), {"activation": "leaky_relu", "negative_slope": "0.2"}, TypeError,
     "negative_slope must be a real number, got '0.2'"),
    ("slope_nan", (X, W, None), {"activation": "leaky_relu", "negative_slope": float("nan")}, ValueError,
     "negative_slope must be finite, got nan"),
    # F.leaky_relu refuses it too: the kernels multiply by the slope in float32 (-inf instead of -1e39).
    ("slope_beyond_float32", (X, W, None), {"activation": "leaky_relu", "negative_slope": 1e39}, ValueError,
     r"negative_slope must be finite in float32 \(at most 3.40\d*e\+38 in magnitude\), got 1e\+39"),
    # ... in float64 too: the slope is checked where no dtype is known yet (a layer's, when it is made).
    ("slope_beyond_float32_in_float64", (X.double(), W.double(), None), {"activation": "leaky_relu",
                                                                          "negative_slope": -1e39}, ValueError,
     r"negative_slope must be finite in float32 .*, got -1e\+39"),
    ("slope_an_integer_beyond_any_float", (X, W, None), {"activation": "leaky_relu", "negative_slope": -10 ** 400},
     ValueError, "negative_slope must be a number a float can hold, got an integer of 1329 bits"),
    ("slope_learnable", (X, W, None), {"activation": "leaky_relu",
                                       "negative_slope": torch.tensor(0.2, requires_grad=True)}, TypeError,
     "negative_slope must be a real number"),
]


@pytest.mark.parametrize("args,kwargs,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pyfastnn.fused_linear(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,pattern", [c[1:] for c in CASES if c[0] != "input_not_a_tensor"],
                         ids=[c[0] for c in CASES if c[0] != "input_not_a_tensor"])
def test_fake_kernels_raise_what_the_kernels_raise(args, kwargs, exc, pattern):
    """torch.compile / FakeTensor / "meta" tensors reject the same calls, with the same exception."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    on_meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args)
    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        on_meta = args  # the device cases: meta tensors mixed with cpu ones, as they are
    with pytest.raises(exc, match=pattern):
        pyfastnn.fused_linear(*on_meta, **kwargs)
    mode = FakeTensorMode()
    fakes = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode, pytest.raises(exc, match=pattern):
        pyfastnn.fused_linear(*fakes, **kwargs)
    if args[2] is None or isinstance(args[2], torch.Tensor):  # and the whole-MLP op, as a one-layer MLP
        with mode, pytest.raises(exc, match=pattern.replace("weight ", "weights\\[0\\] ").replace("bias ", "biases\\[0\\] ")):
            pyfastnn.fused_mlp(fakes[0], [fakes[1]], [fakes[2]], output_activation=kwargs.get("activation", "relu"),
                               negative_slope=kwargs.get("negative_slope", 0.01))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_missing_tensor_beside_tensors_on_any_device_is_named(device):
    w = W.to(device)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got NoneType"):
        pyfastnn.fused_linear(None, w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
        pyfastnn.fused_linear(X.to(device), None)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got NoneType"):
        pyfastnn.fused_mlp(None, [w])
    with pytest.raises(TypeError, match=r"weights\[0\] must be a torch.Tensor, got NoneType"):
        pyfastnn.fused_mlp(X.to(device), [None])


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_nested_input_is_refused_by_name(layout):
    nested = torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(3, 5)], layout=layout)
    with pytest.raises(NotImplementedError, match="nested tensors are not supported as input"):
        pyfastnn.fused_linear(nested, W)
    with pytest.raises(NotImplementedError, match="nested tensors are not supported as input"):
        pyfastnn.FusedMLP([5, 4, 3])(nested)
    # The raw ops, where autograd records the call (the checks' order there: the nested tensor first).
    trained = W.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="nested tensors are not supported as input"):
        torch.ops.pyfastnn.fused_linear(nested, trained, None, 1, 0.01)
    with pytest.raises(NotImplementedError, match="nested tensors are not supported as input"):
        torch.ops.pyfastnn.fused_mlp(nested, [trained], [None], [1], 0.01, [0.0], False)


@pytest.mark.parametrize("convert", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr, torch.Tensor.to_mkldnn,
                                     lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)],
                         ids=["sparse_coo", "sparse_csr", "mkldnn", "quantized"])
def test_tensors_no_kernel_takes_are_refused_by_name(convert):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # beta / deprecation notes of the conversions
        odd = convert(X)
        odd_weight = convert(W)
    with pytest.raises(NotImplementedError, match=r"pyfastnn: input (has layout|is quantized)"):
        pyfastnn.fused_linear(odd, W)
    with pytest.raises(NotImplementedError, match=r"pyfastnn: weights\[0\] (has layout|is quantized)"):
        pyfastnn.fused_mlp(X, [odd_weight])


def test_a_zero_tensor_input_beside_a_mismatched_weight_gets_the_mismatch_named():
    # Autograd's zero tensors (torch._efficientzerotensor) reach the op as plain zeros: the error is
    # the mismatch, not a refusal of the zero tensor.
    zeros = torch._efficientzerotensor((4, 5))
    with pytest.raises(TypeError, match="weight dtype Double does not match input dtype Float"):
        pyfastnn.fused_linear(zeros, W.double())
    with pytest.raises(TypeError, match="weight is on meta but input is on cpu"):
        pyfastnn.fused_linear(zeros, W.to("meta"))
    with pytest.raises(TypeError, match=r"weights\[0\] dtype Double does not match input dtype Float"):
        pyfastnn.fused_mlp(zeros, [W.double()])


def test_bad_activation_code_on_raw_op():
    with pytest.raises(ValueError, match="unknown activation code 42"):
        torch.ops.pyfastnn.fused_linear(X, W, None, 42, 0.0)


@pytest.mark.parametrize("slope,pattern", [(float("inf"), "must be finite, got inf"),
                                           (float("nan"), "must be finite, got nan"),
                                           (-1e39, r"must be finite in float32 \(at most 3.4028234663852886e\+38 "
                                                   r"in magnitude\), got -1e\+39")])
def test_every_raw_op_checks_the_slope_whatever_the_activation(slope, pattern):
    """The ops themselves refuse a slope the kernels cannot multiply by (not only the Python layer),
    on real, meta and fake tensors alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    relu, leaky_relu = (pyfastnn.ACTIVATIONS.index(name) for name in ("relu", "leaky_relu"))
    ops = torch.ops.pyfastnn
    mode = FakeTensorMode()
    for where in ("cpu", "meta", "fake"):
        with mode if where == "fake" else contextlib.nullcontext():
            device = "meta" if where == "meta" else "cpu"
            x, w, g = (torch.randn(*shape, device=device) for shape in ((4, 5), (3, 5), (4, 3)))
            no_mask = torch.empty(0, dtype=torch.uint8, device=x.device)
            calls = {
                "fused_linear": lambda act: ops.fused_linear(x, w, None, act, slope),
                "fused_linear_forward": lambda act: ops.fused_linear_forward(x, w, None, act, slope, True),
                "fused_linear_backward": lambda act: ops.fused_linear_backward(g, x, w, g, act, slope,
                                                                               [True, True, False]),
                "fused_mlp": lambda act: ops.fused_mlp(x, [w], [None], [act], slope, [0.0], False),
                "fused_mlp_forward": lambda act: ops.fused_mlp_forward(x, [w], [None], [act], slope, [0.0], True),
                "fused_mlp_backward": lambda act: ops.fused_mlp_backward(g, x, [w], g, [], [g], [no_mask], [act], slope,
                                                                         [0.0], [True, True, False]),
            }
            for name, call in calls.items():
                for act in (relu, leaky_relu):
                    with pytest.raises(ValueError, match=f"pyfastnn: negative_slope {pattern}"):
                        call(act)


def test_the_slope_is_checked_wherever_it_is_given():
    for bad, error in (("0.2", TypeError), (float("inf"), ValueError), (True, TypeError)):
        with pytest.raises(error, match="negative_slope"):
            pyfastnn.FusedLinear(3, 4, activation="leaky_relu", negative_slope=bad)
        with pytest.raises(error, match="negative_slope"):
            pyfastnn.FusedMLP([3, 4, 2], activation="leaky_relu", negative_slope=bad)
        with pytest.raises(error, match="negative_slope"):
            pyfastnn.fused_mlp(X, [W], negative_slope=bad)
        layer = pyfastnn.FusedLinear(3, 4, activation="leaky_relu")
        with pytest.raises(error, match="negative_slope"):
            layer.negative_slope = bad
        assert layer.negative_slope == 0.01
    # float32's largest value is the limit, and the message shows a value just past it as it is.
    largest = torch.finfo(torch.float32).max
    assert pyfastnn.FusedLinear(3, 4, activation="leaky_relu", negative_slope=-largest).negative_slope == -largest
    with pytest.raises(ValueError, match=r"at most 3.4028234663852886e\+38 in magnitude\), got 3.4028236e\+38$"):
        pyfastnn.FusedLinear(3, 4, activation="leaky_relu", negative_slope=3.4028236e38)
    # A number-like tensor that needs no gradient is its value, as torch's Scalar arguments take it.
    torch.testing.assert_close(pyfastnn.fused_linear(X, W, None, "leaky_relu", negative_slope=torch.tensor(0.2)),
                               torch.nn.functional.leaky_relu(X @ W.T, 0.2))


def test_a_dropout_probability_beyond_any_float_is_refused_by_name():
    message = "dropout probability must be a number a float can hold, got an integer of 1329 bits"
    for make in (lambda: pyfastnn.FusedMLP([3, 4, 2], dropout=10 ** 400),
                 lambda: pyfastnn.FusedLinear(3, 4, dropout=10 ** 400),
                 lambda: pyfastnn.fused_mlp(X, [W, W[:, :3]], dropout=10 ** 400, training=True)):
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="must be a number a float can hold, got a Fraction beyond that range"):
        pyfastnn.FusedLinear(3, 4, dropout=fractions.Fraction(10 ** 400, 3))


def test_a_dropout_probability_the_random_draws_would_round_to_keeping_nothing_is_refused():
    # Kept elements are those whose 32-bit draw is >= round(p * 2^32): a keep probability 1 - p of at
    # most 2^-33 rounds to none kept, while 1 / (1 - p) would still promise an unchanged mean.
    too_close, closest = 1 - 2.0 ** -34, 1 - 2.0 ** -32
    message = r"more than 2\^-33 below 1 \(the 32-bit random draws would keep nothing\), got 0.9999999999417923"
    for make in (lambda: pyfastnn.FusedLinear(3, 4, dropout=too_close),
                 lambda: pyfastnn.fused_mlp(X, [W, W[:, :3]], dropout=too_close, training=True)):
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match=message + " for layer 0"):
        torch.ops.pyfastnn.fused_mlp(X, [W, W[:, :3]], [None, None], [1, 0], 0.01, [too_close, 0.0], True)
    # The closest p still drawn as asked keeps about 2^-32 of the elements, each scaled by 2^32.
    layer = pyfastnn.FusedLinear(5, 3, activation=None, dropout=closest)
    assert layer.dropout == closest
    assert torch.isfinite(layer(X)).all()
    # fuse() fuses the Linear and ReLU before such an nn.Dropout and leaves the Dropout to torch.
    fused = pyfastnn.fuse(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Dropout(too_close)))
    assert isinstance(fused[0], pyfastnn.FusedLinear) and type(fused[2]) is torch.nn.Dropout


def _backward_arguments():
    """Each backward op's arguments from a real forward, by name (fused_mlp: two layers, dropout
    after the first)."""
    ops = torch.ops.pyfastnn
    relu = pyfastnn.ACTIVATIONS.index("relu")
    x, w1, w2 = torch.randn(4, 5), torch.randn(6, 5), torch.randn(3, 6)
    out, _ = ops.fused_linear_forward(x, w1, None, relu, 0.01, False)
    linear = dict(grad_output=torch.ones_like(out), input=x, weight=w1, saved=out, activation=relu,
                  negative_slope=0.01, output_mask=[True, True, False])
    with torch.random.fork_rng():
        out, hidden, preacts, masks = ops.fused_mlp_forward(x, [w1, w2], [None, None], [relu, 0], 0.01, [0.5, 0.0],
                                                            True)
    mlp = dict(grad_output=torch.ones_like(out), input=x, weights=[w1, w2], output=out, hidden=hidden,
               preacts=preacts, keep_masks=masks, activations=[relu, 0], negative_slope=0.01, dropout=[0.5, 0.0],
               output_mask=[True, True, True, False, False])
    return {"fused_linear_backward": linear, "fused_mlp_backward": mlp}


@pytest.mark.parametrize("op,argument,exc,pattern", [
    ("fused_linear_backward", "grad_output", TypeError, "grad_output is on meta but input is on cpu"),
    ("fused_linear_backward", "saved", TypeError, "saved activation is on meta but input is on cpu"),
    ("fused_mlp_backward", "grad_output", TypeError, "grad_output is on meta but input is on cpu"),
    ("fused_mlp_backward", "output", TypeError, "saved output is on meta but input is on cpu"),
    ("fused_mlp_backward", "hidden", TypeError, r"hidden\[0\] is on meta but input is on cpu"),
    ("fused_mlp_backward", "preacts", TypeError, r"preacts\[0\] is on meta but input is on cpu"),
    ("fused_mlp_backward", "keep_masks", TypeError, r"keep_masks\[0\] is on meta but input is on cpu"),
    ("fused_mlp_backward", "keep_masks[1]", TypeError, r"keep_masks\[1\] is on meta but input is on cpu"),
])
def test_a_backward_argument_on_another_device_is_refused_where_the_fake_kernel_runs(op, argument, exc, pattern):
    """One meta tensor among CPU ones sends the call to the fake kernel, which returned unwritten CPU
    tensors for the gradients: it runs the kernels' upfront checks (the gradient, the masks, every
    saved tensor's device)."""
    args = _backward_arguments()[op]
    name, _, index = argument.partition("[")
    value = args[name]
    if isinstance(value, list):  # one tensor of the list: the first, or the one named
        value = list(value)
        at = int(index.rstrip("]")) if index else 0
        value[at] = value[at].to("meta")
    else:
        value = value.to("meta")
    with pytest.raises(exc, match=pattern):
        getattr(torch.ops.pyfastnn, op)(**{**args, name: value})
    getattr(torch.ops.pyfastnn, op)(**args)  # as the forward left them, they are accepted


def test_a_tensor_slope_that_torch_export_cannot_know_is_refused_by_name():
    class TensorSlope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slope", torch.tensor(0.2))

        def forward(self, x):
            return pyfastnn.fused_linear(x, W, None, "leaky_relu", negative_slope=self.slope)

    model = TensorSlope()
    torch.testing.assert_close(model(X), torch.nn.functional.leaky_relu(X @ W.T, 0.2))  # eager reads its value
    for strict in (False, True):
        with pytest.raises(TypeError if not strict else Exception,
                           match="negative_slope is a tensor, whose value is data to a trace"):
            torch.export.export(model, (X,), strict=strict)
    with pytest.raises(Exception, match="negative_slope is a tensor, whose value is data to a trace"):
        torch.compile(model, backend="eager", fullgraph=True)(X)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="eager")(X), model(X))  # a graph break, then eager


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        pyfastnn.FusedLinear(3, 4, activation="softmax")
    layer = pyfastnn.FusedLinear(3, 4)
    with pytest.raises(ValueError, match="input .last dimension. has 5 features but weight expects in_features=3"):
        layer(torch.randn(2, 5))
