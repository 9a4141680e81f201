// The ATen reference of the fused ops (reference.h).
#include "reference.h"

#include <ATen/ATen.h>

#include "activations.h"

namespace pyfastnn {

at::Tensor reference_fused_linear(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope) {
  const at::Tensor pre = at::linear(input, weight, bias);
  switch (static_cast<Activation>(activation)) {
    case Activation::Identity: return pre;
    case Activation::Relu: return at::relu(pre);
    case Activation::LeakyRelu: return at::leaky_relu(pre, negative_slope);
    case Activation::Sigmoid: return at::sigmoid(pre);
    case Activation::Tanh: return at::tanh(pre);
    case Activation::Gelu: return at::gelu(pre, "none");
    case Activation::GeluTanh: return at::gelu(pre, "tanh");
    case Activation::Silu: return at::silu(pre);
  }
  TORCH_CHECK_VALUE(false, "pyfastnn: unknown activation code ", activation);
}

at::Tensor reference_fused_mlp(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                               at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                               at::TensorList keep_masks) {
  at::Tensor x = input;
  for (size_t l = 0; l < weights.size(); ++l) {
    x = reference_fused_linear(x, weights[l], biases.get(l), activations[l], negative_slope);
    if (l < keep_masks.size() && keep_masks[l].dim() == 2) {
      // nn.Dropout's arithmetic: input * (mask / (1 - p)).
      x = x * (keep_masks[l].view(x.sizes()).to(x.scalar_type()) / (1.0 - dropout[l]));
    }
  }
  return x;
}

}  // namespace pyfastnn
