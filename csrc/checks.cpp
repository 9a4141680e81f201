// The argument checks of the fused ops (checks.h).
#include "checks.h"

#include <cmath>
#include <iomanip>
#include <iterator>
#include <limits>
#include <locale>
#include <sstream>
#include <string>

#include "activations.h"

namespace pyfastnn {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  for (const auto& supported : kComputeDtypes) {
    if (supported.type == dtype) return true;
  }
  return false;
}

// "float32, float64, bfloat16 or float16", for messages.
std::string compute_dtype_names() {
  std::string names;
  const size_t count = std::size(kComputeDtypes);
  for (size_t i = 0; i < count; ++i) {
    names += i == 0 ? "" : i + 1 == count ? " or " : ", ";
    names += kComputeDtypes[i].name;
  }
  return names;
}

// A layout as Python names it (torch.sparse_coo), for messages.
const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: return "an unknown layout";
  }
}

// Names for messages, built only when a check fails: "weight" for fused_linear (layer < 0),
// "weights[l]" for layer l of fused_mlp.
std::string parameter_name(const char* single, const char* list, int64_t layer) {
  return layer < 0 ? std::string(single) : std::string(list) + "[" + std::to_string(layer) + "]";
}
// A double with as few significant digits as read back as the same value (Python's repr does the
// same), so that a limit and a value just past it never print alike. Streams in the classic locale
// rather than std::to_chars(double), which older standard libraries lack; only messages use this.
std::string shortest_text(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  std::string text;
  for (int digits = 1; digits <= std::numeric_limits<double>::max_digits10; ++digits) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out << std::setprecision(digits) << value;
    text = out.str();
    std::istringstream in(text);
    in.imbue(std::locale::classic());
    double read_back = 0.0;
    if (in >> read_back && read_back == value) break;
  }
  return text;
}
std::string source_name(int64_t layer) {
  return layer <= 0 ? std::string("input (last dimension)") : "layer " + std::to_string(layer - 1) + "'s output";
}

// One Linear layer (its activation code and parameters) against the tensor that flows into it
// (`in_features` wide).
void check_layer(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 int64_t activation, const c10::SymInt& in_features, int64_t layer) {
  TORCH_CHECK_VALUE(is_valid_activation(activation), "pyfastnn: unknown activation code ",
                    activation, " (valid: 0..", kNumActivations - 1, ")");
  TORCH_CHECK_TYPE(weight.defined(), "pyfastnn: ", parameter_name("weight", "weights", layer),
                   " must be a tensor, not None");
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), "pyfastnn: ",
                   parameter_name("weight", "weights", layer), " dtype ", weight.scalar_type(),
                   " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.device() == input.device(), "pyfastnn: ", parameter_name("weight", "weights", layer),
                   " is on ", weight.device(), " but input is on ", input.device());
  TORCH_CHECK_VALUE(weight.dim() == 2, "pyfastnn: ", parameter_name("weight", "weights", layer),
                    " must be 2-D (out_features, in_features), got ", weight.dim(), "-D with shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(in_features == weight.sym_size(1), "pyfastnn: ", source_name(layer), " has ",
                    in_features, " features but ", parameter_name("weight", "weights", layer), " expects in_features=",
                    weight.sym_size(1), " (", parameter_name("weight", "weights", layer), " shape ",
                    weight.sym_sizes(), ")");
  if (has_tensor(bias)) {
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "pyfastnn: ",
                     parameter_name("bias", "biases", layer), " dtype ", bias->scalar_type(),
                     " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_TYPE(bias->device() == input.device(), "pyfastnn: ", parameter_name("bias", "biases", layer),
                     " is on ", bias->device(), " but input is on ", input.device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), "pyfastnn: ",
                      parameter_name("bias", "biases", layer), " must have shape (out_features,) = (",
                      weight.sym_size(0), ",), got ", bias->sym_sizes());
  }
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK_TYPE(input.defined(), "pyfastnn: input must be a tensor, not None");
  TORCH_CHECK_TYPE(is_supported_dtype(input.scalar_type()),
                   "pyfastnn: input must be a floating-point tensor (", compute_dtype_names(), "), got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, "pyfastnn: input must have at least 1 dimension (*, in_features)");
}

}  // namespace

void check_fused_linear_args(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t activation, double negative_slope) {
  check_input(input);
  check_negative_slope(negative_slope);
  check_layer(input, weight, bias, activation, input.sym_size(-1), /*layer=*/-1);
}

void check_fused_mlp_args(const at::Tensor& input, at::TensorList weights,
                          const BiasList& biases, at::IntArrayRef activations, double negative_slope,
                          at::ArrayRef<double> dropout) {
  const size_t layers = weights.size();
  TORCH_CHECK_VALUE(layers >= 1, "pyfastnn: fused_mlp needs at least one weight");
  TORCH_CHECK_VALUE(biases.size() == layers, "pyfastnn: got ", biases.size(), " biases for ", layers,
                    " weights (pass None for a layer without bias)");
  TORCH_CHECK_VALUE(activations.size() == layers, "pyfastnn: got ", activations.size(),
                    " activations for ", layers, " layers");
  TORCH_CHECK_VALUE(dropout.size() == layers, "pyfastnn: got ", dropout.size(), " dropout probabilities for ",
                    layers, " layers");
  check_input(input);
  check_negative_slope(negative_slope);
  for (size_t l = 0; l < layers; ++l) {
    check_dropout_probability(dropout[l], static_cast<int64_t>(l));
    check_layer(input, weights[l], biases.get(l), activations[l],
                l == 0 ? input.sym_size(-1) : weights[l - 1].sym_size(0), static_cast<int64_t>(l));
  }
}

