"""The CUDA backend against PyTorch and against the CPU kernels: cuBLASLt epilogues and their fallback,
every activation and dtype against a float64 reference, odd shapes and alignments, fused_mlp, fused
dropout (statistics, reproducibility, CUDA-graph replays), CUDA-graph capture of forward+backward.
Runs where a GPU is visible (scripts/gpu_check.sh); elsewhere these are skipped, and CI instead
compiles the CUDA build and runs the CPU suite on it."""

import gc
import os

import pytest
import torch
from torch import nn

import pyfastnn
from pyfastnn.benchmark import cuda_kernels
from pyfastnn.testing import DTYPES, assert_close, reference, reference_mlp
from samples import CUDA_READY, assert_dropout_statistics, mlp_sample_inputs, sample_inputs

ops = torch.ops.pyfastnn

# float32 is compared without TF32, as on the CPU; TF32 itself is tested on its own below.
pytestmark = [pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a CUDA build of pyfastnn"),
              pytest.mark.usefixtures("exact_fp32")]

SAMPLES = list(sample_inputs(device="cuda")) if CUDA_READY else []



@pytest.mark.parametrize("sample", SAMPLES, ids=repr)
def test_cuda_matches_reference_and_cpu(sample):
    out = pyfastnn.fused_linear(sample.input, sample.weight, sample.bias, **sample.kwargs())
    expected = reference(sample.input, sample.weight, sample.bias, **sample.kwargs())
    assert out.device == sample.input.device
    assert_close(out, expected, sample.dtype)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, sample.tensors(), grad)
    for got, want in zip(grads, torch.autograd.grad(expected, sample.tensors(), grad)):
        assert_close(got, want, sample.dtype)
    if sample.dtype in (torch.float32, torch.float64):
        cpu = [t.detach().cpu() for t in sample.tensors()]
        cpu_out = pyfastnn.fused_linear(cpu[0], cpu[1], cpu[2] if sample.bias is not None else None, **sample.kwargs())
        assert_close(out.cpu(), cpu_out, sample.dtype)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.dtype == torch.float64 and s.input.numel() < 500], ids=repr)
def test_cuda_gradcheck_and_opcheck(sample):
    fn = lambda *t: pyfastnn.fused_linear(*t[:2], t[2] if len(t) > 2 else None, **sample.kwargs())  # noqa: E731
    assert torch.autograd.gradcheck(fn, sample.tensors())
    torch.library.opcheck(torch.ops.pyfastnn.fused_linear.default, sample.op_args())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    layer = torch.nn.Linear(64, 32).cuda()
    fused = pyfastnn.FusedLinear.from_linear(layer, activation="silu")
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, expected = fused(x), torch.nn.functional.silu(layer(x))
    assert out.dtype == expected.dtype == dtype
    assert_close(out, expected, dtype)


def _tf32_on(api: str) -> None:
    if api == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # the newer API alone: torch then refuses to read allow_tf32 (exact_fp32 sets both back)
        torch.backends.cuda.matmul.fp32_precision = "tf32"


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "sigmoid"])  # cuBLASLt epilogue and our pass
def test_tf32_follows_pytorch_setting(api, activation):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0")
    x, w, b = torch.randn(256, 512, device="cuda"), torch.randn(128, 512, device="cuda"), torch.randn(128, device="cuda")
    exact = reference(x.double(), w.double(), b.double(), activation)
    ieee_error = (pyfastnn.fused_linear(x, w, b, activation).double() - exact).abs().max().item()
    _tf32_on(api)
    out = pyfastnn.fused_linear(x, w, b, activation)
    assert_close(out, reference(x, w, b, activation), torch.bfloat16)  # eager under the same setting
    # TF32 keeps 10 mantissa bits: its error over k=512 is orders of magnitude above float32's.
    assert (out.double() - exact).abs().max().item() > 30 * ieee_error


