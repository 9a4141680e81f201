// The CPU's matrix products for layer.cpp, on CPU tensors: the small-batch kernels (kernels.h) where
// they beat ATen's GEMM (float/double, 1..kSmallGemmRows contiguous rows), ATen's GEMM (MKL/oneDNN)
// otherwise. The choice is the CPU's own; layer.cpp only names the product it needs.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyfastnn::cpu {

// out = x @ w^T, into the preallocated (rows, out_features) buffer out, plus the bias b (undefined:
// none) where the CPU adds it inside the GEMM: in bfloat16/half, before the GEMM's single rounding,
// exactly as F.linear does (adding it to a rounded product could flip the sign of near-zero
// pre-activations, and so relu's gradient mask, relative to nn.Linear). Returns whether it added b;
// if not, the epilogue pass adds it.
bool matmul_xwt_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& out);

// grad @ w: a layer's input gradient.
at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w);

// grad^T @ x: a layer's weight gradient, row-major (out, in) like the parameter, so autograd's
// AccumulateGrad can keep it without a copy.
at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x);

}  // namespace pyfastnn::cpu
