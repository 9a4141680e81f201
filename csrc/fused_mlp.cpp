// The fused MLP ops for every device: layer_forward / layer_backward chained inside one call, so a
// whole network costs one dispatcher call and one autograd node each way.
#include "fused_mlp.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#include "checks.h"
#include "dropout.h"
#include "layer.h"

namespace pyfastnn {
namespace {

// CPU: one 64-bit seed per layer and call from torch's default generator: torch.manual_seed
// reproduces every mask.
uint64_t draw_dropout_seed() {
  auto* generator = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(generator->mutex_);
  return generator->random64();
}

// `save`: keep what backward needs (hidden outputs, pre-activations, masks); else only the output.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> run_forward(
    const at::Tensor& input, at::TensorList weights, const BiasList& biases, at::IntArrayRef activations,
    double negative_slope, at::ArrayRef<double> dropout, bool training, bool save) {
  check_readable_args(input, weights, &biases);
  check_fused_mlp_args(input, weights, biases, activations, negative_slope, dropout);
  const KernelScope scope(input);  // NOTE [Kernels run below autograd]
  const size_t layers = weights.size();
  const auto options = input.options();
  const bool relu_epilogue = detail::relu_epilogue_allowed();  // one value for the whole call
  std::vector<at::Tensor> hidden, preacts, keep_masks;
  at::Tensor x = detail::as_matrix(input);
  const int64_t rows = x.size(0);
  at::Tensor output;
  for (size_t l = 0; l < layers; ++l) {
    const bool last = l + 1 == layers;
    const auto act = static_cast<Activation>(activations[l]);
    const int64_t out_features = weights[l].size(0);
    // The last layer allocates in the caller's shape (*, out); hidden layers stay 2-D.
    at::Tensor y = last ? at::empty(detail::output_shape(input, out_features), options)
                        : at::empty({rows, out_features}, options);
    at::Tensor y_matrix = last ? detail::as_matrix(y) : y;
    const bool keep_preact = save && !derivative_from_output(act, negative_slope, /*hidden_layer=*/!last);
    // CUDA relu hidden layers keep a bit mask in this slot instead (NOTE [relu bit masks]).
    const bool keep_relu_mask = save && detail::keeps_relu_mask(input, act, last);
    at::Tensor preact;
    if (keep_relu_mask) {
      const std::vector<int64_t> shape{rows, detail::relu_mask_row_bytes(out_features)};
      // pyfastnn's passes write every byte, padding included. cuBLASLt's RELU_AUX (opted in, no
      // dropout) may leave the padding bits as they were, and an op's outputs must not depend on
      // uninitialised memory (opcheck compares them bitwise): zeroed for it.
      const bool epilogue_may_write = !dropout_runs(dropout[l], training) && relu_epilogue;
      const auto mask_options = options.dtype(at::kByte);
      preact = epilogue_may_write ? at::zeros(shape, mask_options) : at::empty(shape, mask_options);
    } else if (save) {  // placeholders are separate empty tensors: outputs of an op must not alias each other
      preact = at::empty(keep_preact ? std::vector<int64_t>{rows, out_features} : std::vector<int64_t>{0}, options);
    }
    detail::LayerDropout layer_dropout;
    if (dropout_runs(dropout[l], training)) {
      layer_dropout.p = dropout[l];
      // CPU: a SplitMix64 stream seeded here; CUDA: the launcher takes a Philox state from torch's
      // CUDA generator (graph-safe), see PhiloxDropout.
      if (input.device().is_cpu()) layer_dropout.stream = DropoutStream::make(draw_dropout_seed(), dropout[l]);
      layer_dropout.keep_mask = at::empty({rows, out_features}, options.dtype(at::kByte));
    }
    detail::layer_forward(x, weights[l], biases.get(l), act, negative_slope, y_matrix,
                          keep_preact ? &preact : nullptr, layer_dropout, relu_epilogue,
                          keep_relu_mask ? &preact : nullptr);
    if (save) {
      preacts.push_back(preact);
      keep_masks.push_back(layer_dropout.keep_mask.defined() ? layer_dropout.keep_mask
                                                              : at::empty({0}, options.dtype(at::kByte)));
      if (!last) hidden.push_back(y_matrix);
    }
    x = y_matrix;
    if (last) output = y;
  }
  return {output, hidden, preacts, keep_masks};
}

}  // namespace