@pytest.mark.parametrize("activation", ["relu", "sigmoid", None])
def test_tf32_leaves_the_bias_gradient_in_float32(activation, gemm_path):
    """cuBLASLt's BGRADB epilogue sums the bias gradient inside the TF32 weight-gradient GEMM (the
    fallback sums it in our own pass); eager sums grad.sum(0) in float32, whatever the matmul
    precision. The bias gradient must stay as close to float64 as that sum (TF32's 10-bit rounding
    of the summands would be ~1000x further)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 256, device="cuda", generator=generator)
    w = torch.randn(128, 256, device="cuda", generator=generator, requires_grad=True)
    b = torch.randn(128, device="cuda", generator=generator, requires_grad=True)
    grad = torch.rand(4096, 128, device="cuda", generator=generator) + 1
    _tf32_on("allow_tf32")
    out = pyfastnn.fused_linear(x, w, b, activation)
    # Both gradients, as in training: BGRADB rides in the weight-gradient GEMM, which a bias-only
    # backward does not run (its bias sum is then pyfastnn's own float32 pass).
    _, grad_bias = torch.autograd.grad(out, (w, b), grad)
    saved = out.detach().double()
    derivative = {"relu": (saved > 0).double(), "sigmoid": saved * (1 - saved), None: torch.ones_like(saved)}
    exact = (grad.double() * derivative[activation]).sum(0)
    float32_sum = (grad * derivative[activation].float()).sum(0)
    scale = exact.abs().max().item()
    assert (grad_bias.double() - exact).abs().max().item() <= 4 * (float32_sum.double() - exact).abs().max().item() + 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_reduced_precision_reduction_setting_runs_and_stays_accurate(dtype):
    """Long k and a small output invite split-K. Under each of torch's three settings (reduced
    precision allowed; not allowed; not allowed and no split-K) the cuBLASLt paths find an algorithm
    within the restricted schemes, or fall back, and match eager under the same setting."""
    matmul = torch.backends.cuda.matmul
    name = "allow_fp16_reduced_precision_reduction" if dtype == torch.float16 else "allow_bf16_reduced_precision_reduction"
    previous = getattr(matmul, name)
    x, w, b = (torch.randn(s, device="cuda", dtype=dtype) for s in ((64, 16384), (64, 16384), (64,)))
    try:
        for allowed in (True, False, (False, False)):
            setattr(matmul, name, allowed)
            for activation in ("relu", "gelu_tanh", "tanh", None):
                assert_close(pyfastnn.fused_linear(x, w, b, activation), reference(x, w, b, activation), dtype)
    finally:
        setattr(matmul, name, previous)


def test_non_default_stream_and_cuda_graphs():
    x, w, b = (torch.randn(s, device="cuda") for s in ((64, 32), (16, 32), (16,)))
    buffer = torch.zeros_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x, w, b were written on the default stream
    with torch.cuda.stream(stream):
        # The input is written on this stream after a long spin: a kernel launched on another stream
        # would read the zeros before it.
        torch.cuda._sleep(100_000_000)
        buffer.copy_(x)
        out = pyfastnn.fused_linear(buffer, w, b, "gelu")
    stream.synchronize()
    assert_close(out, reference(x, w, b, "gelu"), torch.float32)
    model = torch.nn.Sequential(pyfastnn.FusedLinear(32, 64, activation="relu"), pyfastnn.FusedLinear(64, 8, activation=None)).cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # record, then replay the CUDA graph
        result = compiled(x)
    assert_close(result, model(x), torch.float32)


def test_mixed_devices_raise():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises((TypeError, RuntimeError), match="cpu|device"):
        pyfastnn.fused_linear(x, torch.randn(3, 5), None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    x, w = torch.randn(8, 16, device="cuda:1"), torch.randn(4, 16, device="cuda:1")
    out = pyfastnn.fused_linear(x, w, None, "tanh")
    assert out.device == x.device
    assert_close(out, reference(x, w, None, "tanh"), torch.float32)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_cublaslt_epilogue_finishes_the_layer_where_it_can(activation, monkeypatch):
    """The cuBLASLt path is taken, not only correct where taken: an aligned bfloat16 layer with the
    tanh-form GELU (or relu, its epilogue allowed) runs no pass of pyfastnn's own in inference (the
    epilogue finished the layer), where the fallback runs one."""
    x, w, b = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in ((256, 512), (384, 512), (384,)))
    with pyfastnn.cuda_relu_epilogue(True):
        for path in ("cublaslt", "fallback"):
            if path == "fallback":
                monkeypatch.setenv("PYFASTNN_CUBLASLT", "0")
            names = [k["kernel"] for k in cuda_kernels(lambda: pyfastnn.fused_linear(x, w, b, activation))]
            own_passes = [n for n in names if "forward_kernel" in n]  # pyfastnn's element-wise forward pass
            assert bool(own_passes) == (path == "fallback"), (path, names)


@pytest.fixture(params=["cublaslt", "fallback"])
def gemm_path(request, monkeypatch):
    """Runs a test on both GEMM paths: cuBLASLt epilogues, and ATen GEMMs + pyfastnn's own passes
    (PYFASTNN_CUBLASLT=0, read at every call)."""
    if request.param == "fallback":
        monkeypatch.setenv("PYFASTNN_CUBLASLT", "0")
    else:
        monkeypatch.delenv("PYFASTNN_CUBLASLT", raising=False)
    return request.param


@pytest.fixture(params=["cublaslt", "relu_epilogue", "fallback"])
def relu_gemm_path(request, monkeypatch):
    """gemm_path's two paths, and cuBLASLt with its relu epilogue allowed (pyfastnn.cuda_relu_epilogue;
    NOTE [The relu epilogue and NaN]): for the tests of relu layers."""
    monkeypatch.delenv("PYFASTNN_CUBLASLT", raising=False)
    if request.param == "fallback":
        monkeypatch.setenv("PYFASTNN_CUBLASLT", "0")
    with pyfastnn.cuda_relu_epilogue(request.param == "relu_epilogue"):
        yield request.param


def _float64_error(fn, tensors, grad):
    """Max abs error of fn's output and gradients against the same computation in float64 on the
    GPU, each divided by that reference's scale."""
    wide = [t.detach().double().requires_grad_() for t in tensors]
    expected = fn(*wide)
    expected_grads = torch.autograd.grad(expected, wide, grad.double())
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, grad)
    errors = []
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        errors.append((got.double() - want).abs().max().item() / scale if want.numel() else 0.0)
    return errors


