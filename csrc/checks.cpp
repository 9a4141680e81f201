// Argument checks and the ATen reference, shared by every backend.
#include <ATen/ATen.h>

#include "fused_linear.h"

namespace pyfastnn {

void check_fused_linear_args(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK_VALUE(is_valid_activation(activation), "pyfastnn: unknown activation code ",
                    activation, " (valid: 0..", kNumActivations - 1, ")");
  TORCH_CHECK_TYPE(input.defined() && weight.defined(),
                   "pyfastnn: input and weight must be tensors, not None");
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf,
                   "pyfastnn: input must be a floating-point tensor (float32, float64, bfloat16 or "
                   "float16), got ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(),
                   "pyfastnn: weight dtype ", weight.scalar_type(), " does not match input dtype ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(weight.device() == input.device(), "pyfastnn: weight is on ", weight.device(),
                   " but input is on ", input.device());
  TORCH_CHECK_VALUE(weight.dim() == 2, "pyfastnn: weight must be 2-D (out_features, in_features), got ",
                    weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1, "pyfastnn: input must have at least 1 dimension (*, in_features)");
  TORCH_CHECK_VALUE(input.sym_size(-1) == weight.sym_size(1), "pyfastnn: input has in_features=",
                    input.sym_size(-1), " (last dimension) but weight expects in_features=",
                    weight.sym_size(1), " (weight shape ", weight.sym_sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "pyfastnn: bias dtype ",
                     bias->scalar_type(), " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_TYPE(bias->device() == input.device(), "pyfastnn: bias is on ", bias->device(),
                     " but input is on ", input.device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0),
                      "pyfastnn: bias must have shape (out_features,) = (", weight.sym_size(0),
                      ",), got ", bias->sym_sizes());
  }
}

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

}  // namespace pyfastnn