void check_dropout_probability(double p, int64_t layer) {
  if (p >= 0.0 && p < 1.0) return;  // false for NaN
  constexpr const char* kMessage = "pyfastnn: dropout probability must be in [0, 1), got ";
  if (layer >= 0) TORCH_CHECK_VALUE(false, kMessage, p, " for layer ", layer);
  TORCH_CHECK_VALUE(false, kMessage, p);
}

void check_negative_slope(double negative_slope) {
  TORCH_CHECK_VALUE(std::isfinite(negative_slope), "pyfastnn: negative_slope must be finite, got ",
                    shortest_text(negative_slope));
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(std::abs(negative_slope) <= kFloatMax,
                    "pyfastnn: negative_slope must be finite in float32 (at most ", shortest_text(kFloatMax),
                    " in magnitude), got ", shortest_text(negative_slope));
}

void check_kernel_input(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), "pyfastnn: ", name, " is missing");
  TORCH_CHECK_NOT_IMPLEMENTED(t.is_cpu() || t.is_cuda(), "pyfastnn: ", name, " is on ", t.device(),
                              "; the kernels run on CPU and CUDA tensors");
#ifndef PYFASTNN_WITH_CUDA
  // The dispatcher has no CUDA kernel to call in such a build, but the C++ API takes tensors directly.
  TORCH_CHECK_NOT_IMPLEMENTED(!t.is_cuda(), "pyfastnn: ", name, " is on ", t.device(),
                              "; this build of pyfastnn has no CUDA kernels (build it with CUDA)");
#endif
  check_readable(name, t);
}

void check_readable(const char* name, const at::Tensor& t, int64_t index) {
  if (!t.defined()) return;  // named as missing by the argument checks
  if (t.layout() == at::kStrided && !t.is_nested() && !t.is_quantized() && !t._is_zerotensor()) return;
  const std::string what = parameter_name(name, name, index);
  TORCH_CHECK_NOT_IMPLEMENTED(!t.is_nested(), "pyfastnn: nested tensors are not supported as ", what,
                              "; pad them (torch.nested.to_padded_tensor), or pass a jagged one's values()");
  TORCH_CHECK_NOT_IMPLEMENTED(t.layout() == at::kStrided, "pyfastnn: ", what, " has layout ", layout_name(t.layout()),
                              "; the kernels take dense (strided) tensors: pass tensor.to_dense()");
  TORCH_CHECK_NOT_IMPLEMENTED(!t.is_quantized(), "pyfastnn: ", what, " is quantized (", t.scalar_type(),
                              "); the kernels take floating point tensors: pass tensor.dequantize()");
  TORCH_CHECK_NOT_IMPLEMENTED(false, "pyfastnn: ", what, " is a ZeroTensor without memory; materialize it first "
                              "(clone())");
}

void check_readable_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_readable("input", input);
  check_readable("weight", weight);
  if (has_tensor(bias)) check_readable("bias", *bias);
}

void check_readable_args(const at::Tensor& input, at::TensorList weights, const BiasList* biases) {
  check_readable("input", input);
  for (size_t l = 0; l < weights.size(); ++l) {
    check_readable("weights", weights[l], static_cast<int64_t>(l));
    if (biases != nullptr && l < biases->size() && has_tensor(biases->get(l))) {
      check_readable("biases", *biases->get(l), static_cast<int64_t>(l));
    }
  }
}

namespace {
at::Device checked_kernel_device(const at::Tensor& input, const at::Tensor* grad_output) {
  check_kernel_input("input", input);
  if (grad_output != nullptr) check_kernel_input("grad_output", *grad_output);
  return input.device();
}
}  // namespace

KernelScope::KernelScope(const at::Tensor& input, const at::Tensor* grad_output)
    : device_guard_(checked_kernel_device(input, grad_output)) {}

void check_saved_tensor(const char* name, const at::Tensor& t, const at::Tensor& input,
                        at::IntArrayRef expected_shape) {
  TORCH_CHECK_TYPE(t.defined(), "pyfastnn: ", name, " is missing");
  check_readable(name, t);
  TORCH_CHECK_VALUE(t.sizes() == expected_shape, "pyfastnn: ", name, " has shape ", t.sizes(),
                    ", expected ", expected_shape);
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "pyfastnn: ", name, " dtype ", t.scalar_type(),
                   " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_TYPE(t.device() == input.device(), "pyfastnn: ", name, " is on ", t.device(),
                   " but input is on ", input.device());
}

}  // namespace pyfastnn
