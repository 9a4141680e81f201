// The fused Linear+activation ops for every device: one layer_forward / layer_backward each way.
#include "fused_linear.h"

#include <ATen/ATen.h>

#include "checks.h"
#include "layer.h"

namespace pyfastnn {
namespace {

// Allocates in the caller's final shape (*, out_features) and works on a 2-D view, so a 2-D input
// costs no view ops at all: at small batch each dispatcher call is a visible share of the time.
at::Tensor empty_output(const at::Tensor& input, int64_t out_features) {
  return at::empty(detail::output_shape(input, out_features), input.options());
}

}  // namespace

at::Tensor fused_linear_inference(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope) {
  check_readable_args(input, weight, bias);
  check_fused_linear_args(input, weight, bias, activation, negative_slope);
  const KernelScope scope(input);  // NOTE [Kernels run below autograd]
  at::Tensor out = empty_output(input, weight.size(0));
  detail::layer_forward(detail::as_matrix(input), weight, bias, static_cast<Activation>(activation),
                        negative_slope, detail::as_matrix(out), nullptr, {}, detail::relu_epilogue_allowed());
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        int64_t activation, double negative_slope,
                                                        bool keep_preact) {
  check_readable_args(input, weight, bias);
  check_fused_linear_args(input, weight, bias, activation, negative_slope);
  const KernelScope scope(input);  // NOTE [Kernels run below autograd]
  at::Tensor out = empty_output(input, weight.size(0));
  at::Tensor preact = keep_preact ? at::empty_like(out) : at::empty({0}, input.options());
  const at::Tensor preact_matrix = keep_preact ? detail::as_matrix(preact) : at::Tensor();
  detail::layer_forward(detail::as_matrix(input), weight, bias, static_cast<Activation>(activation),
                        negative_slope, detail::as_matrix(out), keep_preact ? &preact_matrix : nullptr, {},
                        detail::relu_epilogue_allowed());
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, int64_t activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  check_readable_args(input, weight, std::nullopt);
  check_fused_linear_backward_args(grad_output, input, weight, saved, activation, negative_slope);
  const KernelScope scope(input, &grad_output);  // NOTE [Kernels run below autograd]
  const auto act = static_cast<Activation>(activation);
  const bool needs_saved = reads_saved_tensor(act);

  const at::Tensor grad_out = detail::as_matrix(grad_output).contiguous();  // e.g. expanded by sum().backward()
  const at::Tensor s = needs_saved ? detail::as_matrix(saved).contiguous() : at::Tensor();
  auto grads = detail::layer_backward(grad_out, detail::as_matrix(input), weight, s, derivative_from_output(act), act,
                                      negative_slope, {}, output_mask[0], output_mask[1], output_mask[2]);
  if (grads.input.defined() && input.dim() != 2) grads.input = grads.input.view(input.sizes());
  return {grads.input, grads.weight, grads.bias};
}

}  // namespace pyfastnn
