// Typed dispatcher handles of the pyfastnn ops (registered in registration.cpp), for the kernels that
// call one op from another (autograd.cpp, autocast.cpp): each call goes through the dispatcher, below
// the key of the caller, to the device's kernel. Each handle is looked up once.
// The handles end in _op so that they never share a name with the kernels they dispatch to
// (pyfastnn::fused_linear_forward ...): calling a kernel directly would silently skip the dispatcher.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "fused_linear.h"
#include "fused_mlp.h"

namespace pyfastnn::ops {

template <typename Kernel>
using OpHandle = c10::TypedOperatorHandle<Kernel>;

const OpHandle<decltype(fused_linear_inference)>& fused_linear_op();
const OpHandle<decltype(pyfastnn::fused_linear_forward)>& fused_linear_forward_op();
const OpHandle<decltype(pyfastnn::fused_linear_backward)>& fused_linear_backward_op();
const OpHandle<decltype(fused_mlp_inference)>& fused_mlp_op();
const OpHandle<decltype(pyfastnn::fused_mlp_forward)>& fused_mlp_forward_op();
const OpHandle<decltype(pyfastnn::fused_mlp_backward)>& fused_mlp_backward_op();

}  // namespace pyfastnn::ops