# (rows, in, out): 128-bit aligned everywhere; odd sizes (scalar passes, cuBLASLt alignment 2-4 bytes).
LAYER_SHAPES = ((256, 512, 384), (33, 17, 9), (130, 64, 72))


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", pyfastnn.ACTIVATIONS)
def test_every_activation_and_dtype_as_close_to_float64_as_eager(activation, dtype, shape, gemm_path):
    rows, k, n = shape
    generator = torch.Generator(device="cuda").manual_seed(rows + k + n)
    x = torch.randn(rows, k, device="cuda", generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device="cuda", generator=generator) * k ** -0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device="cuda", generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(rows, n, device="cuda", generator=generator).to(dtype)
    fused = _float64_error(lambda *t: pyfastnn.fused_linear(*t, activation=activation), (x, w, b), grad)
    eager = _float64_error(lambda *t: reference(*t, activation=activation), (x, w, b), grad)
    # As close as eager, up to a few roundings of the dtype (fusion rounds in other places). In float64
    # eager is the reference itself (its error 0): the floor then covers another summation order of
    # the GEMM's k-blocks and of the bias gradient (tens of eps).
    floor = (64 if dtype == torch.float64 else 8) * torch.finfo(dtype).eps
    for what, got, want in zip(("output", "grad input", "grad weight", "grad bias"), fused, eager):
        assert got <= 2 * want + floor, f"{what}: {got:.3g} vs eager {want:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "identity", "silu"])
def test_cublaslt_and_fallback_paths_agree(activation, dtype, monkeypatch):
    x = torch.randn(512, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(128, 256, device="cuda") / 16).to(dtype).requires_grad_()
    b = torch.randn(128, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(512, 128, device="cuda", dtype=dtype)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("PYFASTNN_CUBLASLT", setting)
        out = pyfastnn.fused_linear(x, w, b, activation)
        results.append((out, *torch.autograd.grad(out, (x, w, b), grad)))
    expected = reference(x, w, b, activation)
    expected_grads = torch.autograd.grad(expected, (x, w, b), grad)
    for lt, fallback, want in zip(results[0], results[1], (expected, *expected_grads)):
        assert_close(lt, want, dtype)
        assert_close(fallback, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "sigmoid"])
def test_misaligned_views_and_transposed_operands(activation, dtype, gemm_path):
    # Storage offsets of one element: pointers are 2- or 4-byte aligned, never 16. cuBLASLt must pick a
    # kernel for such inputs or decline them; the bias it gets is an aligned copy of the sliced one.
    rows, k, n = 96, 64, 40
    x = torch.randn(rows * k + 1, device="cuda", dtype=dtype)[1:].view(rows, k).requires_grad_()
    w = (torch.randn(n * k + 1, device="cuda") / 8).to(dtype)[1:].view(n, k).requires_grad_()
    b = torch.randn(n + 1, device="cuda", dtype=dtype)[1:].requires_grad_()
    for inputs in ((x, w, b), (x.t().contiguous().t(), w, b), (x, w.t().contiguous().t(), b)):
        out = pyfastnn.fused_linear(*inputs, activation=activation)
        expected = reference(*inputs, activation=activation)
        assert_close(out, expected, dtype)
        grad = torch.randn_like(expected)
        for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("rows", [65537, 600001])
