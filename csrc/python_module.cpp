// pyfastnn._C: loading it registers the torch.library ops (registration.cpp); the few pybind11
// helpers here describe the build. Ops themselves are reached through torch.ops.pyfastnn.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "activations.h"
#include "checks.h"
#include "cpu/denormals.h"
#include "cpu/kernels.h"
#include "layer.h"

#ifndef PYFASTNN_CUDA_ARCHS
#define PYFASTNN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyfastnn native extension: fused Linear+activation kernels";
  m.def("activation_names", [] {
    std::vector<std::string> names(pyfastnn::kActivationNames,
                                   pyfastnn::kActivationNames + pyfastnn::kNumActivations);
    return names;
  }, "Activation names in enum order (the codes the ops take).");
  m.def("compute_dtype_names", [] {
    std::vector<std::string> names;
    for (const auto& dtype : pyfastnn::kComputeDtypes) names.emplace_back(dtype.name);
    return names;
  }, "The torch names of the dtypes the kernels compute in.");
  m.def("derivative_from_output", [](int64_t activation, double negative_slope, bool hidden_layer) {
    return pyfastnn::derivative_from_output(static_cast<pyfastnn::Activation>(activation), negative_slope,
                                            hidden_layer);
  }, "Whether a layer's backward reads only its output (else its pre-activation); hidden_layer: a fused_mlp "
     "layer below the last.", py::arg("activation"), py::arg("negative_slope"), py::arg("hidden_layer"));
  // The kernels' own argument checks, for the fake kernels: one source of every check and message.
  m.def("check_fused_linear_args", [](const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t activation,
                                      double negative_slope) {
    pyfastnn::check_fused_linear_args(input, weight, bias, activation, negative_slope);
  });
  m.def("check_fused_mlp_args", [](const at::Tensor& input, const std::vector<at::Tensor>& weights,
                                   const std::vector<std::optional<at::Tensor>>& biases,
                                   const std::vector<int64_t>& activations, double negative_slope,
                                   const std::vector<double>& dropout) {
    pyfastnn::check_fused_mlp_args(input, weights, pyfastnn::BiasList(biases), activations, negative_slope, dropout);
  });
  m.def("check_fused_linear_backward_args", [](const at::Tensor& grad_output, const at::Tensor& input,
                                               const at::Tensor& weight, const at::Tensor& saved, int64_t activation,
                                               double negative_slope) {
    pyfastnn::check_fused_linear_backward_args(grad_output, input, weight, saved, activation, negative_slope);
  });
  m.def("check_fused_mlp_backward_args", [](const at::Tensor& grad_output, const at::Tensor& input,
                                            const std::vector<at::Tensor>& weights, const at::Tensor& output,
                                            const std::vector<at::Tensor>& hidden,
                                            const std::vector<at::Tensor>& preacts,
                                            const std::vector<at::Tensor>& keep_masks,
                                            const std::vector<int64_t>& activations, double negative_slope,
                                            const std::vector<double>& dropout, size_t output_mask_size) {
    pyfastnn::check_fused_mlp_backward_args(grad_output, input, weights, output, hidden, preacts, keep_masks,
                                            activations, negative_slope, dropout, output_mask_size);
  });
  m.def("check_readable", [](const std::string& name, const at::Tensor& t) {
    pyfastnn::check_readable(name.c_str(), t);
  }, "Raises NotImplementedError naming `name` unless the kernels can read t's memory.");
  m.def("check_dropout_probability", [](double p) { pyfastnn::check_dropout_probability(p); },
        "Raises ValueError unless 0 <= p < 1.");
  m.def("check_negative_slope", [](double s) { pyfastnn::check_negative_slope(s); },
        "Raises ValueError unless the slope is finite in float32.");
  // Where fused_mlp_forward keeps a relu bit mask instead of a pre-activation (NOTE [relu bit masks]).
  m.def("keeps_relu_mask", [](const at::Tensor& input, int64_t activation, bool last_layer) {
    return pyfastnn::detail::keeps_relu_mask(input, static_cast<pyfastnn::Activation>(activation), last_layer);
  });
  m.def("relu_mask_row_bytes", &pyfastnn::detail::relu_mask_row_bytes);
  m.def("relu_epilogue_allowed", &pyfastnn::detail::relu_epilogue_allowed);
  m.def("set_relu_epilogue_allowed", &pyfastnn::detail::set_relu_epilogue_allowed,
        "Whether CUDA relu layers may use cuBLASLt's relu epilogue (NOTE [The relu epilogue and NaN]).");
  m.def("cpu_isa", [] { return std::string(pyfastnn::cpu::epilogue_kernels().isa); },
        "Instruction set of the CPU epilogue kernels in use.");
  m.def("compiled_cpu_isas", [] { return std::string(pyfastnn::cpu::compiled_isas()); });
  m.def("set_flush_denormal_on_threads", &pyfastnn::cpu::set_flush_denormal_on_threads,
        "Flush denormals (or not) on the calling thread and the intra-op threads; the number of threads set.");
  m.def("flush_denormal_enabled", &pyfastnn::cpu::flush_denormal_enabled,
        "Whether the calling thread flushes denormals.");
#ifdef PYFASTNN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(PYFASTNN_CUDA_ARCHS);
  // How at::parallel_for runs in this build (cmake/sources.json, gcc_openmp_flags).
#if defined(_OPENMP)
  m.attr("parallel_loops") = std::string("openmp");
#elif defined(INTRA_OP_PARALLEL)
  m.attr("parallel_loops") = std::string("native");  // ATen's own thread pool
#else
  m.attr("parallel_loops") = std::string("serial");
#endif
}
