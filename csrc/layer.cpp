// The per-layer flow shared by the fused ops: ATen GEMMs (MKL/oneDNN on CPU, cuBLAS on CUDA) plus
// one fused element-wise pass each way, launched by the device's epilogue launcher.
#include "layer.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "cpu/kernels.h"
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
// CPU: at most 64 blocks of at least 16 rows and ~16K elements (a pass too small to split between
// threads is one block, with no second reduction); CUDA: at most 256 blocks of at least 64 rows,
// enough thread blocks to fill the GPU while the partial sums stay small.
int64_t rows_per_block(int64_t rows, int64_t cols, bool cuda_device) {
  if (cuda_device) return std::max<int64_t>(64, (rows + 255) / 256);
  const int64_t by_size = (16384 + cols - 1) / std::max<int64_t>(cols, 1);
  return std::max({int64_t{16}, by_size, (rows + 63) / 64});
}

// The small-batch CPU kernels take float/double row-major operands with 1..kSmallGemmRows rows;
// anything else goes to ATen's GEMM.
bool use_small_gemm(const at::Tensor& rows_operand, const at::Tensor& other) {
  const int64_t rows = rows_operand.size(0);
  const auto dtype = rows_operand.scalar_type();
  return rows_operand.device().is_cpu() && rows >= 1 && rows <= cpu::kSmallGemmRows &&
         (dtype == at::kFloat || dtype == at::kDouble) && rows_operand.is_contiguous() && other.is_contiguous() &&
         rows_operand.numel() > 0 && other.numel() > 0;
}

void small_gemm(cpu::SmallGemmKind kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& y,
                int64_t n, int64_t k) {
  cpu::launch_small_gemm(kind, {a.scalar_type(), a.size(0), n, k, a.data_ptr(), b.data_ptr(), y.data_ptr()});
}

// out = x @ w^T into a preallocated contiguous buffer.
void matmul_xwt(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  if (use_small_gemm(x, w) && out.is_contiguous()) {
    return small_gemm(cpu::SmallGemmKind::XWt, x, w, out, w.size(0), w.size(1));
  }
  at::mm_out(out, x, w.t());
}

// grad @ w: the input gradient.
at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w) {
  if (!use_small_gemm(grad, w)) return at::mm(grad, w);
  at::Tensor y = at::empty({grad.size(0), w.size(1)}, grad.options());
  small_gemm(cpu::SmallGemmKind::GW, grad, w, y, w.size(0), w.size(1));
  return y;
}

// grad^T @ x: the weight gradient, row-major (out, in) like the parameter, so autograd's
// AccumulateGrad can keep it without a copy.
at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x) {
  if (!use_small_gemm(grad, x)) return at::mm(grad.t(), x);
  at::Tensor y = at::empty({grad.size(1), x.size(1)}, grad.options());
  small_gemm(cpu::SmallGemmKind::GtX, grad, x, y, grad.size(1), x.size(1));
  return y;
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

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
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
    matmul_xwt(x, weight, acc);
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
    const int64_t block_rows = rows_per_block(rows, out_features, cuda_device);
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
  if (need_input) grads.input = matmul_gw(grad_pre, weight);
  if (need_weight) grads.weight = matmul_gtx(grad_pre, x);
  return grads;
}

}  // namespace pyfastnn::detail
