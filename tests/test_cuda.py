"""The CUDA backend against PyTorch and against the CPU kernels. Runs where a GPU is visible
(scripts/gpu_check.sh); elsewhere these are skipped, and CI instead compiles the CUDA build and
runs the CPU suite on it."""

import pytest
import torch

import pyfastnn
from samples import assert_close, mlp_sample_inputs, reference, reference_mlp, sample_inputs

CUDA = torch.cuda.is_available() and pyfastnn.info()["backends"]["cuda"]
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of pyfastnn")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SAMPLES = list(sample_inputs(device="cuda", dtypes=DTYPES)) if CUDA else []


@pytest.fixture(autouse=True)
def exact_fp32():
    # Compare float32 without TF32, as the CPU does; TF32 itself is covered below.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


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


def test_tf32_follows_pytorch_setting():
    x, w = torch.randn(256, 512, device="cuda"), torch.randn(128, 512, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert_close(pyfastnn.fused_linear(x, w, None, None), torch.nn.functional.linear(x, w), torch.bfloat16)


def test_non_default_stream_and_cuda_graphs():
    x, w, b = (torch.randn(s, device="cuda") for s in ((64, 32), (16, 32), (16,)))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = pyfastnn.fused_linear(x, w, b, "gelu")
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


@pytest.mark.parametrize("sample", list(mlp_sample_inputs(dtypes=DTYPES[:2] + DTYPES[3:], with_dropout=False)) if CUDA else [],
                         ids=repr)
def test_cuda_fused_mlp_matches_reference(sample):
    tensors = [t.detach().cuda().requires_grad_() for t in sample.tensors()]
    args = sample.op_args(training=True, tensors=tensors)
    out = torch.ops.pyfastnn.fused_mlp(*args)
    x, weights, biases = sample.rebuild(tensors)
    expected = reference_mlp(x, weights, biases, sample.activations, sample.negative_slope)
    assert_close(out, expected, sample.dtype)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad)):
        assert_close(got, want, sample.dtype)


def test_cuda_fused_dropout_is_not_implemented_yet():
    mlp = pyfastnn.FusedMLP([16, 32, 4], dropout=0.2).cuda()
    x = torch.randn(8, 16, device="cuda")
    with pytest.raises(NotImplementedError, match="fused dropout"):
        mlp(x)
    mlp.eval()
    assert mlp(x).shape == (8, 4)
