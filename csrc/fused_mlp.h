// C++ API of the fused MLP ops: the whole stack
//   x -> Linear_0 -> act_0 (-> dropout_0) -> Linear_1 -> act_1 (-> dropout_1) -> ... -> Linear_{L-1} -> act_{L-1}
// in one call each way. weights[l] is (out_l, in_l) with in_0 = input's last dimension and
// in_l = out_{l-1}; biases[l] is (out_l,) or None; activations[l] an Activation code; dropout[l] the
// probability applied after layer l when `training` (0 for none). Reachable as torch.ops.pyfastnn.*.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "tensor_args.h"

namespace pyfastnn {

// The MLP's output, keeping nothing for backward.
at::Tensor fused_mlp_inference(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                               at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                               bool training);

// Returns (output, hidden, preacts, keep_masks): hidden[l] is layer l's output (rows, out_l) for
// l < L-1 (the next layer's input, after dropout); preacts[l] the pre-activation where backward needs
// it (!derivative_from_output(act, negative_slope, hidden_layer)) or, for a CUDA relu hidden layer,
// its uint8 relu bit mask (each row padded to 128 bits, as cuBLASLt's RELU_AUX epilogues read it),
// else empty; keep_masks[l] the uint8 (rows, out_l) dropout mask where dropout ran, else empty.
// Dropout draws from torch's default generator of the input's device (CPU: SplitMix64 seeded from
// it; CUDA: Philox, graph-safe).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
fused_mlp_forward(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                  at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                  bool training);

// Gradients from fused_mlp_forward's saved tensors. output_mask has 1 + 2L entries: input, each
// weight, each bias. Returns (grad_input, grad_weights, grad_biases); gradients not asked for are
// empty tensors. Layers below the lowest one that needs a gradient are not visited at all.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, const at::Tensor& output,
    at::TensorList hidden, at::TensorList preacts, at::TensorList keep_masks, at::IntArrayRef activations,
    double negative_slope, at::ArrayRef<double> dropout, const c10::List<bool>& output_mask);

}  // namespace pyfastnn