def test_large_buffer_vectorized_and_one_element_paths(rows):
    # rows x 16 elements: a multiple of the vector width (128-bit loads); rows x 15: odd, so the
    # forward and backward passes take their one-element path. 65537 rows fill one ragged round of
    # their grid-stride loop (small enough for compute-sanitizer); 600001 rows need several (at most
    # SMs x 16 blocks x 256 threads x 4 items a round: 2.16M on an H200's 132 SMs).
    x = torch.randn(rows, 32, device="cuda", requires_grad=True)
    w = torch.randn(16, 32, device="cuda", requires_grad=True)
    for n in (16, 15):
        weight = w[:n]
        out = pyfastnn.fused_linear(x, weight, None, "silu")
        expected = reference(x, weight, None, "silu")
        assert_close(out, expected, torch.float32)
        grad = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)):
            assert_close(got, want, torch.float32)


@pytest.mark.parametrize("sample", list(mlp_sample_inputs(with_dropout=False)) if CUDA_READY else [],
                         ids=repr)
def test_cuda_fused_mlp_matches_reference(sample, gemm_path):
    tensors = [t.detach().cuda().requires_grad_() for t in sample.tensors()]
    args = sample.op_args(training=True, tensors=tensors)
    out = torch.ops.pyfastnn.fused_mlp(*args)
    x, weights, biases = sample.rebuild(tensors)
    expected = reference_mlp(x, weights, biases, sample.activations, sample.negative_slope)
    assert_close(out, expected, sample.dtype)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad)):
        assert_close(got, want, sample.dtype)


def _mlp_tensors(rows, widths, dtype):
    """An MLP's input, weights (scaled by 1/sqrt(fan-in)) and biases on the GPU, all requiring grad,
    drawn from torch's default generator in that order."""
    x = torch.randn(rows, widths[0], device="cuda", dtype=dtype, requires_grad=True)
    weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype).requires_grad_()
               for k, n in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) for n in widths[1:]]
    return x, weights, biases


