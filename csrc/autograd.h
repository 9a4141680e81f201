// The Autograd kernels of fused_linear and fused_mlp (registered in registration.cpp): C++ autograd
// Functions, so a training step pays one dispatcher call each way and no Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "tensor_args.h"

namespace pyfastnn {

at::Tensor fused_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope);

at::Tensor fused_mlp_autograd(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                              at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                              bool training);

}  // namespace pyfastnn
