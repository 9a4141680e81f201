// The CUDA matrix products for layer.cpp, on CUDA tensors (CUDA builds only): cuBLASLt with the
// activation, its derivative or the bias gradient fused into the GEMM's epilogue where it takes the
// problem (NOTE [cuBLASLt epilogues and the fallback] in blaslt.h), ATen's GEMM (cuBLAS) otherwise.
// The choice of epilogue, operand layout and aux leading dimension is CUDA's own; layer.cpp only names
// the product it needs, as it does for the CPU (cpu/gemm.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../activations.h"

namespace pyfastnn::cuda {

// x @ W^T (+ bias b, undefined: none) for a layer, with the activation fused where cuBLASLt has it
// (relu where relu_epilogue allows it, the tanh-form GELU; identity) unless dropout_follows. Returns
// true when that finished the layer (out, preact where given and relu_mask where given written);
// otherwise the GEMM result with its bias is in the accumulation buffer (preact if given, else out)
// and the element-wise pass must follow.
bool gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, Activation activation,
                  bool dropout_follows, bool relu_epilogue, const at::Tensor& out, const at::Tensor* preact,
                  const at::Tensor* relu_mask);

// scale * (grad_pre @ W) with the derivative of the layer below fused in (relu from its bit mask,
// gelu_tanh from its pre-activation: `below_aux`): the below layer's pre-activation gradient, or
// undefined where cuBLASLt declined (nothing written; the caller falls back). `scale` is the below
// layer's dropout scale 1 / (1 - p) (NOTE [relu bit masks]), else 1. That layer's bias gradient is
// left to its own weight-gradient GEMM (NOTE [cuBLASLt epilogues and the fallback]).
at::Tensor input_grad_through_below(const at::Tensor& grad_pre, const at::Tensor& weight, Activation below_activation,
                                    const at::Tensor& below_aux, float scale);

// grad @ w and grad^T @ x (a layer's input and weight gradients) where no epilogue rides along:
// ATen's GEMM (cuBLAS).
at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w);
at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x);

// Whether weight_and_bias_grad may fuse the bias gradient for x (rows, in_features) and out_features.
bool fuses_bias_grad(const at::Tensor& x, int64_t out_features);

// grad_W = grad_pre^T @ x with the bias gradient (sums of grad_pre over rows) in the same cuBLASLt
// call. Returns (grad_W, grad_b), grad_b undefined where cuBLASLt declined (grad_W then from ATen).
std::tuple<at::Tensor, at::Tensor> weight_and_bias_grad(const at::Tensor& grad_pre, const at::Tensor& x);

}  // namespace pyfastnn::cuda