@pytest.mark.parametrize("activations", [("relu", "relu", "identity"), ("gelu_tanh", "gelu_tanh", "identity"),
                                         ("gelu", "silu", "tanh"), ("leaky_relu", "relu", "sigmoid")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_mlp_stack_on_both_paths(activations, dtype, relu_gemm_path):
    # Wide aligned layers: cuBLASLt takes every GEMM, derivative epilogues ride in the data-gradient GEMMs.
    torch.manual_seed(0)
    x, weights, biases = _mlp_tensors(384, (256, 512, 256, 128), dtype)
    out = pyfastnn.fused_mlp(x, weights, biases, list(activations[:-1]), activations[-1])
    expected = reference_mlp(x, weights, biases, activations)
    assert_close(out, expected, dtype)
    grad = torch.randn_like(expected)
    tensors = (x, *weights, *biases)
    for got, want in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad)):
        assert_close(got, want, dtype)
    # Only the weights: the input gradient is never formed, the lowest layer's data GEMM is skipped.
    got = torch.autograd.grad(pyfastnn.fused_mlp(x.detach(), weights, biases, list(activations[:-1]),
                                                 activations[-1]), weights, grad)
    want = torch.autograd.grad(reference_mlp(x.detach(), weights, biases, activations), weights, grad)
    for g, e in zip(got, want):
        assert_close(g, e, dtype)
    # Only the biases (frozen weights): a hidden layer's bias gradient cannot come from its weight
    # gradient's GEMM, so it is summed from the pre-activation gradient the layer above's GEMM formed.
    frozen = [w.detach() for w in weights]
    got = torch.autograd.grad(pyfastnn.fused_mlp(x.detach(), frozen, biases, list(activations[:-1]),
                                                 activations[-1]), biases, grad)
    want = torch.autograd.grad(reference_mlp(x.detach(), frozen, biases, activations), biases, grad)
    for g, e in zip(got, want):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cublaslt_epilogues_carry_a_gelu_tanh_stack_forward_and_backward(dtype, record_property, monkeypatch):
    """The epilogues are taken, not only right where taken: an aligned tanh-GELU stack in half or
    bfloat16 trains with no pass of pyfastnn's own. Forward, GELU_AUX_BIAS keeps each hidden
    pre-activation and BIAS finishes the output layer; backward, each hidden layer's derivative
    rides in the data-gradient GEMM of the layer above (DGELU) and every bias gradient in a
    weight-gradient GEMM (BGRADB). float32 never takes cuBLASLt's GELU (its tanh is approximate
    beyond float32's tolerance): there pyfastnn's passes run."""
    monkeypatch.delenv("PYFASTNN_CUBLASLT", raising=False)
    torch.manual_seed(0)
    x, weights, biases = _mlp_tensors(384, (256, 512, 256, 128), dtype)
    grad = torch.randn(384, 128, device="cuda", dtype=dtype)

    def step():
        out = pyfastnn.fused_mlp(x, weights, biases, ["gelu_tanh", "gelu_tanh"], None)
        return torch.autograd.grad(out, (x, *weights, *biases), grad)

    kernels = cuda_kernels(step)
    # The profile saw the GEMMs: 3 forward, 3 data-gradient (the input's too), 3 weight-gradient.
    assert sum(k["launches"] for k in kernels) >= 9, kernels
    own_passes = [k["kernel"] for k in kernels if "pyfastnn" in k["kernel"]]
    record_property("own_passes", own_passes)
    assert bool(own_passes) == (dtype == torch.float32), kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_relu_stack_with_dropout_on_both_paths(dtype, gemm_path, record_property):
    # NOTE [relu bit masks]: a relu layer with dropout after it keeps the bit mask of its dropped-out
    # output, and the layer above applies relu's derivative, the dropout mask and 1 / (1 - p) in its
    # data-gradient GEMM (DRELU, alpha); the fallback reads the saved output instead. Wide aligned
    # layers, so that cuBLASLt takes every GEMM; every gradient, then the weights' and the biases' alone.
    torch.manual_seed(0)
    x, weights, biases = _mlp_tensors(384, (256, 512, 256, 128), dtype)
    activations, dropout = ("relu", "relu", "identity"), [0.2, 0.35, 0.0]
    codes = [pyfastnn.ACTIVATIONS.index(a) for a in activations]
    grad = torch.randn(384, 128, device="cuda", dtype=dtype)
    frozen = [w.detach() for w in weights]
    for inputs, ws, wanted in ((x, weights, (x, *weights, *biases)), (x.detach(), weights, weights),
                               (x.detach(), frozen, biases)):
        torch.manual_seed(5)
        out = ops.fused_mlp(inputs, ws, biases, codes, 0.01, dropout, True)
        masks = _masks((inputs.detach(), [w.detach() for w in ws], [b.detach() for b in biases], codes, 0.01,
                        dropout, True), 5)
        expected = reference_mlp(inputs, ws, biases, activations, 0.01, masks, dropout)
        assert_close(out, expected, dtype)
        for got, want in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(expected, wanted, grad)):
            assert_close(got, want, dtype)
    if gemm_path == "cublaslt":  # no relu backward pass ran: the GEMMs above took the relu layers' backward
        def step():
            return torch.autograd.grad(ops.fused_mlp(x, weights, biases, codes, 0.01, dropout, True),
                                       (x, *weights, *biases), grad)

        names = [k["kernel"] for k in cuda_kernels(step)]
        assert any("relu_and_mask_kernel" in n for n in names), names  # the profile saw pyfastnn's kernels
        relu_passes = [n for n in names if "backward" in n and "Relu" in n]
        record_property("relu_backward_passes", len(relu_passes))
        if dtype != torch.float32:  # cuBLASLt's DRELU epilogue for float32 GEMMs (no TF32) is not a given:
            assert not relu_passes, names  # there the fallback pass is right too, and recorded


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"dropout{p}")
@pytest.mark.parametrize("hidden_width", [200, 203])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_relu_bit_mask_layout_and_fake(dtype, hidden_width, p, relu_gemm_path):
    # NOTE [relu bit masks]: bit f % 8 of byte f / 8 of a row says output f > 0 (with dropout: the
    # dropped-out output, so positive and kept), rows padded to 128 bits. cuBLASLt's relu epilogue
    # writes it on one path (no dropout), pyfastnn's kernels on the others (the relu pass itself for
    # width 200, a second pass for width 203): all must match this.
    torch.manual_seed(0)
    rows, widths = 300, (64, hidden_width, 8)
    x = torch.randn(rows, widths[0], device="cuda", dtype=dtype)
    weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype) for k, n in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(n, device="cuda", dtype=dtype) for n in widths[1:]]
    args = (x, weights, biases, [1, 0], 0.01, [p, 0.0], True)
    # Padding left unwritten would show over reused memory: a first call's mask gets every bit set and
    # is freed; the caching allocator hands the same block to the same allocation of the next call
    # (garbage collected first, so that no earlier test's tensors are freed in between).
    gc.collect()
    torch.manual_seed(7)
    first = ops.fused_mlp_forward(*args)
    first[2][0].fill_(255)
    reused = first[2][0].data_ptr()
    del first
    torch.manual_seed(7)
    out, hidden, preacts, masks = ops.fused_mlp_forward(*args)
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":  # compute-sanitizer's memcheck turns it off
        assert preacts[0].data_ptr() == reused, "the test's premise: the second mask reuses the first's memory"
    assert preacts[0].dtype == torch.uint8 and preacts[0].shape == (rows, 32)  # 200 or 203 features: 256 bits
    shifts = torch.arange(8, device="cuda", dtype=torch.int32)
    bits = ((preacts[0].to(torch.int32).unsqueeze(-1) >> shifts) & 1).view(rows, 256)
    assert torch.equal(bits[:, :widths[1]].bool(), hidden[0] > 0)
    if relu_gemm_path != "relu_epilogue" or p:  # cuBLASLt's own padding bits are its business, but fixed:
        assert not bits[:, widths[1]:].any()  # opcheck compares two calls' outputs bitwise
    if not p:
        torch.library.opcheck(ops.fused_mlp_forward.default, args)
        return
    assert masks[0].shape == (rows, widths[1]) and not hidden[0][masks[0] == 0].any()
    # The pass that writes the bit mask drops out exactly what the plain pass drops from the same
    # generator state: the inference op's output (no mask kept) and leaky_relu's keep mask agree.
    torch.manual_seed(7)
    with torch.no_grad():
        assert torch.equal(ops.fused_mlp(*args), out)
    torch.manual_seed(7)
    leaky = pyfastnn.ACTIVATIONS.index("leaky_relu")
    assert torch.equal(ops.fused_mlp_forward(x, weights, biases, [leaky, 0], 0.01, [p, 0.0], True)[3][0], masks[0])
    # Random masks differ between the calls opcheck compares; everything else is checked.
    torch.library.opcheck(ops.fused_mlp_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_relu_stack_at_nan_and_exactly_zero_like_torch(dtype, relu_gemm_path):
    # Where the pre-activation is NaN the output stays NaN, as torch.relu's (NOTE [The relu epilogue
    # and NaN]: only the opted-in cuBLASLt relu epilogue may write 0 there); where it is exactly zero
    # no gradient passes (here the output relu's own 0 stops it; the hidden layer's bit mask at 0 is
    # test_no_gradient_passes_a_hidden_relu_at_exactly_zero's).
    torch.manual_seed(0)
    x, weights, _ = _mlp_tensors(256, (128, 256, 128), dtype)
    with torch.no_grad():
        x[0] = 0.0               # no biases: every first-layer pre-activation of row 0 is exactly 0
        x[1, 3] = float("nan")   # row 1 is NaN from the first layer on
    activations = ("relu", "relu")
    out = pyfastnn.fused_mlp(x, weights, None, ["relu"], "relu")
    expected = reference_mlp(x, weights, [None, None], activations)
    rows = torch.tensor([0, 2, 3], device="cuda")  # the rows without NaN
    if relu_gemm_path == "relu_epilogue":
        assert (out[1].isnan() | (out[1] == 0)).all()
        assert_close(out[rows], expected[rows], dtype)
    else:
        assert torch.equal(out.isnan(), expected.isnan()) and out[1].isnan().all()
        assert_close(out, expected, dtype)
    grad = torch.zeros_like(expected)
    grad[rows] = torch.randn(len(rows), expected.shape[1], device="cuda", dtype=dtype)
    (got,) = torch.autograd.grad(pyfastnn.fused_mlp(x, weights, None, ["relu"], "relu"), x, grad)
    (want,) = torch.autograd.grad(reference_mlp(x, weights, [None, None], activations), x, grad)
    assert not got[0].any() and not want[0].any()
    assert_close(got[rows], want[rows], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_no_gradient_passes_a_hidden_relu_at_exactly_zero(dtype, relu_gemm_path):
    # The hidden layer's derivative rides in the data-gradient GEMM above it (DRELU reading the bit
    # mask): where its pre-activation is exactly 0, no gradient may pass, as through torch.relu. The
    # identity output keeps the gradient arriving there non-zero. Opted in, the mask is cuBLASLt's
    # RELU_AUX mask, whose bit at exactly 0 is cuBLASLt's choice (NOTE [The relu epilogue and NaN]):
    # there the gradient must follow the mask the forward kept, whichever way it went.
    torch.manual_seed(0)
    x, weights, _ = _mlp_tensors(256, (128, 256, 64), dtype)
    with torch.no_grad():
        x[0] = 0.0  # no biases: every hidden pre-activation of row 0 is exactly 0
    grad = torch.randn(256, 64, device="cuda", dtype=dtype)
    (got,) = torch.autograd.grad(pyfastnn.fused_mlp(x, weights, None, ["relu"], "identity"), x, grad)
    (want,) = torch.autograd.grad(reference_mlp(x, weights, [None, None], ("relu", "identity")), x, grad)
    assert not want[0].any()
    assert_close(got[1:], want[1:], dtype)
    if relu_gemm_path != "relu_epilogue":
        assert not got[0].any(), "a gradient passed the relu at 0"
        return
    _, _, preacts, _ = ops.fused_mlp_forward(x.detach(), [w.detach() for w in weights], [None, None], [1, 0], 0.01,
                                             [0.0, 0.0], True)
    shifts = torch.arange(8, device="cuda", dtype=torch.int32)
    kept = ((preacts[0][0].to(torch.int32).unsqueeze(-1) >> shifts) & 1).view(-1)[:256].to(dtype)
    assert kept.min() == kept.max(), "one row of equal pre-activations got unequal mask bits"
    w1, w2 = (w.detach() for w in weights)
    assert_close(got[0], ((grad[0] @ w2) * kept) @ w1, dtype)


# --- fused dropout -------------------------------------------------------------------------------

def _masks(sample_args, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return ops.fused_mlp_forward(*sample_args)[3]


@pytest.mark.parametrize("shape", [(1000, 1000), (999, 1001)], ids=str)
def test_cuda_dropout_statistics_match_nn_dropout(shape):
    # (999, 1001): an element count that is no multiple of the vector width (the one-element path).
    torch.manual_seed(0)
    assert_dropout_statistics("cuda", *shape)


def test_cuda_dropout_is_reproducible_and_fresh_per_call():
    sample = next(s for s in mlp_sample_inputs(requires_grad=False) if s.name == "lesson-float32-dropout")
    args = sample.op_args(True, [t.cuda() for t in sample.tensors()])
    first, again, other = _masks(args, 11), _masks(args, 11), _masks(args, 12)
    for a, b, c in zip(first, again, other):
        assert a.device.type == "cuda" and a.dtype == torch.uint8
        assert torch.equal(a, b)
        if a.numel():
            assert not torch.equal(a, c)
    torch.manual_seed(11)
    with torch.no_grad():
        ops.fused_mlp_forward(*args)
        next_call = ops.fused_mlp_forward(*args)[3]
    assert not torch.equal(first[0], next_call[0])
    # Two layers of one call get different masks too.
    assert not torch.equal(first[0][:, :128], first[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activations", [("relu", "relu", "identity"), ("gelu", "sigmoid", "tanh"),
                                         ("leaky_relu", "gelu_tanh", "silu"), ("identity", "tanh", "relu")], ids=str)
def test_cuda_dropout_gradients_use_the_same_mask(activations, dtype, gemm_path):
    torch.manual_seed(1)
    x, weights, biases = _mlp_tensors(70, (48, 64, 40, 24), dtype)
    codes = [pyfastnn.ACTIVATIONS.index(a) for a in activations]
    dropout = [0.3, 0.5, 0.2]  # after every layer, the output layer included
    tensors = (x, *weights, *biases)
    torch.manual_seed(5)
    out = ops.fused_mlp(x, weights, biases, codes, -0.1, dropout, True)
    masks = _masks((x, weights, biases, codes, -0.1, dropout, True), 5)
    expected = reference_mlp(x, weights, biases, activations, -0.1, masks, dropout)
    assert_close(out, expected, dtype)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad)):
        assert_close(got, want, dtype)


def test_cuda_dropout_in_a_captured_graph_draws_fresh_masks_each_replay():
    torch.manual_seed(0)
    widths = (64, 128, 32)
    x = torch.randn(256, widths[0], device="cuda")
    weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).requires_grad_() for k, n in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(n, device="cuda", requires_grad=True) for n in widths[1:]]
    codes, dropout = [1, 0], [0.5, 0.25]
    grad = torch.randn(256, widths[-1], device="cuda")
    mask_all = [True] * 5

    def step():
        out, hidden, preacts, masks = ops.fused_mlp_forward(x, weights, biases, codes, 0.01, dropout, True)
        grads = ops.fused_mlp_backward(grad, x, weights, out, hidden, preacts, masks, codes, 0.01, dropout, mask_all)
        return out, masks, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside the graph, as CUDA graphs require
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out, masks, (grad_x, grad_ws, grad_bs) = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append([m.clone() for m in masks])
        expected = reference_mlp(x, weights, biases, ["relu", "identity"], 0.01, masks, dropout)
        assert_close(out, expected, torch.float32)
        want = torch.autograd.grad(expected, (weights[0], weights[1], biases[0], biases[1]), grad)
        for got, e in zip((grad_ws[0], grad_ws[1], grad_bs[0], grad_bs[1]), want):
            assert_close(got, e, torch.float32)
    for layer in range(2):
        assert not torch.equal(seen[0][layer], seen[1][layer])
        assert not torch.equal(seen[1][layer], seen[2][layer])
    # Replays draw from the generator like eager calls: the same seed gives the same replay masks.
    torch.manual_seed(123)
    graph.replay()
    first = [m.clone() for m in masks]
    torch.manual_seed(123)
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(first, masks))


