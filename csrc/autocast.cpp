// The Autocast kernels (autocast.h): one cast rule for both ops and both devices.
#include "autocast.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <vector>

#include "registration.h"

namespace pyfastnn {
namespace {

// Casts the floating-point arguments of one op call to the autocast dtype of device_type (cached
// casts, as ATen's own autocast kernels do) while its autocast key is excluded, so the call below
// reaches the device's kernel instead of coming back here.
template <c10::DeviceType device_type>
class AutocastCall {
 public:
  at::Tensor cast(const at::Tensor& t) const { return at::autocast::cached_cast(dtype_, t, device_type); }
  std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) const {
    return has_tensor(t) ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  }

 private:
  static constexpr c10::DispatchKey kAutocastKey =
      device_type == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{kAutocastKey};
  at::ScalarType dtype_ = at::autocast::get_autocast_dtype(device_type);
};

}  // namespace

template <c10::DeviceType device_type>
at::Tensor fused_linear_autocast(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope) {
  const AutocastCall<device_type> autocast;
  return ops::fused_linear_op().call(autocast.cast(input), autocast.cast(weight), autocast.cast(bias), activation,
                                  negative_slope);
}

template <c10::DeviceType device_type>
at::Tensor fused_mlp_autocast(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                              at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                              bool training) {
  const AutocastCall<device_type> autocast;
  std::vector<at::Tensor> cast_weights;
  cast_weights.reserve(weights.size());
  for (const auto& w : weights) cast_weights.push_back(autocast.cast(w));
  BiasList cast_biases;
  for (size_t l = 0; l < biases.size(); ++l) cast_biases.push_back(autocast.cast(biases.get(l)));
  return ops::fused_mlp_op().call(autocast.cast(input), cast_weights, cast_biases, activations, negative_slope,
                               dropout, training);
}

template at::Tensor fused_linear_autocast<c10::DeviceType::CPU>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, int64_t, double);
template at::Tensor fused_linear_autocast<c10::DeviceType::CUDA>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, int64_t, double);
template at::Tensor fused_mlp_autocast<c10::DeviceType::CPU>(const at::Tensor&, at::TensorList, const BiasList&,
                                                             at::IntArrayRef, double, at::ArrayRef<double>, bool);
template at::Tensor fused_mlp_autocast<c10::DeviceType::CUDA>(const at::Tensor&, at::TensorList, const BiasList&,
                                                              at::IntArrayRef, double, at::ArrayRef<double>, bool);

}  // namespace pyfastnn
