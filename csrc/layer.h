// One Linear(+activation, +dropout) layer on 2-D matrices, forward and backward: the building block
// of the fused_linear and fused_mlp ops on every device (the device's GEMMs + its epilogue pass).
// Internal to the extension; the public C++ API is fused_linear.h / fused_mlp.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
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

// NOTE [relu bit masks]
// On CUDA a relu hidden layer of fused_mlp (float32/float16/bfloat16) keeps the bit mask of its
// positive outputs in the layout of cuBLASLt's RELU_AUX epilogue: uint8 (rows,
// relu_mask_row_bytes(features)), bit f % 8 of byte f / 8 of a row for feature f, rows padded to 128
// bits. It travels in the layer's pre-activation slot (relu needs no pre-activation), and the layer
// above reads it in its data-gradient GEMM (DRELU): where cuBLASLt takes that, the layer has no
// backward pass of its own. With dropout after the relu the bit is that of the dropped-out
// output, set where the element is positive *and* kept, and the GEMM scales by 1 / (1 - p) (its
// alpha): relu's derivative times the dropout mask and scale is exactly that. The byte dropout mask
// is still what the op reports (backward never reads it for relu: the saved output implies it, which
// is also what the fallback reads where cuBLASLt declines DRELU).
bool keeps_relu_mask(const at::Tensor& input, Activation activation, bool last_layer);
int64_t relu_mask_row_bytes(int64_t features);

// NOTE [The relu epilogue and NaN]
// cuBLASLt's relu epilogues are reported to write 0 where the pre-activation is NaN; torch.relu keeps
// NaN, and so does every other path here. A NaN made finite hides a diverged network (a layer with
// NaN weights would output zeros, its loss finite), so relu takes the bias epilogue and our own pass
// (which also packs the bit mask) unless the user opts in to the epilogue for speed
// (pyfastnn.cuda_relu_epilogue()). Opted in, a hidden layer's bit mask is cuBLASLt's RELU_AUX mask,
// reported (CUTLASS's and nvmath's references of it) to set the bit where the pre-activation is >= 0:
// then DRELU passes the gradient at exactly 0, where torch.relu's derivative is 0 (tests follow the
// mask the forward kept there; should cuBLASLt then decline DRELU, the fallback reads the derivative
// from the output and passes none there). Process-wide, read once per op call (layer_forward's
// relu_epilogue), so that every layer of a call and the allocation of its mask see one value.
bool relu_epilogue_allowed();
void set_relu_epilogue_allowed(bool allowed);

// out = dropout(act(x @ weight^T + bias)) for x (rows, in); out and preact are (rows, out)
// buffers (preact may be null: not kept); relu_epilogue: relu_epilogue_allowed() as the op read it;
// relu_mask, for relu on CUDA, receives the bit mask above (zeroed first where the relu epilogue may
// write it: no dropout and relu_epilogue).
void layer_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   Activation activation, double negative_slope, const at::Tensor& out,
                   const at::Tensor* preact, const LayerDropout& dropout, bool relu_epilogue,
                   const at::Tensor* relu_mask = nullptr);

struct LayerGrads {
  at::Tensor input, weight, bias;  // undefined where not asked for
  // Set when `input` already is the pre-activation gradient of the layer below (its activation
  // derivative rode in this layer's data-gradient GEMM, see BelowLayer).
  bool input_is_below_preact_grad = false;
};

// The layer under this one in a stack, when its activation derivative may be applied by this layer's
// data-gradient GEMM (CUDA: cuBLASLt's DGELU for gelu_tanh without dropout after it, from its
// pre-activation; DRELU for relu, from its bit mask, dropout or not).
struct BelowLayer {
  Activation activation;  // GeluTanh or Relu
  at::Tensor aux;         // gelu_tanh: the pre-activation (rows, in); relu: the bit mask
  float scale = 1.0f;     // relu with dropout after it: 1 / (1 - p) (NOTE [relu bit masks])
};

// Gradients of layer_forward given grad_out (rows, out) and `saved`: the layer's output where
// saved_is_output (derivative_from_output), else its pre-activation (unused for identity).
LayerGrads layer_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& saved, bool saved_is_output, Activation activation, double negative_slope,
                          const LayerDropout& dropout, bool need_input, bool need_weight, bool need_bias,
                          const BelowLayer* below = nullptr);

}  // namespace pyfastnn::detail
