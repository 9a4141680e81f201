// The pyfastnn ops: their schemas (torch.ops.pyfastnn.*), the kernel each dispatch key runs, and the
// typed handles other kernels call them through (registration.h).
//   CPU, CUDA     fused_linear.cpp, fused_mlp.cpp: the device's GEMMs + its epilogue launcher
//   Autograd      autograd.cpp
//   AutocastCPU,  autocast.cpp
//   AutocastCUDA
#include "registration.h"

#include <torch/library.h>

#include <vector>

#include "autocast.h"
#include "autograd.h"

namespace pyfastnn {

namespace ops {
namespace {

template <typename Kernel>
OpHandle<Kernel> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Kernel>();
}

}  // namespace

const OpHandle<decltype(fused_linear_inference)>& fused_linear_op() {
  static const auto op = find_op<decltype(fused_linear_inference)>("pyfastnn::fused_linear");
  return op;
}

const OpHandle<decltype(pyfastnn::fused_linear_forward)>& fused_linear_forward_op() {
  static const auto op = find_op<decltype(pyfastnn::fused_linear_forward)>("pyfastnn::fused_linear_forward");
  return op;
}

const OpHandle<decltype(pyfastnn::fused_linear_backward)>& fused_linear_backward_op() {
  static const auto op = find_op<decltype(pyfastnn::fused_linear_backward)>("pyfastnn::fused_linear_backward");
  return op;
}

const OpHandle<decltype(fused_mlp_inference)>& fused_mlp_op() {
  static const auto op = find_op<decltype(fused_mlp_inference)>("pyfastnn::fused_mlp");
  return op;
}

const OpHandle<decltype(pyfastnn::fused_mlp_forward)>& fused_mlp_forward_op() {
  static const auto op = find_op<decltype(pyfastnn::fused_mlp_forward)>("pyfastnn::fused_mlp_forward");
  return op;
}

const OpHandle<decltype(pyfastnn::fused_mlp_backward)>& fused_mlp_backward_op() {
  static const auto op = find_op<decltype(pyfastnn::fused_mlp_backward)>("pyfastnn::fused_mlp_backward");
  return op;
}

}  // namespace ops

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
  // Dropout draws from torch's generator: the random ops carry nondeterministic_seeded.
  const std::vector<at::Tag> seeded_tags{at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded};
  m.def("fused_mlp(Tensor input, Tensor[] weights, Tensor?[] biases, int[] activations, float negative_slope, "
        "float[] dropout, bool training) -> Tensor",
        seeded_tags);
  m.def("fused_mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, int[] activations, "
        "float negative_slope, float[] dropout, bool training) -> (Tensor, Tensor[], Tensor[], Tensor[])",
        seeded_tags);
  m.def("fused_mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor output, Tensor[] hidden, "
        "Tensor[] preacts, Tensor[] keep_masks, int[] activations, float negative_slope, float[] dropout, "
        "bool[] output_mask) -> (Tensor, Tensor[], Tensor[])",
        tags);
}

namespace {
// One implementation serves every device: layer.cpp calls the device's GEMMs and epilogue launcher.
void register_device_kernels(torch::Library& m) {
  m.impl("fused_linear", &fused_linear_inference);
  m.impl("fused_linear_forward", &fused_linear_forward);
  m.impl("fused_linear_backward", &fused_linear_backward);
  m.impl("fused_mlp", &fused_mlp_inference);
  m.impl("fused_mlp_forward", &fused_mlp_forward);
  m.impl("fused_mlp_backward", &fused_mlp_backward);
}
}  // namespace

TORCH_LIBRARY_IMPL(pyfastnn, CPU, m) { register_device_kernels(m); }

#ifdef PYFASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(pyfastnn, CUDA, m) { register_device_kernels(m); }
#endif

TORCH_LIBRARY_IMPL(pyfastnn, Autograd, m) {
  m.impl("fused_linear", &fused_linear_autograd);
  m.impl("fused_mlp", &fused_mlp_autograd);
}

TORCH_LIBRARY_IMPL(pyfastnn, AutocastCPU, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CPU>);
  m.impl("fused_mlp", &fused_mlp_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(pyfastnn, AutocastCUDA, m) {
  m.impl("fused_linear", &fused_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("fused_mlp", &fused_mlp_autocast<c10::DeviceType::CUDA>);
}

}  // namespace pyfastnn
