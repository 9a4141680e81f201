// The argument checks of the fused ops (checks.h).
#include "checks.h"

#include <cmath>
#include <cstddef>
#include <iomanip>
#include <iterator>
#include <limits>
#include <locale>
#include <sstream>
#include <string>
#include <vector>

#include "activations.h"
#include "dropout.h"

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
  if (dropout_drawable(p)) return;
  const std::string problem = p >= 0.0 && p < 1.0
      ? "pyfastnn: dropout probability must be more than 2^-33 below 1 (the 32-bit random draws would keep "
        "nothing), got " + shortest_text(p)
      : "pyfastnn: dropout probability must be in [0, 1), got " + shortest_text(p);
  if (layer >= 0) TORCH_CHECK_VALUE(false, problem, " for layer ", layer);
  TORCH_CHECK_VALUE(false, problem);
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

namespace {
// check_saved_tensor on shapes that may be symbolic: the fake kernels run these checks under
// torch.compile(dynamic=True) and torch.export, where sizes() would throw.
void check_saved_sym(const char* name, const at::Tensor& t, const at::Tensor& input, c10::SymIntArrayRef expected_shape) {
  TORCH_CHECK_TYPE(t.defined(), "pyfastnn: ", name, " is missing");
  check_readable(name, t);
  TORCH_CHECK_VALUE(t.sym_sizes() == expected_shape, "pyfastnn: ", name, " has shape ", t.sym_sizes(), ", expected ",
                    expected_shape);
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "pyfastnn: ", name, " dtype ", t.scalar_type(),
                   " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_TYPE(t.device() == input.device(), "pyfastnn: ", name, " is on ", t.device(), " but input is on ",
                   input.device());
}

// input's shape with its last dimension `features` wide: a layer's output for it.
std::vector<c10::SymInt> output_sym_shape(const at::Tensor& input, const c10::SymInt& features) {
  std::vector<c10::SymInt> shape(input.sym_sizes().begin(), input.sym_sizes().end());
  shape.back() = features;
  return shape;
}
}  // namespace

void check_fused_linear_backward_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& saved, int64_t activation, double negative_slope) {
  check_fused_linear_args(input, weight, std::nullopt, activation, negative_slope);
  const auto shape = output_sym_shape(input, weight.sym_size(0));
  check_saved_sym("grad_output", grad_output, input, shape);
  if (reads_saved_tensor(static_cast<Activation>(activation))) check_saved_sym("saved activation", saved, input, shape);
}

void check_fused_mlp_backward_args(const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
                                   const at::Tensor& output, at::TensorList hidden, at::TensorList preacts,
                                   at::TensorList keep_masks, at::IntArrayRef activations, double negative_slope,
                                   at::ArrayRef<double> dropout, size_t output_mask_size) {
  const size_t layers = weights.size();
  check_fused_mlp_args(input, weights, BiasList(std::vector<std::optional<at::Tensor>>(layers)), activations,
                       negative_slope, dropout);
  TORCH_CHECK_VALUE(hidden.size() + 1 == layers && preacts.size() == layers && keep_masks.size() == layers,
                    "pyfastnn: fused_mlp_backward got ", hidden.size(), " hidden, ", preacts.size(),
                    " pre-activation and ", keep_masks.size(), " mask tensors for ", layers, " layers");
  TORCH_CHECK_VALUE(output_mask_size == 1 + 2 * layers, "pyfastnn: output_mask needs ", 1 + 2 * layers,
                    " entries (input, weights, biases), got ", output_mask_size);
  check_saved_sym("grad_output", grad_output, input, output_sym_shape(input, weights[layers - 1].sym_size(0)));
  const auto check_device = [&](const char* name, const at::Tensor& t, int64_t index) {
    TORCH_CHECK_TYPE(!t.defined() || t.device() == input.device(), "pyfastnn: ", parameter_name(name, name, index),
                     " is on ", t.device(), " but input is on ", input.device());
  };
  check_device("saved output", output, -1);
  for (size_t l = 0; l < hidden.size(); ++l) check_device("hidden", hidden[l], static_cast<int64_t>(l));
  for (size_t l = 0; l < layers; ++l) check_device("preacts", preacts[l], static_cast<int64_t>(l));
  c10::SymInt rows = 1;  // input's leading dimensions flattened
  for (int64_t d = 0; d + 1 < input.dim(); ++d) rows = rows * input.sym_size(d);
  for (size_t l = 0; l < layers; ++l) {
    const at::Tensor& mask = keep_masks[l];
    TORCH_CHECK_TYPE(mask.defined(), "pyfastnn: keep_masks[", l,
                     "] is missing (an empty 1-D uint8 tensor stands for a layer without dropout)");
    check_device("keep_masks", mask, static_cast<int64_t>(l));
    const bool has_mask = mask.dim() == 2;
    if (has_mask) check_readable("keep_masks", mask, static_cast<int64_t>(l));
    TORCH_CHECK_VALUE(has_mask || (mask.dim() == 1 && mask.sym_numel() == 0), "pyfastnn: keep_masks[", l,
                      "] must be the layer's 2-D dropout mask or an empty 1-D tensor (no dropout), got shape ",
                      mask.sym_sizes());
    // Only a forward that dropped out makes a mask: with p = 0 it would be applied unscaled.
    TORCH_CHECK_VALUE(!has_mask || dropout[l] > 0.0, "pyfastnn: keep_masks[", l, "] is a dropout mask, but dropout[",
                      l, "] is 0: pass the probability the forward dropped out with");
    // Every mask, also one whose layer's backward the layer above takes over (NOTE [relu bit masks]).
    const std::vector<c10::SymInt> layer_shape{rows, weights[l].sym_size(0)};
    TORCH_CHECK_VALUE(!has_mask || (mask.sym_sizes() == c10::SymIntArrayRef(layer_shape) &&
                                    mask.scalar_type() == at::kByte),
                      "pyfastnn: keep_masks[", l, "] must be a uint8 tensor of shape ", c10::SymIntArrayRef(layer_shape),
                      ", got ", mask.scalar_type(), " of shape ", mask.sym_sizes());
  }
}

void check_saved_tensor(const char* name, const at::Tensor& t, const at::Tensor& input,
                        at::IntArrayRef expected_shape) {
  check_saved_sym(name, t, input, c10::fromIntArrayRefSlow(expected_shape));
}

}  // namespace pyfastnn
