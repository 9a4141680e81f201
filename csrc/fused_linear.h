// C++ API of the fused Linear+activation ops, for CPU and (in CUDA builds) CUDA tensors; also reachable
// through the dispatcher as torch.ops.pyfastnn.*. All tensors follow F.linear: input (*, in_features), weight
// (out_features, in_features), bias (out_features) or none; the result is act(input @ weight^T + bias).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "activations.h"

namespace pyfastnn {

// act(input @ weight^T + bias), keeping nothing for backward (inference).
at::Tensor fused_linear_inference(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope);

// Returns (output, preact); preact is the pre-activation when keep_preact, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        int64_t activation, double negative_slope,
                                                        bool keep_preact);

// `saved` is what derivative_from_output() says backward needs: the output or the pre-activation.
// Returns (grad_input, grad_weight, grad_bias); an entry is undefined where output_mask is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, int64_t activation, double negative_slope,
    std::array<bool, 3> output_mask);

}  // namespace pyfastnn
