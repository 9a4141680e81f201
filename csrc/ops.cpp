// Operator schemas and the device-independent kernels: autograd (C++, so a training step pays one
// dispatcher call each way and no Python) and autocast. Backends register their own kernels.
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fused_linear.h"

namespace pyfastnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastnn::fused_linear_forward", "")
                             .typed<decltype(fused_linear_forward)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastnn::fused_linear_backward", "")
                             .typed<decltype(fused_linear_backward)>();
  return op;
}

const auto& fused_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastnn::fused_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, int64_t, double)>();
  return op;
}

bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t activation,
                            double negative_slope) {
    // Keep only what the derivative needs: the output (returned anyway, so free) or the pre-activation.
    const bool from_output = derivative_from_output(static_cast<Activation>(activation), negative_slope);
    at::Tensor output, preact;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, preact) = forward_op().call(input, weight, bias, activation, negative_slope, !from_output);
    }
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = has_tensor(bias);
    ctx->save_for_backward({input, weight, from_output ? output : preact,
                            has_tensor(bias) ? *bias : at::Tensor()});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor& grad_output = grad_outputs[0];
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): differentiate the ATen reference instead, so higher-order
      // gradients are exact rather than silently missing. The saved input, weight and bias keep
      // their history, so the recomputed graph links each gradient to all it depends on.
      std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
      const at::Tensor out = reference_fused_linear(input, weight, bias, activation, negative_slope);
      variable_list inputs;
      if (mask[0]) inputs.push_back(input);
      if (mask[1]) inputs.push_back(weight);
      if (mask[2]) inputs.push_back(*bias);
      auto grads = torch::autograd::grad({out}, inputs, {grad_output}, /*retain_graph=*/true,
                                         /*create_graph=*/true, /*allow_unused=*/true);
      variable_list result(5);
      size_t next = 0;
      for (size_t i = 0; i < 3; ++i) {
        if (mask[i]) result[i] = grads[next++];
      }
      return result;
    }
    auto [grad_input, grad_weight, grad_bias] = backward_op().call(
        grad_output, input, weight, saved[2], activation, negative_slope, mask);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor fused_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope) {
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (input.requires_grad() || weight.requires_grad() ||
                            (has_tensor(bias) && bias->requires_grad()));
  if (!needs_graph) {
    // Inference: no graph node, no saved tensors, no pre-activation; one GEMM and one epilogue.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return fused_linear_op().call(input, weight, bias, activation, negative_slope);
  }
  return FusedLinearFunction::apply(input, weight, bias, activation, negative_slope);
}

// Under torch.autocast the op runs in the autocast dtype, exactly as F.linear does.
template <c10::DeviceType device_type>
at::Tensor fused_linear_autocast(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope) {
  constexpr auto key = device_type == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                                             : c10::DispatchKey::AutocastCPU;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  std::optional<at::Tensor> cast_bias;
  if (has_tensor(bias)) cast_bias = at::autocast::cached_cast(dtype, *bias, device_type);
  return fused_linear_op().call(at::autocast::cached_cast(dtype, input, device_type),
                                at::autocast::cached_cast(dtype, weight, device_type), cast_bias,
                                activation, negative_slope);
}

}  // namespace

TORCH_LIBRARY(pyfastnn, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("fused_linear(Tensor input, Tensor weight, Tensor? bias, int activation, float negative_slope) -> Tensor",
        tags);
  m.def("fused_linear_forward(Tensor input, Tensor weight, Tensor? bias, int activation, "
        "float negative_slope, bool keep_preact) -> (Tensor, Tensor)",
        tags);
  m.def("fused_linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
        "int activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
        tags);
}

// One implementation serves every device: the GEMMs are ATen's, the epilogue launcher the device's.
static void register_device_kernels(torch::Library& m) {
  m.impl("fused_linear", &fused_linear_inference);
  m.impl("fused_linear_forward", &fused_linear_forward);
  m.impl("fused_linear_backward", &fused_linear_backward);
}

TORCH_LIBRARY_IMPL(pyfastnn, CPU, m) { register_device_kernels(m); }

#ifdef PYFASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(pyfastnn, CUDA, m) { register_device_kernels(m); }
#endif

TORCH_LIBRARY_IMPL(pyfastnn, Autograd, m) {
  m.impl("fused_linear", &fused_linear_autograd);
}

TORCH_LIBRARY_IMPL(pyfastnn, AutocastCPU, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(pyfastnn, AutocastCUDA, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace pyfastnn
