// The fused ops written with stock ATen ops: the reference the kernels are tested against, and the
// differentiable path that double backward and forward-mode AD / torch.func take (autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "tensor_args.h"

namespace pyfastnn {

// act(F.linear(input, weight, bias)).
at::Tensor reference_fused_linear(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope);

// The MLP of fused_mlp.h layer by layer, applying the given keep masks (empty: no dropout).
at::Tensor reference_fused_mlp(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                               at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                               at::TensorList keep_masks);

}  // namespace pyfastnn
