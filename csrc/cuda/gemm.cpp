// The CUDA matrix products (gemm.h): which cuBLASLt epilogue each layer product takes, how the
// row-major layers map onto cuBLASLt's column-major GEMM, and the ATen fallbacks.
#include "gemm.h"

#include <ATen/ATen.h>

#include <cstdint>

#include "blaslt.h"

namespace pyfastnn::cuda {

namespace {
// cuBLASLt's GELU epilogues compute tanh approximately: within half and bfloat16 rounding, but a
// float32 result would stray ~1e-4 from torch's gelu(x, "tanh") (torch's own test of
// _addmm_activation allows float32 that much). float32 takes the bias epilogue and our own pass.
bool lt_gelu_matches_torch(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }
}  // namespace

bool gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, Activation activation,
                  bool dropout_follows, bool relu_epilogue, const at::Tensor& out, const at::Tensor* preact,
                  const at::Tensor* relu_mask) {
  const int64_t rows = x.size(0), out_features = w.size(0), in_features = w.size(1);
  const at::Tensor& acc = preact != nullptr ? *preact : out;
  if (x.is_contiguous() && w.is_contiguous()) {
    // Row-major out (rows, out) is column-major out^T: D (out x rows) = op_T(W stored in x out) * x^T.
    LtGemm gemm{x.scalar_type(), /*transpose_a=*/true, /*transpose_b=*/false, out_features, rows, in_features,
                w.data_ptr(), in_features, x.data_ptr(), in_features, acc.data_ptr(), out_features};
    // A sliced bias may sit below the alignment cuBLASLt's epilogue kernels assume (lt_matmul declines
    // it): its out_features elements, copied into a fresh block, keep the GEMM on cuBLASLt.
    const bool copy_bias = b.defined() && reinterpret_cast<uintptr_t>(b.data_ptr()) % kEpilogueAlignment != 0 &&
                           lt_enabled() && lt_supports(x.scalar_type(), out_features, rows, in_features);
    const at::Tensor bias = copy_bias ? b.clone() : b;
    gemm.bias = bias.defined() ? bias.data_ptr() : nullptr;
    gemm.epilogue = bias.defined() ? GemmEpilogue::Bias : GemmEpilogue::Default;
    bool finished = false;
    if (!dropout_follows) {
      if (activation == Activation::Identity && preact == nullptr) {
        finished = true;
      } else if (activation == Activation::Relu && preact == nullptr && relu_epilogue) {
        // relu's backward reads the output (or the bit mask); see NOTE [The relu epilogue and NaN]
        gemm.epilogue = relu_mask != nullptr ? GemmEpilogue::ReluAux : GemmEpilogue::Relu;
        if (relu_mask != nullptr) {
          gemm.aux = relu_mask->data_ptr();
          gemm.aux_ld = relu_mask->size(1) * 8;  // in bits
        }
        finished = true;
      } else if (activation == Activation::GeluTanh && !lt_gelu_matches_torch(x.scalar_type())) {
        // the bias epilogue, then the activation pass
      } else if (activation == Activation::GeluTanh && preact == nullptr) {
        gemm.epilogue = GemmEpilogue::GeluTanh;
        gemm.d = out.data_ptr();
        finished = true;
      } else if (activation == Activation::GeluTanh && out_features % 8 == 0) {
        // The pre-activation backward needs is cuBLASLt's GELU aux output: (rows, out) row-major.
        gemm.epilogue = GemmEpilogue::GeluTanhAux;
        gemm.d = out.data_ptr();
        gemm.aux = preact->data_ptr();
        gemm.aux_ld = out_features;
        finished = true;
      }
    }
    if (lt_matmul(gemm)) return finished;
  }
  // Fallback: ATen's GEMM with the bias added inside it (before its single rounding, as F.linear).
  at::Tensor acc_out = acc;
  if (b.defined()) {
    at::addmm_out(acc_out, b, x, w.t());
  } else {
    at::mm_out(acc_out, x, w.t());
  }
  return false;
}

at::Tensor input_grad_through_below(const at::Tensor& grad_pre, const at::Tensor& weight, Activation below_activation,
                                    const at::Tensor& below_aux, float scale) {
  if (!weight.is_contiguous() || !grad_pre.is_contiguous() || !below_aux.is_contiguous()) return {};
  const int64_t rows = grad_pre.size(0), out_features = weight.size(0), in_features = weight.size(1);
  const bool relu = below_activation == Activation::Relu;
  TORCH_INTERNAL_ASSERT(relu || (below_activation == Activation::GeluTanh && scale == 1.0f));
  if (!relu && !lt_gelu_matches_torch(grad_pre.scalar_type())) return {};
  at::Tensor grad_input = at::empty({rows, in_features}, grad_pre.options());
  // Row-major grad_input (rows, in) is column-major in x rows: D = W^T (stored in x out) * grad_pre^T.
  LtGemm gemm{grad_pre.scalar_type(), /*transpose_a=*/false, /*transpose_b=*/false, in_features, rows,
              out_features, weight.data_ptr(), in_features, grad_pre.data_ptr(), out_features,
              grad_input.data_ptr(), in_features};
  gemm.epilogue = relu ? GemmEpilogue::DRelu : GemmEpilogue::DGeluTanh;
  gemm.alpha = scale;
  gemm.aux = below_aux.data_ptr();
  gemm.aux_ld = relu ? below_aux.size(1) * 8 : in_features;  // bits for the relu mask
  if (!lt_matmul(gemm)) return {};
  return grad_input;
}

at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w) { return at::mm(grad, w); }

at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x) { return at::mm(grad.t(), x); }

bool fuses_bias_grad(const at::Tensor& x, int64_t out_features) {
  return lt_enabled() && lt_supports(x.scalar_type(), x.size(1), out_features, x.size(0)) && x.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor> weight_and_bias_grad(const at::Tensor& grad_pre, const at::Tensor& x) {
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = grad_pre.size(1);
  at::Tensor grad_weight = at::empty({out_features, in_features}, x.options());
  at::Tensor grad_bias = at::empty({out_features}, x.options());
  // Row-major grad_W (out, in) is column-major in x out: D = x^T (in x rows) * op_T(grad_pre^T stored out x rows).
  LtGemm gemm{x.scalar_type(), /*transpose_a=*/false, /*transpose_b=*/true, in_features, out_features, rows,
              x.data_ptr(), in_features, grad_pre.data_ptr(), out_features, grad_weight.data_ptr(), in_features};
  gemm.epilogue = GemmEpilogue::BiasGradB;
  gemm.bias = grad_bias.data_ptr();
  if (grad_pre.is_contiguous() && lt_matmul(gemm)) return {grad_weight, grad_bias};
  return {matmul_gtx(grad_pre, x), at::Tensor()};
}

}  // namespace pyfastnn::cuda
