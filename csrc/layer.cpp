// The per-layer flow shared by the fused ops: ATen GEMMs (MKL/oneDNN on CPU, cuBLAS on CUDA) plus
// one fused element-wise pass each way, launched by the device's epilogue launcher.
#include "layer.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "epilogue.h"

namespace pyfastnn::detail {
namespace {

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// Only a CUDA build registers CUDA kernels, so a CPU-only build never sees a CUDA tensor here.
void launch(const ForwardEpilogue& args, int64_t rows, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_forward_epilogue(args, rows);
#endif
  TORCH_CHECK(!cuda_device, "pyfastnn: this build has no CUDA kernels");
  cpu::launch_forward_epilogue(args, rows);
}

void launch(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_backward_epilogue(args, rows, rows_per_block);
#endif
  TORCH_CHECK(!cuda_device, "pyfastnn: this build has no CUDA kernels");
  cpu::launch_backward_epilogue(args, rows, rows_per_block);
}

// Bias-gradient rows are summed in fixed blocks whose partial sums are then added in block order, so
// the result depends only on the shape, never on thread count or scheduling (bitwise reproducible).
// CPU: at most 64 blocks of at least 16 rows; CUDA: at most 256 blocks of at least 64 rows, enough
// thread blocks to fill the GPU while the partial sums stay small.
int64_t rows_per_block(int64_t rows, bool cuda_device) {
  if (cuda_device) return std::max<int64_t>(64, (rows + 255) / 256);
  return std::max<int64_t>(16, (rows + 63) / 64);
}

}  // namespace

at::Tensor as_matrix(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  // Rows are counted explicitly: reshape(-1, 0) is ambiguous for 0-sized feature dimensions.
  const auto sizes = t.sizes();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return t.reshape({rows, sizes.back()});
}

void layer_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   Activation activation, double negative_slope, const at::Tensor& out,
                   const at::Tensor* preact, const LayerDropout& dropout) {
  const int64_t rows = x.size(0);
  const int64_t out_features = weight.size(0);
  if (rows == 0 || out_features == 0) return;
  // The GEMM writes into the buffer that must hold x @ W^T + bias afterwards: the pre-activation when
  // it is kept, otherwise the output itself (then the epilogue runs in place).
  at::Tensor acc = preact != nullptr ? *preact : out;
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (b.defined() && at::isReducedFloatingType(x.scalar_type())) {
    // bfloat16/half: add the bias inside the GEMM, before its single rounding, exactly as
    // F.linear does; adding it after a rounded GEMM could flip the sign of near-zero
    // pre-activations (and so relu's gradient mask) relative to nn.Linear.
    at::addmm_out(acc, b, x, weight.t());
    b = at::Tensor();
  } else {
    at::mm_out(acc, x, weight.t());
  }
  ForwardEpilogue args{x.scalar_type(),
                       activation,
                       negative_slope,
                       out_features,
                       acc.data_ptr(),
                       b.defined() ? b.data_ptr() : nullptr,
                       preact != nullptr ? preact->data_ptr() : nullptr,
                       out.data_ptr()};
  if (dropout.keep_mask.defined()) {
    args.keep_mask = dropout.keep_mask.data_ptr<uint8_t>();
    args.dropout = dropout.stream;
    args.dropout_p = dropout.p;
  }
  launch(args, rows, on_cuda(x));
}

LayerGrads layer_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& saved, Activation activation, double negative_slope,
                          const LayerDropout& dropout, bool need_input, bool need_weight, bool need_bias) {
  const int64_t rows = grad_out.size(0);
  const int64_t out_features = weight.size(0);
  const bool has_dropout = dropout.keep_mask.defined();
  const bool needs_pass = activation != Activation::Identity || has_dropout;
  // Identity without dropout: grad_out already is the pre-activation gradient.
  at::Tensor grad_pre = needs_pass ? at::empty_like(grad_out) : grad_out;

  LayerGrads grads;
  if (need_bias || needs_pass) {
    const bool cuda_device = on_cuda(x);
    const int64_t block_rows = rows_per_block(rows, cuda_device);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    at::Tensor partial_sums;
    if (need_bias) {
      const auto options = grad_out.options().dtype(at::toOpMathType(grad_out.scalar_type()));
      partial_sums = blocks <= 1 ? at::zeros({out_features}, options) : at::zeros({blocks, out_features}, options);
    }
    if (blocks > 0 && out_features > 0) {
      BackwardEpilogue args{grad_out.scalar_type(), activation, negative_slope, out_features, grad_out.data_ptr(),
                            saved.defined() ? saved.data_ptr() : nullptr,
                            needs_pass ? grad_pre.data_ptr() : nullptr,
                            need_bias ? partial_sums.data_ptr() : nullptr};
      if (has_dropout) {
        args.keep_mask = dropout.keep_mask.data_ptr<uint8_t>();
        args.dropout_p = dropout.p;
      }
      launch(args, rows, block_rows, cuda_device);
    }
    if (need_bias) {
      grads.bias = blocks <= 1 ? partial_sums : partial_sums.sum(0);
      if (grads.bias.scalar_type() != grad_out.scalar_type()) grads.bias = grads.bias.to(grad_out.scalar_type());
    }
  }
  if (need_input) grads.input = at::mm(grad_pre, weight);
  // As (x^T @ grad_pre)^T, the layout MKL runs fastest here (and the one eager autograd produces).
  if (need_weight) grads.weight = at::mm(x.t(), grad_pre).t();
  return grads;
}

}  // namespace pyfastnn::detail
