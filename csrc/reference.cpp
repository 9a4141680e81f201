// The ATen reference of the fused ops (reference.h).
#include "reference.h"

#include <ATen/ATen.h>

#include "activations.h"
#include "dropout.h"

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
      // The kernels' arithmetic: input * mask * (1 / (1 - p)) in float for half and bfloat16, rounded
      // once (rounding 1 / (1 - p) to half first, as nn.Dropout on the CPU does, moves values by an ulp).
      const auto dtype = x.scalar_type();
      const auto opmath = at::promote_types(dtype, at::kFloat);
      x = (x.to(opmath) * keep_masks[l].view(x.sizes()).to(opmath) * dropout_kept_scale(dropout[l])).to(dtype);
    }
  }
  return x;
}

}  // namespace pyfastnn