def test_fused_mlp_module_with_dropout_trains_on_cuda():
    mlp = pyfastnn.FusedMLP([16, 32, 4], dropout=0.2).cuda()
    x = torch.randn(8, 16, device="cuda")
    out = mlp(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mlp.parameters())
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp(x))


# --- CUDA graphs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_backward_captured_in_a_cuda_graph(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(pyfastnn.FusedLinear(64, 128, activation="gelu_tanh"),
                          pyfastnn.FusedMLP([128, 256, 64, 16], activation="relu")).cuda().to(dtype)
    x = torch.randn(512, 64, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(512, 16, device="cuda", dtype=dtype)
    # A head whose bias is sliced (2-byte aligned): the GEMM gets an aligned copy, made in the graph,
    # so a replay reads the bias's values at that replay.
    head_weight = (torch.randn(16, 16, device="cuda") / 4).to(dtype).requires_grad_()
    head_bias = torch.randn(17, device="cuda", dtype=dtype)[1:].requires_grad_()

    def forward():
        return pyfastnn.fused_linear(model(x), head_weight, head_bias, "sigmoid")

    params = [x, *model.parameters(), head_weight, head_bias]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.autograd.grad(forward(), params, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
        static_grads = torch.autograd.grad(static_out, params, grad)
    for scale in (1.0, -0.5):
        with torch.no_grad():
            x.mul_(scale)
            head_bias.mul_(scale)
        graph.replay()
        expected = forward()
        expected_grads = torch.autograd.grad(expected, params, grad)
        assert_close(static_out, expected, dtype)
        for got, want in zip(static_grads, expected_grads):
            assert_close(got, want, dtype)


# --- pyfastnn bench --device cuda -------------------------------------------------------------------

def test_the_cuda_benchmark_reports_every_column_and_the_kernel_profile():
    # Small shapes: that every column is measured and every ratio is a positive figure (the figures
    # themselves are pyfastnn bench --device cuda's, on the real shapes).
    from pyfastnn.benchmark import profile_cuda, run_cuda

    table = []
    results = run_cuda(shapes=((256, 128, 64),), dtypes=(torch.bfloat16, torch.float32),
                       activations=("identity", "relu", "gelu_tanh", "gelu"), mlp=(256, 64, 3), min_run_time=0.01,
                       log=table.append)
    assert [row["dtype"] for row in results["copy"]] == ["bfloat16", "float32"]
    layers = results["layers"]
    assert len(layers) == 2 * 4 * 2 and len(table) == 2 + len(layers) + 2 * 2
    for row in layers:
        floor = "3gemm_us" if row["pass"] == "fwd+bwd" else "gemm_us"
        assert row["pyfastnn_us"] > 0 and row["eager_us"] > 0 and row[floor] > 0, row
        assert ("relu_epi_us" in row) == (row["activation"] == "relu"), row
        assert ("addmm_act_us" in row) == (row["pass"] == "fwd" and row["activation"] in ("relu", "gelu_tanh")), row
        assert row["pyfastnn_vs_eager"] > 0 and row["pyfastnn_over_floor"] > 0
    # the erf gelu is always pyfastnn's own pass, so its bandwidth is measured
    assert all(row["pass_GBps"] > 0 for row in layers if row["activation"] == "gelu"), layers
    assert [(row["dtype"], row["dropout"]) for row in results["fused_mlp"]] == [
        ("bfloat16", 0.0), ("bfloat16", 0.2), ("float32", 0.0), ("float32", 0.2)]
    assert all(row["pyfastnn_us"] > 0 and row["bare_gemms_us"] > 0 for row in results["fused_mlp"])
    profile = profile_cuda(shape=(256, 128, 64), dtype=torch.float32, log=table.append)
    assert {row["variant"] for row in profile} == {"pyfastnn", "eager"} and len(profile) == 2 * (7 + 2)
    assert all(row["kernel_us"] > 0 and row["kernels"] for row in profile)
