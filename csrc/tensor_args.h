// Small vocabulary of the ops' tensor arguments, shared by the op API, the checks and the layers
// without pulling in any of them.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace pyfastnn {

// One optional bias per layer of fused_mlp (None: that layer has no bias).
using BiasList = c10::List<std::optional<at::Tensor>>;

// Whether an optional tensor argument (a bias) was given.
inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace pyfastnn