at::Tensor fused_mlp_inference(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                               at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                               bool training) {
  return std::get<0>(run_forward(input, weights, biases, activations, negative_slope, dropout, training, false));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
fused_mlp_forward(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                  at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                  bool training) {
  return run_forward(input, weights, biases, activations, negative_slope, dropout, training, true);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, const at::Tensor& output,
    at::TensorList hidden, at::TensorList preacts, at::TensorList keep_masks, at::IntArrayRef activations,
    double negative_slope, at::ArrayRef<double> dropout, const c10::List<bool>& output_mask) {
  const size_t layers = weights.size();
  check_readable_args(input, weights, nullptr);
  check_fused_mlp_backward_args(grad_output, input, weights, output, hidden, preacts, keep_masks, activations,
                                negative_slope, dropout, output_mask.size());
  const KernelScope scope(input, &grad_output);  // NOTE [Kernels run below autograd]
  const auto out_shape = detail::output_shape(input, weights[layers - 1].size(0));

  // Gradients not asked for are separate empty tensors (outputs of an op must not alias each other).
  const auto none = [&] { return at::empty({0}, input.options()); };
  std::vector<at::Tensor> grad_weights, grad_biases;
  for (size_t l = 0; l < layers; ++l) {
    grad_weights.push_back(none());
    grad_biases.push_back(none());
  }
  at::Tensor grad_input = none();
  // Walk down only as far as the lowest layer that needs a gradient.
  const bool need_input = output_mask.get(0);
  int64_t lowest = need_input ? 0 : -1;
  for (size_t l = 0; l < layers && lowest < 0; ++l) {
    if (output_mask.get(1 + l) || output_mask.get(1 + layers + l)) lowest = static_cast<int64_t>(l);
  }
  if (lowest < 0) return {grad_input, grad_weights, grad_biases};

  const at::Tensor input_matrix = detail::as_matrix(input);
  const int64_t rows = input_matrix.size(0);
  at::Tensor grad = detail::as_matrix(grad_output).contiguous();  // e.g. expanded by sum().backward()
  // Set when the layer above already applied this layer's activation derivative inside its
  // data-gradient GEMM: `grad` is then the pre-activation gradient.
  bool grad_is_preact = false;
  // A layer ran dropout iff its keep mask is 2-D (checked, check_fused_mlp_backward_args); layers
  // without it save an empty 1-D placeholder.
  std::vector<bool> has_mask(layers);
  for (size_t l = 0; l < layers; ++l) has_mask[l] = keep_masks[l].dim() == 2;
  for (int64_t l = static_cast<int64_t>(layers) - 1; l >= lowest; --l) {
    const auto act = grad_is_preact ? Activation::Identity : static_cast<Activation>(activations[l]);
    const bool last = l + 1 == static_cast<int64_t>(layers);
    const std::vector<int64_t> layer_shape{rows, weights[l].size(0)};
    // The derivative's source as the forward chose it (a hidden layer's output may stand for its
    // pre-activation, see derivative_from_output).
    const bool from_output = derivative_from_output(act, negative_slope, /*hidden_layer=*/!last);
    at::Tensor saved;
    if (reads_saved_tensor(act)) {
      if (from_output && last) {  // the op's output, in the caller's shape
        check_saved_tensor("saved output", output, input, out_shape);
        saved = detail::as_matrix(output);
      } else {
        saved = from_output ? hidden[l] : preacts[l];
        check_saved_tensor(from_output ? "saved output" : "saved pre-activation", saved, input, layer_shape);
      }
      saved = saved.contiguous();
    }
    detail::LayerDropout layer_dropout;
    if (has_mask[l] && !grad_is_preact) {
      layer_dropout.p = dropout[l];
      layer_dropout.keep_mask = keep_masks[l].contiguous();
    }
    const at::Tensor& layer_input = l == 0 ? input_matrix : hidden[l - 1];
    if (l > 0) check_saved_tensor("hidden output", layer_input, input, {rows, weights[l - 1].size(0)});
    // The layer below may have its derivative applied by this layer's data-gradient GEMM (CUDA:
    // tanh-GELU without dropout after it, from its saved pre-activation; relu from its saved bit mask,
    // with dropout's scale as the GEMM's alpha, NOTE [relu bit masks]). A relu layer's pre-activation
    // slot is 2-D only when it holds the bit mask. The CPU never does this (nor keeps a bit mask).
    std::optional<detail::BelowLayer> below;
    const auto below_act = l > lowest ? static_cast<Activation>(activations[l - 1]) : Activation::Identity;
    if (input.is_cuda() && ((below_act == Activation::GeluTanh && !has_mask[l - 1]) || below_act == Activation::Relu) &&
        preacts[l - 1].dim() == 2) {
      const int64_t features = weights[l - 1].size(0);
      if (below_act == Activation::Relu) {
        TORCH_CHECK_VALUE(preacts[l - 1].scalar_type() == at::kByte && preacts[l - 1].device() == input.device() &&
                              preacts[l - 1].sizes() == at::IntArrayRef({rows, detail::relu_mask_row_bytes(features)}),
                          "pyfastnn: preacts[", l - 1, "] must be the relu bit mask, uint8 of shape (", rows, ", ",
                          detail::relu_mask_row_bytes(features), ") on ", input.device());
        check_readable("preacts", preacts[l - 1], l - 1);
      } else {
        check_saved_tensor("saved pre-activation", preacts[l - 1], input, {rows, features});
      }
      below = detail::BelowLayer{below_act, preacts[l - 1].contiguous(),
                                 has_mask[l - 1] ? static_cast<float>(dropout_kept_scale(dropout[l - 1])) : 1.0f};
    }
    auto grads = detail::layer_backward(grad, layer_input, weights[l], saved, from_output, act, negative_slope,
                                        layer_dropout, l > lowest || need_input, output_mask.get(1 + l),
                                        output_mask.get(1 + layers + l), below ? &*below : nullptr);
    if (grads.weight.defined()) grad_weights[l] = grads.weight;
    if (grads.bias.defined()) grad_biases[l] = grads.bias;
    grad = grads.input;
    grad_is_preact = grads.input_is_below_preact_grad;
  }
  if (need_input) grad_input = input.dim() == 2 ? grad : grad.view(input.sizes());
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace pyfastnn
