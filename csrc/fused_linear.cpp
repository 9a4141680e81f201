// The fused Linear+activation ops for every device: ATen GEMMs (MKL/oneDNN on CPU, cuBLAS on CUDA)
// plus one fused element-wise pass each way, launched by the device's epilogue launcher.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include "epilogue.h"
#include "fused_linear.h"

namespace pyfastnn {
namespace {

// (*, features) -> (rows, features). Rows are counted explicitly: reshape(-1, 0) is ambiguous.
at::Tensor as_matrix(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  const auto sizes = t.sizes();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return t.reshape({rows, sizes.back()});
}

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

// Allocates in the caller's final shape (*, out_features) and works on a 2-D view, so a 2-D input
// costs no view ops at all: at small batch each dispatcher call is a visible share of the time.
at::Tensor empty_output(const at::Tensor& input, int64_t out_features) {
  return at::empty(output_shape(input, out_features), input.options());
}

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// Only a CUDA build registers CUDA kernels, so a CPU-only build never sees a CUDA tensor here.
void launch(const ForwardEpilogue& args, int64_t rows, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_forward_epilogue(args, rows);
#endif
  TORCH_CHECK(!cuda_device, "pyfastnn: this build has no CUDA kernels");
  cpu::launch_forward_epilogue(args, rows);
}

void launch(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_backward_epilogue(args, rows, rows_per_block);
#endif
  TORCH_CHECK(!cuda_device, "pyfastnn: this build has no CUDA kernels");
  cpu::launch_backward_epilogue(args, rows, rows_per_block);
}

// Bias-gradient rows are summed in fixed blocks whose partial sums are then added in block order, so
// the result depends only on the shape, never on thread count or scheduling (bitwise reproducible).
// CPU: at most 64 blocks of at least 16 rows; CUDA: at most 256 blocks of at least 64 rows, enough
// thread blocks to fill the GPU while the partial sums stay small.
int64_t rows_per_block(int64_t rows, bool cuda_device) {
  if (cuda_device) return std::max<int64_t>(64, (rows + 255) / 256);
  return std::max<int64_t>(16, (rows + 63) / 64);
}

// out = act(input @ weight^T + bias); when preact is given it receives input @ weight^T + bias.
void forward_into(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t activation, double negative_slope, const at::Tensor& out, const at::Tensor* preact) {
  const int64_t out_features = weight.size(0);
  const at::Tensor x = as_matrix(input);
  const int64_t rows = x.size(0);
  if (rows == 0 || out_features == 0) return;
  // The GEMM writes into the buffer that must hold x @ W^T + bias afterwards: the pre-activation when
  // it is kept, otherwise the output itself (then the epilogue runs in place).
  at::Tensor acc = as_matrix(preact != nullptr ? *preact : out);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (b.defined() && at::isReducedFloatingType(input.scalar_type())) {
    // bfloat16/half: add the bias inside the GEMM, before its single rounding, exactly as
    // F.linear does; adding it after a rounded GEMM could flip the sign of near-zero
    // pre-activations (and so relu's gradient mask) relative to nn.Linear.
    at::addmm_out(acc, b, x, weight.t());
    b = at::Tensor();
  } else {
    at::mm_out(acc, x, weight.t());
  }
  const ForwardEpilogue args{input.scalar_type(),
                             static_cast<Activation>(activation),
                             negative_slope,
                             out_features,
                             acc.data_ptr(),
                             b.defined() ? b.data_ptr() : nullptr,
                             preact != nullptr ? preact->data_ptr() : nullptr,
                             out.data_ptr()};
  launch(args, rows, on_cuda(input));
}

}  // namespace

at::Tensor fused_linear_inference(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t activation,
                                  double negative_slope) {
  check_fused_linear_args(input, weight, bias, activation);
  const c10::OptionalDeviceGuard device_guard(input.device());  // kernels launch on input's device
  at::Tensor out = empty_output(input, weight.size(0));
  forward_into(input, weight, bias, activation, negative_slope, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        int64_t activation, double negative_slope,
                                                        bool keep_preact) {
  check_fused_linear_args(input, weight, bias, activation);
  const c10::OptionalDeviceGuard device_guard(input.device());
  at::Tensor out = empty_output(input, weight.size(0));
  at::Tensor preact = keep_preact ? at::empty_like(out) : at::empty({0}, input.options());
  forward_into(input, weight, bias, activation, negative_slope, out, keep_preact ? &preact : nullptr);
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, int64_t activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  check_fused_linear_args(input, weight, std::nullopt, activation);
  const c10::OptionalDeviceGuard device_guard(input.device());
  const auto act = static_cast<Activation>(activation);
  const int64_t out_features = weight.size(0);
  const auto shape = output_shape(input, out_features);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(shape), "pyfastnn: grad_output has shape ",
                    grad_output.sizes(), ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "pyfastnn: grad_output dtype ",
                   grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_TYPE(grad_output.device() == input.device(), "pyfastnn: grad_output is on ",
                   grad_output.device(), " but input is on ", input.device());
  const bool needs_saved = act != Activation::Identity;
  if (needs_saved) {
    TORCH_CHECK_VALUE(saved.sizes() == at::IntArrayRef(shape), "pyfastnn: saved activation has shape ",
                      saved.sizes(), ", expected ", at::IntArrayRef(shape));
    TORCH_CHECK_TYPE(saved.scalar_type() == input.scalar_type() && saved.device() == input.device(),
                     "pyfastnn: saved activation must match input's dtype and device");
  }

  const at::Tensor grad_out = as_matrix(grad_output).contiguous();  // e.g. expanded by sum().backward()
  const int64_t rows = grad_out.size(0);
  const at::Tensor s = needs_saved ? as_matrix(saved).contiguous() : at::Tensor();
  at::Tensor grad_pre = needs_saved ? at::empty_like(grad_out) : grad_out;

  at::Tensor grad_bias;
  if (output_mask[2] || needs_saved) {
    const bool cuda_device = on_cuda(input);
    const int64_t block_rows = rows_per_block(rows, cuda_device);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    at::Tensor partial_sums;
    if (output_mask[2]) {
      const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
      partial_sums = blocks <= 1 ? at::zeros({out_features}, options) : at::zeros({blocks, out_features}, options);
    }
    if (blocks > 0 && out_features > 0) {
      const BackwardEpilogue args{input.scalar_type(), act, negative_slope, out_features, grad_out.data_ptr(),
                                  needs_saved ? s.data_ptr() : nullptr, needs_saved ? grad_pre.data_ptr() : nullptr,
                                  output_mask[2] ? partial_sums.data_ptr() : nullptr};
      launch(args, rows, block_rows, cuda_device);
    }
    if (output_mask[2]) {
      grad_bias = blocks <= 1 ? partial_sums : partial_sums.sum(0);
      if (grad_bias.scalar_type() != input.scalar_type()) grad_bias = grad_bias.to(input.scalar_type());
    }
  }

  at::Tensor grad_input, grad_weight;
  if (output_mask[0]) {
    grad_input = at::mm(grad_pre, weight);
    if (input.dim() != 2) grad_input = grad_input.view(input.sizes());
  }
  // As (x^T @ grad_pre)^T, the layout MKL runs fastest here (and the one eager autograd produces).
  if (output_mask[1]) grad_weight = at::mm(as_matrix(input).t(), grad_pre).t();
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace pyfastnn
