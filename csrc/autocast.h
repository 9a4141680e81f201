// The Autocast kernels of fused_linear and fused_mlp (registered in registration.cpp): under
// torch.autocast the op runs in the autocast dtype of the device, exactly as F.linear does.
// Instantiated for c10::DeviceType::CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

#include "tensor_args.h"

namespace pyfastnn {

template <c10::DeviceType device_type>
at::Tensor fused_linear_autocast(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope);

template <c10::DeviceType device_type>
at::Tensor fused_mlp_autocast(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                              at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                              bool training);

}  // namespace pyfastnn
