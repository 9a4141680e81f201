// One Linear(+activation, +dropout) layer on 2-D matrices, forward and backward: the building block
// of the fused_linear and fused_mlp ops on every device (ATen GEMMs + the device's epilogue pass).
// Internal to the extension; the public C++ API is fused_linear.h / fused_mlp.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "activations.h"
#include "dropout.h"

namespace pyfastnn::detail {

// (*, features) -> (rows, features), a view where possible.
at::Tensor as_matrix(const at::Tensor& t);

// The shape of a layer's output for `input` (*, in_features): (*, out_features).
std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features);

// Dropout after a layer's activation: p, the keep mask to write (forward) or read (backward).
struct LayerDropout {
  double p = 0.0;
  DropoutStream stream{};  // forward only
  at::Tensor keep_mask;    // uint8 rows x cols; undefined: no dropout
};

// out = dropout(act(x @ weight^T + bias)) for x (rows, in); out and preact are (rows, out)
// buffers (preact may be null: not kept).
void layer_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   Activation activation, double negative_slope, const at::Tensor& out,
                   const at::Tensor* preact, const LayerDropout& dropout);

struct LayerGrads {
  at::Tensor input, weight, bias;  // undefined where not asked for
};

// Gradients of layer_forward given grad_out (rows, out) and `saved`: the layer's output where
// derivative_from_output(), else its pre-activation (unused for identity without dropout).
LayerGrads layer_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& saved, Activation activation, double negative_slope,
                          const LayerDropout& dropout, bool need_input, bool need_weight, bool need_bias);

}  // namespace pyfastnn::detail
