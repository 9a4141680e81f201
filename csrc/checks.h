// The argument checks of the fused ops, shared by every backend and by the Python fake kernels
// (through pyfastnn._C): the one source of every check and its message. Errors surface in Python as
// TypeError (dtypes, devices, missing tensors), ValueError (shapes, activation codes, negative slopes,
// dropout probabilities) or NotImplementedError (tensors the kernels cannot read, check_kernel_input),
// each naming the offending argument.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>

#include <optional>

#include "tensor_args.h"

namespace pyfastnn {

// The dtypes the kernels compute in, by their torch names: every op refuses any other, and Python's
// pyfastnn.DTYPES is read from this list.
struct ComputeDtype {
  at::ScalarType type;
  const char* name;
};
inline constexpr ComputeDtype kComputeDtypes[] = {
    {at::kFloat, "float32"}, {at::kDouble, "float64"}, {at::kBFloat16, "bfloat16"}, {at::kHalf, "float16"}};

void check_fused_linear_args(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t activation, double negative_slope);

// Errors name the layer: "weights[1] ...", "dropout probability must be in [0, 1) ... for layer 0".
void check_fused_mlp_args(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                          at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout);

// What the backward ops are handed beyond the forward's arguments, checked by their kernels before any
// work and by the fake kernels (which run for any call with a meta tensor among real ones, and would
// otherwise return unwritten tensors on input's device): fused_linear_backward's gradient and saved
// tensor; fused_mlp_backward's list lengths, output_mask, gradient, dropout masks, and the device of
// every saved tensor (their shapes are checked where a layer reads them). Each also runs
// check_fused_*_args on the forward's arguments.
void check_fused_linear_backward_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& saved, int64_t activation, double negative_slope);
void check_fused_mlp_backward_args(const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights,
                                   const at::Tensor& output, at::TensorList hidden, at::TensorList preacts,
                                   at::TensorList keep_masks, at::IntArrayRef activations, double negative_slope,
                                   at::ArrayRef<double> dropout, size_t output_mask_size);

// A negative slope must be finite in float32, where the kernels of every dtype but float64 multiply by
// it; every op checks it whatever the activation, as the Python layers do when the slope is set.
void check_negative_slope(double negative_slope);

// A dropout probability p must be in [0, 1) (NaN is not): "pyfastnn: dropout probability must be in
// [0, 1), got <p>", and more than 2^-33 below 1 (dropout_drawable), each message followed by
// " for layer <layer>" when layer >= 0.
void check_dropout_probability(double p, int64_t layer = -1);

// The input of a kernel call (the direct C++ functions run without the dispatcher, which would refuse
// these): defined, on a device this build has kernels for, readable (check_readable). Its parameters
// are checked to be on the same device.
void check_kernel_input(const char* name, const at::Tensor& t);

// A tensor the kernels read as memory: dense and strided (not sparse, mkldnn, nested or quantized)
// and not a ZeroTensor (no memory behind it); NotImplementedError names it, as `name` or as
// `name[index]` where index >= 0, and what to pass instead. Every tensor a kernel entry point
// reads is checked so (the dispatcher finds no kernel for most of these; the direct C++ functions
// have no dispatcher), and Python's ops name such arguments with it.
void check_readable(const char* name, const at::Tensor& t, int64_t index = -1);

// Every tensor a fused op's kernel entry point reads, through check_readable, before the op's argument
// checks (whose messages read the tensors' shapes): "weight" / "bias" for fused_linear,
// "weights[l]" / "biases[l]" for fused_mlp (`biases` null where the op reads none). Kept apart from
// check_fused_*_args, which the fake kernels and the autograd kernel's forward-AD path also run, where
// a ZeroTensor argument is legal (the dispatcher materializes it below autograd).
void check_readable_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
void check_readable_args(const at::Tensor& input, at::TensorList weights, const BiasList* biases);

// NOTE [Kernels run below autograd]
// Called directly from C++ with tensors that require grad, the out= GEMMs inside the kernels would
// refuse to run; the dispatcher's path is already below autograd. Each kernel entry point opens a
// KernelScope after its argument checks: it checks input (and grad_output, where given) with
// check_kernel_input, then keeps the call below autograd and on input's device, where the kernels
// launch.
class KernelScope {
 public:
  explicit KernelScope(const at::Tensor& input, const at::Tensor* grad_output = nullptr);

 private:
  at::AutoDispatchBelowADInplaceOrView below_autograd_;
  c10::OptionalDeviceGuard device_guard_;
};

// Checks a tensor handed to a backward op (a gradient or a saved activation) against the input.
void check_saved_tensor(const char* name, const at::Tensor& t, const at::Tensor& input,
                        at::IntArrayRef expected_shape);

}  // namespace pyfastnn
